"""`tcli loop` configuration: one dataclass, read from TOML, every key also a command-line flag.

Unknown keys are a usage error (exit 2) naming the key and the closest valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, fields
from typing import Any, Optional

from tcli.errors import UsageError


@dataclass
class LoopConfig:
    # data and model
    model: str = ""                       # HF causal LM directory (start checkpoint)
    train_data: str = ""                  # prompt records (JSONL) to sample from
    eval_data: str = ""                   # held-out prompt records
    run_dir: str = "runs/run"
    task: str = "auto"                    # verifier: auto | math | gsm8k | choice | arith | python:mod:fn
    prompt_template: str = "plain"        # preset name or a string with {prompt}
    chat_template: Optional[bool] = None  # None = use the tokenizer's template when it has one
    engine: str = "hf"
    # budget
    steps: int = 20
    max_wall_seconds: float = 0.0         # 0 = no wall-clock budget
    max_sampled_tokens: int = 0           # 0 = no token budget
    # sampling
    prompts_per_step: int = 16
    mode: str = "independent"             # independent | tree
    n: int = 8                            # responses per prompt (independent mode)
    width: int = 2                        # tree mode
    depth: int = 3
    segment_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    batch_tokens: int = 65536
    filter_groups: bool = False           # dynamic sampling: drop zero-variance groups
    # verification
    verify_timeout: float = 5.0
    verify_workers: int = 1               # worker processes with a hard timeout; 0 = in-process, no timeout
    # advantages
    estimator: str = "tempo"
    std: str = "unbiased"
    td_coef: float = 1.0
    norm: str = "std"
    prune_std: float = 0.0
    # training
    lr: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0
    loss_agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    epochs: int = 1
    mini_batches: int = 1
    micro_batch_tokens: int = 16384
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    # evaluation and checkpoints
    eval_every: int = 5
    eval_limit: int = 200
    eval_n: int = 1                       # samples per eval prompt (1 = greedy)
    eval_temperature: float = 0.0
    keep_last: int = 2
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    return [f.name for f in fields(LoopConfig)]


def _check_keys(d: dict, source: str) -> None:
    valid = field_names()
    for k in d:
        if k not in valid:
            close = difflib.get_close_matches(k, valid, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"{source}: unknown config key {k!r}{hint}")


def _coerce(name: str, value: Any) -> Any:
    """Check a TOML/flag value against the field's type (ints are accepted for floats)."""
    default = getattr(LoopConfig(), name)
    if value is None:
        return None
    typ = type(default) if default is not None else bool
    if typ is bool and not isinstance(value, bool):
        raise UsageError(f"config key {name!r} must be true or false, got {value!r}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UsageError(f"config key {name!r} must be {typ.__name__}, got {value!r}")
    return value


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> LoopConfig:
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise UsageError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"{path}: invalid TOML ({e})") from None
        # allow [loop] tables or flat files
        if "loop" in data and isinstance(data["loop"], dict):
            data = {**{k: v for k, v in data.items() if k != "loop"}, **data["loop"]}
        _check_keys(data, path)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(overrides, "command line")
    merged = {**data, **overrides}
    return LoopConfig(**{k: _coerce(k, v) for k, v in merged.items()})


def dump_toml(cfg: LoopConfig) -> str:
    lines = ["# resolved tcli loop configuration"]
    for k, v in cfg.to_dict().items():
        if v is None:
            continue
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        else:
            s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{k} = "{s}"')
    return "\n".join(lines) + "\n"
