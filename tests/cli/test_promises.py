"""Promises of docs/design.md checked end to end: settings that would change nothing are never
silently ignored."""

from __future__ import annotations

from conftest import loop_config, read_metrics


def test_eval_settings_with_eval_every_0_are_said_to_be_ignored(loop_model, tmp_path):
    """With eval_data but every = 0 the other [eval] settings are unread: the loop runs (a config
    file's evaluation turned off by --eval-every 0 is common) and says so, naming them."""
    from tcli.loop import run_loop

    said: list[str] = []
    cfg = loop_config(loop_model, tmp_path / "run", steps=1, eval_every=0, eval_limit=3,
                      eval_temperature=0.5)
    run_loop(cfg, log=said.append)
    warning = [s for s in said if "eval.every" in s]
    assert len(warning) == 1, said
    assert warning[0].startswith("warning: --eval-temperature (eval.temperature), --eval-limit "
                                 "(eval.limit) are set")
    assert "never evaluates" in warning[0]
    assert [m["kind"] for m in read_metrics(tmp_path / "run")] == ["train"]


def test_eval_every_0_alone_says_nothing(loop_model, tmp_path):
    from tcli.loop import run_loop

    said: list[str] = []
    run_loop(loop_config(loop_model, tmp_path / "run", steps=1, eval_every=0), log=said.append)
    assert not [s for s in said if "eval" in s], said
