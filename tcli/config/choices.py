"""The valid names and value checks that the stage settings refer to (config/stages.py).

Each choice list asks its registry when a name is checked or a help text is shown, so importing
config costs no torch and no engine.
"""

from __future__ import annotations

from tcli.errors import UsageError

MODES = ("independent", "tree")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
PARALLEL_MODES = ("ddp", "fsdp")
ENTROPY_THRESHOLD = 0.3  # --branch entropy defaults: real trees on countdown and arith (results)
MIN_SEGMENT = 0


def engine_names():
    from tcli.engines import ENGINES
    return ENGINES.names()


def branch_rule_names():
    from tcli.engines.trees import BRANCH_RULES
    return BRANCH_RULES.names()


def estimator_names():
    from tcli.algos.estimators import ESTIMATORS
    return ESTIMATORS.names()


def loss_agg_names():
    from tcli.algos.losses import LOSS_AGGREGATIONS
    return LOSS_AGGREGATIONS.names()


def ratio_level_names():
    from tcli.algos.losses import RATIO_LEVELS
    return RATIO_LEVELS.names()


def kl_estimator_names():
    from tcli.algos.losses import KL_ESTIMATORS
    return KL_ESTIMATORS.names()


def lr_schedule_names():
    from tcli.train.schedule import LR_SCHEDULES
    return LR_SCHEDULES.names()


def check_template(v: str) -> str | None:
    from tcli.prompts import PROMPT_TEMPLATES

    if v == "auto" or v in PROMPT_TEMPLATES or "{prompt}" in v:
        return None
    return f"must be auto, {', '.join(PROMPT_TEMPLATES)} or a string containing {{prompt}}"


def check_device(v: str | None) -> str | None:
    if v is None or v in DEVICES or (v.startswith("cuda:") and v[5:].isdigit()):
        return None
    return f"must be one of {', '.join(DEVICES)} or cuda:N, got {v!r}"


def check_tasks(v: tuple[str, ...]) -> str | None:
    from tcli.verifiers import check_task

    if not v:
        return "must name a verifier"
    if len(set(v)) < len(v):
        return f"names a verifier twice: {', '.join(v)}"
    for name in v:
        try:
            check_task(name)
        except UsageError as e:  # named by the setting (and the TOML file) like any other bad value
            return f"cannot be used: {e}"
    return None


def check_mode_settings(opts, name) -> None:
    """Settings of the other --mode (``opts.ignored_settings()``) would be ignored without a word:
    refused. ``name`` spells a setting: its flag (commands) or its label (the loop)."""
    ignored = opts.ignored_settings()
    if not ignored:
        return
    names, mode, it = ", ".join(map(name, ignored)), name("mode"), "them" if ignored[1:] else "it"
    if opts.mode == "tree":
        raise UsageError(f"{names} sets the samples per prompt of {mode} independent; a tree's "
                         f"leaves come from {name('width')} and {name('depth')}")
    raise UsageError(f"{names} shape{'' if ignored[1:] else 's'} a tree, but {mode} is "
                     f"{opts.mode}, which ignores {it}: give {mode} tree as well, or leave {it} out")
