"""`tcli loop` configuration: top-level run keys plus one TOML table per stage.

    model = "runs/demo/sft"          # run settings (RunOptions) at the top
    steps = 60
    [sample]                         # SampleOptions, the same settings as `tcli sample-tree`
    n = 8
    [advantages]
    estimator = "tempo"
    [eval]                           # EvalOptions (+ every), flags --eval-*
    every = 10

Every key is also a flag, flat (``--temperature``, ``--estimator``), except the ``[eval]`` table's
(``--eval-n``) and names that two tables share (``--sample-device``, ``--train-device``).
Unknown keys and bad values are usage errors (exit 2) raised before anything touches disk.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Optional

from tcli.algos.estimators import ESTIMATORS, needs
from tcli.config.choices import check_mode_settings
from tcli.config.expand import ExpandOptions
from tcli.config.spec import (Options, at_least, coerce, finite_at_least, like, setting,
                              settings_of)
from tcli.config.stages import (AdvantageOptions, CriticOptions, EvalOptions, PromptOptions,
                                SampleOptions, TrainOptions, VerifyOptions)
from tcli.config.threads import ThreadOptions
from tcli.errors import UsageError


@dataclass(frozen=True)
class RunOptions(Options):
    """What a run trains, where it writes, and when it stops (the TOML file's top level)."""

    model: str = setting("", "Start checkpoint (a Hugging Face causal LM directory).")
    train_data: str = setting("", "Prompt records to train on (JSONL or Arrow: id, prompt, answer), "
                              "or a shipped benchmark name such as gsm8k_train.")
    eval_data: str = setting("", "Held-out prompt records for evaluation, or a shipped benchmark "
                             "name such as gsm8k (empty = no evaluation).")
    run_dir: str = setting("runs/run", "Run directory (checkpoints/, rollouts/, metrics.jsonl, "
                           "metrics.png).")
    steps: int = setting(20, "Training steps.", check=at_least(1))
    prompts_per_step: int = setting(16, "Prompts sampled per step.", check=at_least(1))
    filter_groups: bool = setting(False, "Dynamic sampling: drop groups whose rewards are all equal.")
    refill: bool = setting(False, "Dynamic sampling with refill: sample further prompts until the "
                           "step holds prompts_per_step groups whose rewards are not all equal, "
                           "and train on those only.")
    refill_max_rounds: int = setting(4, "refill: further sampling rounds per step at most; the "
                                     "step trains on what it holds when they run out.",
                                     check=at_least(0))
    refill_max_tokens: int = setting(0, "refill: start no further round once the step's further "
                                     "rounds sampled this many tokens (0 = no cap).",
                                     check=at_least(0))
    max_wall_seconds: float = setting(0.0, "Stop after this much wall time, evaluation and saving "
                                      "included (0 = off).", check=finite_at_least(0.0))
    max_sampled_tokens: int = setting(0, "Stop after sampling this many tokens (0 = off).",
                                      check=at_least(0))
    save_every: int = setting(1, "Write a checkpoint every N steps, at the last step and at a new "
                              "best; --resume restarts after the last one written.",
                              check=at_least(1))
    keep_last: int = setting(2, "Checkpoints kept besides best/.", check=at_least(1))
    tensorboard: str = setting("", "Also write the metrics as TensorBoard event files to this "
                               "directory (needs the tensorboard package).")
    trackers: tuple[str, ...] = setting(
        (), "Experiment trackers that also get every metric (same names as TensorBoard's: "
        "train/reward_mean), the resolved config and the git commit: tensorboard (event files in "
        "--tensorboard DIR, else RUN_DIR/trackers/tensorboard), wandb (files in RUN_DIR/trackers; "
        "WANDB_MODE=offline: no network, `wandb sync` later), mlflow (MLFLOW_TRACKING_URI, else a "
        "file store in RUN_DIR/trackers/mlruns). --resume continues the same tracker run. Each is "
        "an extra: pip install 'tcli[wandb]'.", choices=lambda: _tracker_names())
    seed: int = setting(0, "Random seed (same inputs + seed = same output).")
    threads: Optional[int] = like(ThreadOptions, "threads", None)

    def check(self) -> None:
        from tcli.trackers import require

        for name in self.trackers:  # a missing extra fails here, before anything touches disk
            require(name, self.label("trackers"))
        if self.tensorboard:
            require("tensorboard", self.label("tensorboard"))


def _tracker_names() -> list[str]:
    from tcli.trackers import TRACKERS

    return TRACKERS.names()


@dataclass(frozen=True)
class LoopEvalOptions(EvalOptions):
    """The loop's [eval] table: eval's settings plus how often to evaluate."""

    FLAG_PREFIX: ClassVar[str] = "eval-"

    every: int = setting(5, "Evaluate every N steps and after the last (0 = never).",
                         check=at_least(0))


@dataclass(frozen=True)
class LoopCriticOptions(CriticOptions):
    """The loop's [critic] table (used with estimator gae/ppo): train-critic's settings plus
    where the critic starts; flags --critic-*."""

    FLAG_PREFIX: ClassVar[str] = "critic-"

    model: str = setting("", "Critic to start from (default: a new one from the policy's "
                         "backbone, as `tcli init-critic`, saved as checkpoints/critic_0).")

    def update_options(self) -> CriticOptions:
        """The settings of one train-critic update (without where the critic starts)."""
        return CriticOptions(**{k: v for k, v in self.to_dict().items() if k != "model"})


# [sample] settings read in tree mode only
TREE_SETTINGS = SampleOptions.MODE_ONLY["tree"]

TABLES: dict[str, type[Options]] = {"prompts": PromptOptions, "sample": SampleOptions,
                                    "verify": VerifyOptions, "expand": ExpandOptions,
                                    "advantages": AdvantageOptions, "train": TrainOptions,
                                    "critic": LoopCriticOptions, "eval": LoopEvalOptions}


@dataclass(frozen=True)
class LoopConfig:
    run: RunOptions = field(default_factory=RunOptions)
    prompts: PromptOptions = field(default_factory=PromptOptions)
    sample: SampleOptions = field(default_factory=SampleOptions)
    verify: VerifyOptions = field(default_factory=VerifyOptions)
    expand: ExpandOptions = field(default_factory=ExpandOptions)
    advantages: AdvantageOptions = field(default_factory=AdvantageOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    critic: LoopCriticOptions = field(default_factory=LoopCriticOptions)
    eval: LoopEvalOptions = field(default_factory=LoopEvalOptions)
    # the TOML file each setting came from (by label), so that errors found later name it too
    origin: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.expand.check_sampling(self.sample.mode, SampleOptions.label("mode"))
        if self.expand.enabled and self.sample.tools:  # expand-tree refuses environment tokens
            raise UsageError(f"{ExpandOptions.label('tokens')} > 0 continues sampled trees, "
                             "not trajectories with tool results: not with "
                             f"{SampleOptions.label('tools')}")
        est = self.advantages.estimator
        if needs(est).tree_sampled and self.sample.mode != "tree":
            raise UsageError(f'{AdvantageOptions.label("estimator")} "{est}" needs tree-sampled '
                             'groups: set mode = "tree" in [sample] (--mode tree)')
        self._check_critic_used(est)
        self.advantages.check_read()
        self.train.check_used()
        self._check_mode_settings()
        self._check_sampler_weights()
        for name in ("refill_max_rounds", "refill_max_tokens"):  # read by refill only
            if not self.run.refill and getattr(self.run, name) != getattr(RunOptions(), name):
                raise UsageError(f"{RunOptions.label(name)} is set, but "
                                 f"{RunOptions.label('refill')} is off: set refill = true, or "
                                 "leave it out")
        if self.run.refill and self.sample.mode == "independent" and self.sample.n < 2:
            raise UsageError(f"{RunOptions.label('refill')} needs groups of 2 or more responses "
                             f"(a group of one is never informative): set {SampleOptions.label('n')}"
                             " >= 2")
        self._fill_schedule_span()

    def _check_critic_used(self, est: str) -> None:
        """[critic] settings under an estimator that trains no critic would change nothing."""
        if needs(est).critic:
            return
        default = LoopCriticOptions()
        changed = [k for k, v in self.critic.to_dict().items() if v != getattr(default, k)]
        if changed:
            users = ", ".join(n for n in ESTIMATORS.names() if needs(n).critic)
            raise UsageError(f"{LoopCriticOptions.label(changed[0])} is set, but "
                             f'{AdvantageOptions.label("estimator")} "{est}" trains no critic '
                             f"(only {users} do): leave the [critic] settings out, or choose one "
                             "of those")

    def check_eval_used(self) -> str | None:
        """[eval] settings without eval_data would change nothing: refused (every = 0, which
        asks for no evaluation, agrees with having none). With eval_data but every = 0 they are
        unread too: the warning to say (a run that turns a config file's evaluation off with
        --eval-every 0 is common), None when there is nothing to say. Checked when a loop
        starts, not when a configuration is read."""
        default = LoopEvalOptions()
        changed = [k for k, v in self.eval.to_dict().items()
                   if v != getattr(default, k) and not (k == "every" and v == 0)]
        if not changed or (self.run.eval_data and self.eval.every):
            return None
        labels = [LoopEvalOptions.label(k) for k in changed]
        files = {self.origin.get(label) for label in labels}
        names = (f"{files.pop()}: {', '.join(labels)}" if len(files) == 1 and None not in files
                 else ", ".join(self.where(f"eval.{k}") for k in changed))
        verb, it = ("is", "it") if len(changed) == 1 else ("are", "them")
        if self.run.eval_data:
            return (f"warning: {names} {verb} set, but {self.where('eval.every')} is 0, so the "
                    f"loop never evaluates and ignores {it}")
        raise UsageError(f"{names} {verb} set, but {RunOptions.label('eval_data')} is empty, so "
                         "the loop never evaluates: set eval_data, or leave the [eval] settings "
                         "out")

    def _check_sampler_weights(self) -> None:
        """The loop's hf engine samples from the trainer's own float32 weights on the trainer's
        device (an unsharded copy in [sample] dtype only under torchrun with parallel = "fsdp"):
        a [sample] device, or dtype without fsdp, would be ignored without a word."""
        if self.sample.engine != "hf":
            return
        ignored = [k for k in ("device", "dtype") if getattr(self.sample, k) is not None
                   and not (k == "dtype" and self.train.parallel == "fsdp")]
        if ignored:
            raise UsageError(f"{_loop_label('sample.' + ignored[0])} is set, but the loop's hf "
                             "engine samples from the trainer's own weights (float32, on "
                             f"{_loop_label('train.device')}): leave it out, or sample with "
                             f"{_loop_label('sample.engine')} vllm")

    def _check_mode_settings(self) -> None:
        """[sample] settings of the other mode would be ignored without a word: refused."""
        check_mode_settings(self.sample, SampleOptions.label)

    def _fill_schedule_span(self) -> None:
        """The lr schedule spans the run unless set (fixed in config.toml, so a resumed run
        continues the same schedule); a run longer than a span that decays to lr 0 is refused:
        its last steps would change nothing."""
        t = self.train
        total = self.run.steps * t.epochs * t.mini_batches
        if not t.schedule_steps:
            object.__setattr__(self, "train", t.replace(schedule_steps=total))
        elif t.lr_schedule != "constant" and t.min_lr_ratio == 0 and t.schedule_steps < total:
            raise UsageError(
                f"{RunOptions.label('steps')} {self.run.steps} makes {total} optimizer steps, more "
                f"than {t.label('schedule_steps')} {t.schedule_steps}: the {t.lr_schedule} lr "
                f"schedule reaches 0 there, so the steps after it would train at lr 0; set "
                f"{t.label('schedule_steps')} >= {total} (a resumed run keeps the span of its "
                f"first steps) or {t.label('min_lr_ratio')} > 0")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in ("run", *TABLES)}

    def where(self, key: str) -> str:
        """How an error names the setting ``key`` ("model", "train.ref_model"): its flag and
        TOML key, after the TOML file that set it."""
        table, _, name = key.rpartition(".")
        label = (TABLES[table] if table else RunOptions).label(name)  # as origin knows it
        shown = _loop_label(key)
        return f"{self.origin[label]}: {shown}" if label in self.origin else shown


# ----------------------------------------------------------------------------- flags

@dataclass(frozen=True)
class LoopFlag:
    table: str            # "" for run settings
    cls: type
    name: str             # the setting's field name
    flag: str             # --temperature
    param: str            # temperature


def loop_flags() -> list[LoopFlag]:
    """Every loop setting as a flag; names two tables share get the table as a prefix."""
    items = [("", RunOptions)] + list(TABLES.items())
    flat = [(t, c, f.name, c.flag(f.name)) for t, c in items for f in settings_of(c)]
    counts: dict[str, int] = {}
    for *_, flag in flat:
        counts[flag] = counts.get(flag, 0) + 1
    out = []
    for table, cls, name, flag in flat:
        if counts[flag] > 1:
            flag = f"--{table}-{name}".replace("_", "-")
        out.append(LoopFlag(table, cls, name, flag, flag[2:].replace("-", "_")))
    return out


def _loop_label(key: str) -> str:
    """How loop errors name the setting ``key``: its loop flag (``--sample-device`` where two
    tables share the name) and its TOML key."""
    table, _, name = key.rpartition(".")
    flag = next(f.flag for f in loop_flags() if (f.table, f.name) == (table, name))
    return f"{flag} ({key})"


# ----------------------------------------------------------------------------- TOML

def _unknown(key: str, table: str, source: str) -> UsageError:
    where = f"[{table}]" if table else "the top level"
    here = [f.name for f in settings_of(TABLES[table] if table else RunOptions)]
    elsewhere = [t or "top level" for t, c in [("", RunOptions), *TABLES.items()]
                 if t != table and key in {f.name for f in settings_of(c)}]
    close = difflib.get_close_matches(key, here, n=3)
    if elsewhere:
        hint = f"; it belongs in {', '.join(f'[{t}]' if t != 'top level' else t for t in elsewhere)}"
    elif close:
        hint = f"; did you mean {', '.join(close)}?"
    else:
        other = difflib.get_close_matches(key, [f.name for c in TABLES.values()
                                                for f in settings_of(c)], n=1)
        table = next((t for t, c in TABLES.items() for f in settings_of(c)
                      if other and f.name == other[0]), "")
        hint = f"; did you mean {other[0]} in [{table}]?" if other else ""
    return UsageError(f"{source}: unknown config key {key!r} in {where}{hint}")


def _split(data: dict, source: str) -> Iterator[tuple[str, str, Any]]:
    """(table, key, value) for every setting in a parsed TOML document."""
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in TABLES:
                raise UsageError(f"{source}: unknown table [{key}]; valid: {', '.join(TABLES)}")
            for k, v in value.items():
                yield key, k, v
        else:
            yield "", key, value


def read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"config file is a directory: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: invalid TOML ({e})") from None


def load_config(path: str | None, flags: dict[str, Any] | None = None) -> LoopConfig:
    """A validated LoopConfig from a TOML file (optional) and flag values (None = not given)."""
    values: dict[str, dict[str, Any]] = {t: {} for t in ("", *TABLES)}
    origin: dict[str, str] = {}
    if path:
        for table, key, value in _split(read_toml(path), path):
            cls = TABLES[table] if table else RunOptions
            if key not in {f.name for f in settings_of(cls)}:
                raise _unknown(key, table, path)
            values[table][key] = coerce(cls, key, value, f"{path}: {cls.label(key)}")
            origin[cls.label(key)] = path
    by_param = {lf.param: lf for lf in loop_flags()}
    for param, value in (flags or {}).items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue  # not given (click gives a list flag that is not given as empty)
        if param not in by_param:
            raise UsageError(f"unknown loop setting {param!r}")
        lf = by_param[param]
        values[lf.table][lf.name] = value
        origin.pop(lf.cls.label(lf.name), None)
    try:
        parts = {t: c.given(values[t]) for t, c in TABLES.items()}  # unset: the checkpoint's
        return LoopConfig(run=RunOptions(**values[""]), **parts, origin=origin)
    except UsageError as e:
        raise _in_file(e, origin) from None


def resume_config(run_dir: str, flags: dict) -> LoopConfig:
    """The run's own config.toml, with flags overriding it for this invocation (the run stays in
    its own directory)."""
    path = os.path.join(run_dir, "config.toml")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir} is not a tcli run directory (no config.toml)")
    other = flags.get("run_dir")
    if other and os.path.realpath(other) != os.path.realpath(run_dir):
        raise UsageError(f"{RunOptions.flag('run_dir')} {other} with --resume {run_dir}: a resumed "
                         f"run stays in its own directory (a new run in {other}: --config "
                         f"{path} {RunOptions.flag('run_dir')} {other})")
    return load_config(path, {**flags, "run_dir": run_dir})


def resume_changes(cfg: LoopConfig) -> dict[str, tuple[Any, Any]]:
    """The settings ``cfg`` (a resume's) changes from the run's config.toml, which keeps its own
    for the next resume: ``{"advantages.estimator": (config.toml's, cfg's)}`` (run settings
    without a table)."""
    saved = load_config(os.path.join(cfg.run.run_dir, "config.toml"), {"run_dir": cfg.run.run_dir})
    out = {}
    for name in ("run", *TABLES):
        old, new = getattr(saved, name).to_dict(), getattr(cfg, name).to_dict()
        out.update({k if name == "run" else f"{name}.{k}": (old[k], new[k]) for k in old
                    if new[k] != old[k]})
    return out


def changed_on_resume(cfg: LoopConfig) -> list[str]:
    """:func:`resume_changes` for the log, so neither the change nor its reversal at the next
    resume goes unseen."""
    out = []
    for key, (old, new) in resume_changes(cfg).items():
        table, _, name = key.rpartition(".")
        out.append(f"{(TABLES[table] if table else RunOptions).label(name)} {new!r} "
                   f"(config.toml: {old!r})")
    return out


def _in_file(e: UsageError, origin: dict[str, str]) -> UsageError:
    """A bad value names the TOML file it came from (errors name settings by their labels)."""
    return next((UsageError(f"{path}: {e}") for label, path in origin.items() if label in str(e)),
                e)


def _toml_value(v: Any) -> str:
    if isinstance(v, tuple):  # a list setting; one item is written as itself (task = "auto")
        return _toml_value(v[0]) if len(v) == 1 else f"[{', '.join(map(_toml_value, v))}]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # settings are validated finite
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def dump_toml(cfg: LoopConfig) -> str:
    """The resolved configuration, loadable by load_config (None values are left out)."""
    lines = ["# resolved tcli loop configuration"]
    for name in ("run", *TABLES):
        if name != "run":
            lines += ["", f"[{name}]"]
        for k, v in getattr(cfg, name).to_dict().items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def config_fields() -> list[str]:
    """Every TOML key as table.key (run keys without a table)."""
    return [f"{lf.table}.{lf.name}" if lf.table else lf.name for lf in loop_flags()]


