"""The README's commands run as written, and the docs cite what exists.

README blocks are found by an HTML comment right before a fenced block (invisible on GitHub):

    <!-- readme-test: run -->                run the next ```bash block
    <!-- readme-test: run-if-benchmarks -->  run it only when `tcli eval --list-benchmarks` works
    <!-- readme-test: file NAME -->          write the next block to NAME (a file a later block uses)

Every marked block runs in README order, in one temporary directory that links ``examples/`` from
this checkout and ``.venv`` to the environment running the tests, with that environment's ``bin``
first on PATH, ``OMP_NUM_THREADS=1`` and this checkout on PYTHONPATH. ``make`` lines are skipped:
the environment is already installed. A block that exits non-zero fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DESIGN = REPO / "docs" / "design.md"
MARKER = re.compile(r"<!-- readme-test: (run|run-if-benchmarks|file [\w./-]+) -->")
BLOCK = re.compile(r"\s*```(\w*)\n(.*?)\n```", re.S)


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(what, body) for every marked block, in order: what is run, run-if-benchmarks or file NAME."""
    out = []
    for m in MARKER.finditer(text):
        block = BLOCK.match(text, m.end())
        assert block, f"README marker {m.group(0)!r} is not followed by a fenced block"
        kind, body = block.groups()
        if m.group(1).startswith("run"):
            assert kind == "bash", f"{m.group(0)} must mark a ```bash block, not ```{kind}"
        out.append((m.group(1), body))
    return out


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_quick_start_blocks_are_marked():
    """Every shell block of the quick start is run by the test below (none escapes it), and the
    pipeline, eval and loop are among them."""
    text = README.read_text()
    quick = _section(text, "Quick start")
    fenced = re.findall(r"```bash\n", quick)
    marked = [b for w, b in readme_blocks(quick) if w.startswith("run")]
    assert len(marked) == len(fenced) >= 5
    joined = "\n".join(marked)
    for cmd in ("tcli sample-tree", "| tcli verify", "| tcli build-tree", "| tcli advantages",
                "tcli train-step", "tcli eval", "tcli loop"):
        assert cmd in joined, cmd
    assert "--model" in joined.split("tcli sample-tree", 1)[1].split("|", 1)[0]


def _workdir(tmp: Path) -> dict:
    """The temporary 'clone': examples/ linked in, .venv = the running environment; its env."""
    (tmp / "examples").symlink_to(REPO / "examples")
    bindir = Path(sys.executable).parent
    if (bindir / "activate").is_file():
        (tmp / ".venv").symlink_to(bindir.parent)
    else:  # not a virtual environment: an activate script that does what matters here
        (tmp / ".venv" / "bin").mkdir(parents=True)
        (tmp / ".venv" / "bin" / "activate").write_text(f'export PATH="{bindir}:$PATH"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCLI_")}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    return env


def _benchmarks_shipped(env: dict, cwd: Path) -> bool:
    out = subprocess.run([sys.executable, "-m", "tcli", "eval", "--list-benchmarks"], cwd=cwd,
                         env=env, capture_output=True, timeout=120)
    return out.returncode == 0


def _script(body: str) -> str:
    """The block without its `make` lines (kept as no-ops so line numbers stay)."""
    return "\n".join(":" if re.match(r"\s*make(\s|$)", ln) else ln for ln in body.splitlines())


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    env = _workdir(tmp_path)
    shipped = None
    ran = 0
    for what, body in readme_blocks(README.read_text()):
        if what.startswith("file "):
            (tmp_path / what.split(" ", 1)[1]).write_text(body + "\n")
            continue
        if what == "run-if-benchmarks":
            if shipped is None:
                shipped = _benchmarks_shipped(env, tmp_path)
            if not shipped:
                continue
        out = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", _script(body)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, (f"README block failed with exit {out.returncode}:\n{body}\n"
                                     f"--- stdout\n{out.stdout[-3000:]}\n--- stderr\n"
                                     f"{out.stderr[-3000:]}")
        ran += 1
    assert ran >= 6
    assert (tmp_path / "runs/quick/ckpt1/tcli_state.json").is_file()
    assert (tmp_path / "runs/quick/loop/metrics.jsonl").is_file()


# ----------------------------------------------------------------------------- the docs

PROJECT_TEXT = [README, *sorted((REPO / "docs").glob("*.md")),
                *sorted((REPO / "examples").glob("*/README.md"))]


def test_design_has_every_cited_section():
    """Code and tests cite the design document as "DESIGN §N" or "docs/design.md §N"; each N
    must be a numbered section there, and the layering test's "Layers" section must exist."""
    headings = set(re.findall(r"^## (\d+)\. ", DESIGN.read_text(), re.M))
    subs = set(re.findall(r"^### (\d+\.\d+) ", DESIGN.read_text(), re.M))
    cited: dict[str, list[str]] = {}
    for root in ("tcli", "tests", "examples", "bench"):
        for path in sorted((REPO / root).rglob("*.py")):
            for m in re.finditer(r"(?:DESIGN|design\.md)\s*((?:§\s*[\d.]+[,\s]*)+)",
                                 path.read_text()):
                for num in re.findall(r"§\s*(\d+(?:\.\d+)?)", m.group(1)):
                    cited.setdefault(num, []).append(path.relative_to(REPO).as_posix())
    assert cited, "no citations found: has the citation style changed?"
    missing = {n: p for n, p in cited.items() if n not in (subs if "." in n else headings)}
    assert not missing, missing
    assert re.search(r"^## \d+\. Layers$", DESIGN.read_text(), re.M)


def test_project_text_names_no_path_outside_the_repository():
    bad = re.compile(r"\.\./shared|/work/")
    hits = [f"{p.relative_to(REPO)}:{i}: {ln.strip()}" for p in PROJECT_TEXT
            for i, ln in enumerate(p.read_text().splitlines(), 1) if bad.search(ln)]
    assert not hits, "\n".join(hits)


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", md.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_doc_links_resolve():
    """Relative links between the README, docs/ and the examples' READMEs point at files, and
    their #anchors at headings."""
    broken = []
    for p in PROJECT_TEXT:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", p.read_text()):
            if "://" in target:
                continue
            dest = (p.parent / target) if target else p
            if not dest.exists() or (anchor and dest.suffix == ".md"
                                     and anchor not in _anchors(dest)):
                broken.append(f"{p.relative_to(REPO)} -> {target}#{anchor}")
    assert not broken, broken
