"""Hostile and broken input, one case per kind, through every command that reads records.

Each case checks what a user sees: the README's exit code (0 ok, 1 runtime, 2 usage, 65 bad
data), exactly one line on stderr naming the file, the line and the field, no traceback, and no
output file (not even a temporary one) when the command fails. Blank lines are ignored and empty
input gives empty output with exit 0 for the record stages.

The commands run in this process through ``tcli.cli.main`` (the real option parsing and error
mapping), so the model commands load the tiny model in a fraction of a second instead of
importing torch once per case; a few cases run as real processes to check the exit status,
stdin naming and ``--debug``. Fields a stage does not read pass through unchanged (design §3:
stages never drop unknown fields), so each case runs on the commands that read its field.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import orjson
import pytest

from conftest import REPO, cli, jsonl, one_error_line, prompts, rollouts, run_tcli

ROLLOUT_COMMANDS = ("verify", "build-tree", "advantages", "train-step", "show-tree")
PROMPT_COMMANDS = ("sample-tree", "eval")
GROUP_COMMANDS = ("build-tree", "advantages", "show-tree")


# ----------------------------------------------------------------------------- inputs

def base(cmd: str) -> list[dict]:
    return prompts() if cmd in PROMPT_COMMANDS else rollouts()


def arrow(recs) -> bytes:
    """The records as an Arrow IPC stream, written by tcli's own writer."""
    import tempfile

    from tcli.io import RecordWriter

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.arrow")
        with RecordWriter(path) as w:
            w.write_all(recs)
        return Path(path).read_bytes()


def edit_line2(fn: Callable[[dict], None]) -> Callable[[str], bytes]:
    """Input whose second record was changed by ``fn``."""
    def make(cmd: str) -> bytes:
        recs = base(cmd)
        fn(recs[1])
        return jsonl(recs)
    return make


def drop(key):
    return edit_line2(lambda r: r.pop(key))


def put(key, value):
    return edit_line2(lambda r: r.__setitem__(key, value))


def raw_line2(fn: Callable[[bytes], bytes]) -> Callable[[str], bytes]:
    def make(cmd: str) -> bytes:
        lines = jsonl(base(cmd)).splitlines(keepends=True)
        lines[1] = fn(lines[1])
        return b"".join(lines)
    return make


def arrow_line2(key, value):
    def make(cmd: str) -> bytes:
        recs = base(cmd)
        recs[1][key] = value
        return arrow(recs)
    return make


def truncated_arrow(cmd: str) -> bytes:
    data = arrow(base(cmd))
    return data[: len(data) * 2 // 3]


# ----------------------------------------------------------------------------- the catalog

@dataclass
class Case:
    data: Callable[[str], bytes]
    expect: dict  # command -> (exit code, line, field, words that must appear in the message)
    args: dict = field(default_factory=dict)  # extra arguments per command
    suffix: str = ".jsonl"


def on(commands, code=65, line=2, fld=None, words=()):
    return {c: (code, line, fld, tuple(words)) for c in commands}


CASES: dict[str, Case] = {
    "truncated last line": Case(
        lambda c: jsonl(base(c))[:-9],
        {**on(PROMPT_COMMANDS, line=3, words=["truncated"]),
         **on(ROLLOUT_COMMANDS, line=6, words=["truncated"])},
        args={"show-tree": ["--index", "1"]}),
    "invalid UTF-8": Case(
        raw_line2(lambda b: b.replace(b"{", b'{"note":"a\xffb",', 1)),
        on(PROMPT_COMMANDS + ROLLOUT_COMMANDS, words=["UTF-8"])),
    "JSON that is not an object": Case(
        raw_line2(lambda b: b"[1, 2]\n"),
        on(PROMPT_COMMANDS + ROLLOUT_COMMANDS, words=["not an object"])),
    "NaN literal in any field": Case(
        raw_line2(lambda b: b.replace(b"{", b'{"score":NaN,', 1)),
        on(PROMPT_COMMANDS + ROLLOUT_COMMANDS, fld="score", words=["NaN"])),
    # missing required fields, per stage
    "missing id": Case(drop("id"), on(PROMPT_COMMANDS, fld="id", words=["missing"])),
    "missing prompt": Case(drop("prompt"), on(PROMPT_COMMANDS, fld="prompt", words=["missing"])),
    "missing answer": Case(drop("answer"), on(("eval", "verify"), fld="answer", words=["missing"])),
    "missing text": Case(drop("text"), on(("verify",), fld="text", words=["missing"])),
    "missing prompt_id": Case(drop("prompt_id"), on(GROUP_COMMANDS, fld="prompt_id")),
    "missing token_ids": Case(drop("token_ids"), on(GROUP_COMMANDS + ("train-step",),
                                                    fld="token_ids", words=["missing"])),
    "missing reward": Case(drop("reward"), on(GROUP_COMMANDS, fld="reward", words=["missing"])),
    "missing prompt_token_ids": Case(drop("prompt_token_ids"),
                                     on(("train-step",), fld="prompt_token_ids")),
    "missing logprobs": Case(drop("logprobs"), on(("train-step",), fld="logprobs")),
    "missing advantages": Case(drop("advantages"), on(("train-step",), fld="advantages")),
    # wrong types
    "string token ids": Case(put("token_ids", ["31", "40", "1"]),
                             on(GROUP_COMMANDS + ("train-step",), fld="token_ids", words=["strings"])),
    "float sample id": Case(put("sample_id", 1.5), on(GROUP_COMMANDS, fld="sample_id")),
    "float prompt id": Case(put("id", 1.5), on(PROMPT_COMMANDS, fld="id")),
    "prompt not a string": Case(put("prompt", 5), on(PROMPT_COMMANDS, fld="prompt")),
    "text not a string": Case(put("text", 5), on(("verify",), fld="text")),
    "string reward": Case(put("reward", "1"), on(GROUP_COMMANDS, fld="reward")),
    "string advantages": Case(put("advantages", "0.5"), on(("train-step",), fld="advantages")),
    # token ids the model cannot take
    "negative token id": Case(put("token_ids", [31, -1, 1]),
                              on(GROUP_COMMANDS + ("train-step",), fld="token_ids",
                                 words=["non-negative"])),
    "negative prompt token id": Case(put("prompt_token_ids", [21, -4]),
                                     on(("train-step",), fld="prompt_token_ids")),
    "out-of-vocabulary token id": Case(put("token_ids", [31, 99_999, 1]),
                                       on(("train-step",), fld="token_ids", words=["vocabulary"])),
    "out-of-vocabulary prompt token id": Case(put("prompt_token_ids", [21, 500]),
                                              on(("train-step",), fld="prompt_token_ids",
                                                 words=["vocabulary"])),
    "token id beyond 64 bits": Case(raw_line2(lambda b: b.replace(b"[31,", b"[123456789012345678901234567890,")),
                                    on(GROUP_COMMANDS + ("train-step",))),
    # lengths and non-finite numbers
    "logprobs length != token_ids": Case(put("logprobs", [-1.0]),
                                         on(GROUP_COMMANDS + ("train-step",), fld="logprobs",
                                            words=["expected 3"])),
    "logprobs not a list": Case(put("logprobs", "-1.0"),
                                on(GROUP_COMMANDS + ("train-step",), fld="logprobs")),
    "advantages length != token_ids": Case(put("advantages", [0.1] * 4),
                                           on(("train-step",), fld="advantages")),
    "NaN reward (JSONL)": Case(raw_line2(lambda b: b.replace(b'"reward":1.0', b'"reward":NaN')),
                               on(ROLLOUT_COMMANDS, fld="reward", words=["NaN"])),
    "Infinity advantage (JSONL)": Case(raw_line2(lambda b: b.replace(b'"advantages":[0.0,',
                                                                     b'"advantages":[Infinity,')),
                                       on(ROLLOUT_COMMANDS, fld="advantages")),
    "NaN reward (Arrow)": Case(arrow_line2("reward", float("nan")),
                               on(GROUP_COMMANDS, fld="reward", words=["finite"]), suffix=".arrow"),
    "-inf advantage (Arrow)": Case(arrow_line2("advantages", [0.0, float("-inf"), 0.0]),
                                   on(("train-step",), fld="advantages"), suffix=".arrow"),
    "NaN logprob (Arrow)": Case(arrow_line2("logprobs", [-1.0, float("nan"), -1.0]),
                                on(("train-step",), fld="logprobs"), suffix=".arrow"),
    # identity of records
    "duplicate (prompt_id, sample_id)": Case(put("sample_id", 0),
                                             on(GROUP_COMMANDS, fld="sample_id", words=["duplicate"])),
    "duplicate prompt id": Case(put("id", "p1"), on(PROMPT_COMMANDS, fld="id")),
    "group split across the stream": Case(
        lambda c: jsonl(rollouts() + [dict(rollouts()[0], sample_id=3)]),
        on(GROUP_COMMANDS, line=7, fld="prompt_id", words=["consecutive"]),
        args={"show-tree": ["--index", "2"]}),
    "truncated Arrow stream": Case(truncated_arrow, on(PROMPT_COMMANDS + ROLLOUT_COMMANDS, line=None,
                                                       words=["Arrow", "truncated"]),
                                   suffix=".arrow"),
}

XFAIL: dict = {}  # bugs found by this catalogue were fixed; add (case, command) -> reason here


def _params():
    out = []
    for name, case in CASES.items():
        for cmd in case.expect:
            marks = [pytest.mark.xfail(strict=True, reason=XFAIL[(name, cmd)])] \
                if (name, cmd) in XFAIL else []
            out.append(pytest.param(name, cmd, id=f"{name}-{cmd}", marks=marks))
    return out


def argv_for(cmd: str, src: Path, out: Path, tiny: str, model: str | None = None) -> list:
    """The command line of ``cmd`` reading ``src`` and writing into the empty directory ``out``."""
    model = model or tiny
    return {
        "sample-tree": ["sample-tree", src, "-m", model, "--n", "2", "--max-new-tokens", "3",
                        "-o", out / "out.jsonl"],
        "eval": ["eval", "-m", model, "--data", src, "--max-new-tokens", "3", "--task", "arith",
                 "--workers", "0", "--quiet", "-o", out / "out.jsonl"],
        "verify": ["verify", src, "--task", "arith", "--workers", "0", "-o", out / "out.jsonl"],
        "expand-tree": ["expand-tree", src, "-m", model, "--expand-tokens", "8",
                        "-o", out / "out.jsonl"],
        "build-tree": ["build-tree", src, "-o", out / "out.jsonl"],
        "advantages": ["advantages", src, "-o", out / "out.jsonl"],
        "train-step": ["train-step", src, "-m", model, "-o", out / "ckpt"],
        "show-tree": ["show-tree", src],
    }[cmd]


def setup(tmp_path: Path, data: bytes, suffix: str = ".jsonl") -> tuple[Path, Path]:
    src_dir, out = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir(parents=True)
    out.mkdir()
    src = src_dir / f"in{suffix}"
    src.write_bytes(data)
    return src, out


@pytest.mark.parametrize("case, cmd", _params())
def test_bad_input(case, cmd, tiny, tmp_path):
    c = CASES[case]
    code, line, fld, words = c.expect[cmd]
    src, out = setup(tmp_path, c.data(cmd), c.suffix)
    r = cli(argv_for(cmd, src, out, tiny) + c.args.get(cmd, []))
    assert r.code == code, (r.code, r.err)
    msg = one_error_line(r.err)
    where = f"{src}:{line}:" if line is not None else f"{src}"
    assert where in msg, msg
    if fld:
        assert f"field '{fld}'" in msg, msg
    for w in words:
        assert w in msg, msg
    assert os.listdir(out) == [], "a failed command left output behind"
    if cmd == "show-tree":
        assert r.out == b""


# ----------------------------------------------------------------------------- empty and blank

EMPTY_OK = ("sample-tree", "verify", "expand-tree", "build-tree", "advantages")
EMPTY_ERR = {"train-step": (65, "no response tokens"), "eval": (65, "no prompts"),
             "show-tree": (2, "no group")}


@pytest.mark.parametrize("kind", ["no bytes", "blank lines only", "empty Arrow stream"])
@pytest.mark.parametrize("cmd", EMPTY_OK + tuple(EMPTY_ERR))
def test_empty_input(kind, cmd, tiny, tmp_path):
    """Record stages: empty output, exit 0 (README). Commands that need at least one record
    (a training step, an accuracy, a group to draw) fail with one line and write nothing."""
    data = {"no bytes": b"", "blank lines only": b"\n  \n\t\n", "empty Arrow stream": arrow([])}[kind]
    src, out = setup(tmp_path, data, ".arrow" if "Arrow" in kind else ".jsonl")
    r = cli(argv_for(cmd, src, out, tiny))
    if cmd in EMPTY_OK:
        assert r.code == 0, r.err
        assert r.err == f"tcli: warning: no records in {src}; the output is empty\n"
        assert (out / "out.jsonl").read_bytes() == b""
        assert os.listdir(out) == ["out.jsonl"]
    else:
        code, words = EMPTY_ERR[cmd]
        assert r.code == code, r.err
        assert words in one_error_line(r.err)
        assert os.listdir(out) == []


@pytest.mark.parametrize("cmd", PROMPT_COMMANDS + ROLLOUT_COMMANDS)
def test_blank_lines_are_ignored(cmd, tiny, tmp_path):
    """Blank and whitespace-only lines change nothing in the output (not even line numbers of
    later errors, tested below)."""
    recs = base(cmd)
    clean = jsonl(recs)
    blanky = jsonl(recs[:1]) + b"\n   \n\r\n" + jsonl(recs[1:]) + b"\n"
    outputs = []
    for i, data in enumerate((clean, blanky)):
        src, out = setup(tmp_path / str(i), data)
        r = cli(argv_for(cmd, src, out, tiny))
        assert r.code == 0, r.err
        if cmd == "train-step":
            m = orjson.loads(r.out)
            outputs.append((m["num_tokens"], m["num_sequences"], m["loss"]))
            assert (out / "ckpt" / "model.safetensors").exists()
        elif cmd == "eval":
            summary = orjson.loads(r.out)
            assert summary.pop("data") == str(src) and summary["prompts"] == 3
            outputs.append(summary)
        elif cmd == "show-tree":
            outputs.append(r.out)
        else:
            outputs.append((out / "out.jsonl").read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0]


def test_blank_lines_keep_line_numbers(tmp_path):
    recs = rollouts()
    recs[2]["reward"] = "x"
    src, out = setup(tmp_path, jsonl(recs[:1]) + b"\n\n" + jsonl(recs[1:]))
    r = cli(["advantages", src, "-o", out / "o.jsonl"])
    assert r.code == 65 and f"{src}:5: field 'reward'" in one_error_line(r.err)


# ----------------------------------------------------------------------------- models and config

def test_checkpoint_without_weights(tiny, tmp_path):
    """A checkpoint directory without weights: one line naming the directory, exit 65, nothing
    written. train-step checks this before loading anything."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    os.unlink(broken / "model.safetensors")
    src, out = setup(tmp_path, jsonl(rollouts()))
    r = cli(argv_for("train-step", src, out, tiny, model=str(broken)))
    assert r.code == 65, r.err
    assert str(broken) in one_error_line(r.err) and "weights" in r.err
    assert os.listdir(out) == []


@pytest.mark.parametrize("cmd", PROMPT_COMMANDS)
def test_checkpoint_without_weights_model_commands(cmd, tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    os.unlink(broken / "model.safetensors")
    src, out = setup(tmp_path, jsonl(prompts()))
    r = cli(argv_for(cmd, src, out, tiny, model=str(broken)))
    assert os.listdir(out) == []
    assert str(broken) in one_error_line(r.err)
    assert r.code == 65, r.err


@pytest.mark.parametrize("cmd", PROMPT_COMMANDS + ("train-step",))
def test_model_directory_not_found(cmd, tiny, tmp_path):
    src, out = setup(tmp_path, jsonl(base(cmd)))
    missing = tmp_path / "no-such-model"
    r = cli(argv_for(cmd, src, out, tiny, model=str(missing)))
    assert r.code == 2, r.err
    assert str(missing) in one_error_line(r.err)
    assert os.listdir(out) == []


def _loop_config(tmp_path: Path, tiny: str, extra: str) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(prompts()))
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{tiny}"\ntrain_data = "{data}"\nrun_dir = "{tmp_path / "run"}"\n'
                   f"{extra}\n")
    return cfg


@pytest.mark.parametrize("extra, words", [("learning_rate = 0.1", ["unknown config key 'learning_rate'"]),
                                          ("temprature = 0.5", ["'temprature'", "temperature"]),
                                          ('[train]\nlr = "fast"', ["train.lr", "a number"]),
                                          ("lr = 0.1", ["'lr'", "belongs in [train]"])])
def test_loop_bad_config_key(extra, words, tiny, tmp_path):
    cfg = _loop_config(tmp_path, tiny, extra)
    r = cli(["loop", "--config", cfg])
    assert r.code == 2, r.err
    msg = one_error_line(r.err)
    for w in words:
        assert w in msg, msg
    assert not (tmp_path / "run").exists()


def test_loop_unknown_flag_exit_2(tiny, tmp_path):
    cfg = _loop_config(tmp_path, tiny, "")
    r = cli(["loop", "--config", cfg, "--learning-rate", "3"])
    assert r.code == 2
    assert "--learning-rate" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["loop", "--learning-rate", "3"], ["build-tree", "--bogus"]])
def test_unknown_flag_is_one_line(argv):
    r = cli(argv)
    assert r.code == 2
    one_error_line(r.err)


# ----------------------------------------------------------------------------- real processes

@pytest.mark.parametrize("cmd", ["verify", "build-tree", "advantages", "show-tree"])
def test_real_process_stdin(cmd):
    """Exit status of the real process, stdin named <stdin>, and a traceback only with --debug."""
    recs = rollouts()
    recs[1]["token_ids"] = "31 40 1"
    recs[1]["text"] = 7
    args = [cmd] + (["--task", "arith", "--workers", "1"] if cmd == "verify" else [])
    r = run_tcli(args, input=jsonl(recs), timeout=60, fresh=True)
    assert r.returncode == 65, r.stderr
    fld = "text" if cmd == "verify" else "token_ids"
    assert f"<stdin>:2: field '{fld}'" in one_error_line(r.stderr.decode())
    assert r.stdout == b""
    d = run_tcli(args + ["--debug"], input=jsonl(recs), timeout=60, fresh=True)
    assert d.returncode != 0 and b"Traceback" in d.stderr and b"DataError" in d.stderr


# ----------------------------------------------------------------------------- no eval of model text

FORBIDDEN = re.compile(r"(?<![\w.])(eval|exec|compile|__import__)\s*\("  # the builtins, not .eval()
                       r"|\b(sympify|parse_expr)\s*\("                     # sympy: eval inside
                       r"|\b(pickle|marshal)\.loads?\s*\(")


def _code_only(path: Path) -> str:
    """The source with comments and string literals blanked out (docstrings may say 'eval()'),
    everything else in place, so ``model.eval(`` still reads as a method call."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    blank = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)}
    with open(path, "rb") as f:
        toks = [t for t in tokenize.tokenize(f.readline) if t.type in blank]
    for t in toks:
        (r0, c0), (r1, c1) = t.start, t.end
        for r in range(r0, r1 + 1):
            line = lines[r - 1]
            a = c0 if r == r0 else 0
            b = c1 if r == r1 else len(line.rstrip("\n"))
            lines[r - 1] = line[:a] + " " * (b - a) + line[b:]
    return "".join(lines)


def _calls(code: str, name: str) -> list[str]:
    """Argument text of every call ``name(...)`` (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\s*\(", code):
        depth, i = 1, m.end()
        while depth and i < len(code):
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        out.append(" ".join(code[m.end(): i - 1].split()))
    return out


def _imported(path: Path) -> str:
    """Every module and name the file's import statements mention, as one string."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [getattr(node, "module", None) or "", *(a.name for a in node.names)]
    return " ".join(names)


# The python tool's worker script runs model code on purpose, in a separate limited process
# (docs/design.md §9); it is run as a script there and never imported by tcli.
SANDBOX_BOOT = REPO / "tcli" / "tools" / "sandbox_boot.py"


def test_no_eval_or_exec_of_model_text():
    """Model output is untrusted: nothing in tcli/ evaluates strings as code (sympy's sympify and
    parse_expr call eval), unpickles, or torch.loads without weights_only=True. The one exception
    is the sandbox worker script, which no tcli module may import."""
    files = sorted((REPO / "tcli").rglob("*.py"))
    assert len(files) > 20 and SANDBOX_BOOT in files
    assert FORBIDDEN.search(_code_only(SANDBOX_BOOT))  # the exemption is still needed
    importers = [str(p.relative_to(REPO)) for p in files if "sandbox_boot" in _imported(p)]
    assert importers == [], importers
    hits, loads = [], []
    for p in files:
        if p == SANDBOX_BOOT:
            continue
        code = _code_only(p)
        hits += [f"{p.relative_to(REPO)}: {m.group(0)}" for m in FORBIDDEN.finditer(code)]
        for args in _calls(code, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", args):
                loads.append(f"{p.relative_to(REPO)}: torch.load({args})")
    assert not hits, hits
    assert not loads, loads
    # the checker itself finds what it looks for
    assert FORBIDDEN.search("x = eval (text)") and FORBIDDEN.search("sympy.sympify(s)")
    assert not FORBIDDEN.search("model.eval()")
    assert _calls("torch.load(os.path.join(a, b), weights_only=True)", "torch.load") == [
        "os.path.join(a, b), weights_only=True"]


# ----------------------------------------------------------------------------- bounded grouping

def test_seen_keys_is_an_exact_set_across_merges():
    from tcli.io import SeenKeys

    s = SeenKeys(batch=4)
    keys = [f"k{i}" for i in range(50)] + list(range(50)) + ["", "é", "\udcff"]
    assert all(s.add(k) for k in keys)
    assert len(s) == len(keys)
    assert not any(s.add(k) for k in keys)  # found in the recent set and in the merged array
    assert s.add("50") and s.add(50) and not s.add("50")  # "1" and 1 are different keys


def test_group_check_memory_per_group():
    """iter_groups over 60k single-record groups keeps ~8 bytes per group (a Python set of
    prompt ids needed ~90 and made peak memory grow with the stream, bench/bench_memory.py)."""
    import tracemalloc

    import numpy  # noqa: F401 - imported before tracing: its import is not the grouping's cost

    from tcli.io import SeenKeys, iter_groups

    SeenKeys().add("warm-up")

    n = 60_000
    recs = ((i + 1, {"prompt_id": f"prompt-{i:09d}", "sample_id": 0}) for i in range(n))
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_groups(recs, "<gen>"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 2.5e6, f"{peak / n:.0f} bytes per group"
