"""`tcli plot`: the figure in the format its suffix names, corrupt metrics lines said on stderr,
and nothing plottable, a bad suffix or a missing directory an error instead of an empty file."""

from __future__ import annotations

import orjson
import pytest

from conftest import failed, run_tcli


def _run(tmp_path, name: str, lines: list[bytes]):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return d


GOOD = [orjson.dumps({"kind": "train", "step": s, "reward_mean": 0.1 * s, "wall_time": 2.0 * s})
        for s in range(1, 4)] + [orjson.dumps({"kind": "eval", "step": 3, "accuracy": 0.5,
                                               "wall_time": 7.0})]


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"),
                                          (".svg", b"<?xml")])
def test_the_suffix_picks_the_format_and_the_path_is_said(tmp_path, suffix, magic):
    run = _run(tmp_path, "run", GOOD[:2] + [b"{torn", b""] + GOOD[2:])
    out = tmp_path / f"fig{suffix}"
    r = run_tcli(["plot", str(run), "-o", str(out)])
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert out.read_bytes().startswith(magic)
    assert "metrics.jsonl:3: skipping a corrupt metrics line" in err and f"plot: {out}" in err
    assert not list(tmp_path.glob("*.tmp*"))


def test_nothing_to_plot_is_bad_data_and_writes_nothing(tmp_path):
    run = _run(tmp_path, "bad", [orjson.dumps({"kind": "train", "step": 1}),
                                 orjson.dumps({"kind": "train", "step": 2, "reward_mean": "x"})])
    out = tmp_path / "keep.png"
    out.write_bytes(b"mine")
    failed(run_tcli(["plot", str(run), "-o", str(out)]), 65, "nothing to plot", "metrics.jsonl")
    assert out.read_bytes() == b"mine"


@pytest.mark.parametrize("name,words", [("fig.jpeg", ["give a .png, .pdf or .svg"]),
                                        ("missing/fig.png", ["output directory does not exist"])])
def test_bad_outputs_are_usage_errors(tmp_path, name, words):
    run = _run(tmp_path, "run", GOOD)
    failed(run_tcli(["plot", str(run), "-o", str(tmp_path / name)]), 2, *words)


def test_runs_with_one_folder_name_are_drawn_apart(tmp_path):
    """runs/demo/tempo and runs/tools/tempo: two curves with the path parts that tell them
    apart, never one label for both (the second run drawn over the first)."""
    from tcli.plot import plot_runs, run_labels

    (tmp_path / "demo").mkdir()
    (tmp_path / "tools").mkdir()
    a, b = _run(tmp_path / "demo", "tempo", GOOD), _run(tmp_path / "tools", "tempo", GOOD)
    assert run_labels([str(a), str(b)]) == ["demo/tempo", "tools/tempo"]
    assert run_labels([str(a), str(tmp_path / "grpo")]) == ["tempo", "grpo"]
    assert run_labels([str(a), str(a)]) == ["tempo", "tempo (2)"]
    one = plot_runs([str(a)], str(tmp_path / "one.png"))
    assert plot_runs([str(a), str(b)], str(tmp_path / "two.png")) == 2 * one == 8
    assert plot_runs([str(a), str(b)], str(tmp_path / "l.png"), labels=["x", "x"]) == 8
