"""eval's -n (and the loop's --eval-n) is one declaration with sample-tree's --n: the same check
and short flag, its own help text (samples per prompt for accuracy and pass@k, not a tree mode)."""

from __future__ import annotations

import dataclasses

import pytest

from tcli.config.flags import help_text
from tcli.config.loop import LoopEvalOptions
from tcli.config.spec import spec_of
from tcli.config.stages import EvalOptions, SampleOptions
from tcli.errors import UsageError


def _field(cls, name):
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def test_eval_n_says_what_n_means_for_eval():
    for cls in (EvalOptions, LoopEvalOptions):
        text = help_text(cls, _field(cls, "n"))
        assert "pass@k" in text and "independent" not in text, text
    assert help_text(SampleOptions, _field(SampleOptions, "n")).startswith("independent:")


def test_eval_n_keeps_the_settings_check_and_short_flag():
    ev, sample = spec_of(_field(EvalOptions, "n")), spec_of(_field(SampleOptions, "n"))
    assert (ev.check, ev.short, ev.choices) == (sample.check, sample.short, sample.choices)
    with pytest.raises(UsageError, match=r"\(eval.n\) must be >= 1"):
        EvalOptions(n=0)
