"""How a checkpoint is meant to be sampled, kept in its ``tcli_state.json`` under ``sampling``.

A model trained on plain prompts with short answers scores near zero when it is asked in the boxed
template or cut off at another length, and such a result looks valid. So whatever trains a
checkpoint (the loop, train-step, the SFT warm start) records the prompt template, the
chat-template choice, the response cap and the tools it was trained with
(``SampleOptions.RECORDED``), and
sample-tree, eval and loop use them wherever the user gave none; an explicit flag or TOML key wins.

Duck-typed on the options object (``RECORDED``, ``unset``, ``replace``, ``tools``,
``TOOLS_ONLY``, ``check_tools_read``), so this module needs neither the config package nor torch.
"""

from __future__ import annotations

import os

from tcli.errors import DataError, UsageError
from tcli.models.checkpoint import STATE_FILE, read_state

SAMPLING = "sampling"


def sampling_state(opts) -> dict:
    """What a checkpoint trained on samples drawn with ``opts`` records (None: not recorded)."""
    return {k: getattr(opts, k) for k in opts.RECORDED if getattr(opts, k) is not None}


def recorded_sampling(ckpt: str) -> dict:
    """The sampling settings a checkpoint directory records ({} when none, or not a directory)."""
    if not ckpt or not os.path.isdir(ckpt):
        return {}
    value = read_state(ckpt).get(SAMPLING, {})
    if not isinstance(value, dict):
        raise DataError(f"must be an object, got {type(value).__name__}",
                        file=os.path.join(ckpt, STATE_FILE), field=SAMPLING)
    return value


def with_recorded(opts, ckpt: str):
    """``opts`` with the recorded settings the user left unset taken from ``ckpt``, and a dict of
    those that change what would have been used (for :func:`notice`)."""
    rec = recorded_sampling(ckpt)
    take = {k: v for k, v in rec.items() if k in opts.unset and v is not None}
    try:
        out = opts.replace(**take)
    except UsageError as e:
        try:
            type(opts)().replace(**take)
        except UsageError:  # the file holds a value no flag could give
            raise DataError(f"recorded sampling settings are not usable: {e}",
                            file=os.path.join(ckpt, STATE_FILE), field=SAMPLING) from None
        # fine alone, not with what was given (recorded tools and --mode tree): the user's call
        raise UsageError(f"{e}; {ckpt} records {_used(take)} (give {_flags(take, opts)} to "
                         "override)") from None
    if not out.tools:  # the recorded tool settings would be read by nobody: not taken
        idle = {k: getattr(opts, k) for k in take if k in out.TOOLS_ONLY}
        take = {k: v for k, v in take.items() if k not in idle}
        out = out.replace(**idle)
    out.check_tools_read(ckpt if "tools" in opts.unset else "")
    return out, {k: getattr(out, k) for k in opts.RECORDED
                 if k in take and getattr(opts, k) != getattr(out, k)}  # compared as settings


def with_recorded_sampling(cfg, log):
    """A loop configuration whose ``[sample]`` settings left unset come from its start model,
    said in one ``log`` line."""
    import dataclasses

    sample, changed = with_recorded(cfg.sample, cfg.run.model)
    line = notice(changed, sample, " or [sample] keys in --config")
    if line:
        log(line)
    return dataclasses.replace(cfg, sample=sample)


def notice(changed: dict, opts, where: str = "") -> str:
    """One line saying which recorded values are used and how to override them ('' if none)."""
    if not changed:
        return ""
    flags = _flags(changed, opts)
    return f"using the checkpoint's {_used(changed)} (give {flags}{where} to override)"


def _used(values: dict) -> str:
    return ", ".join(f"{k}={_shown(v)}" for k, v in values.items())


def _flags(values: dict, opts) -> str:
    return "/".join(opts.flag(k) if not isinstance(v, bool) else f"--[no-]{opts.flag(k)[2:]}"
                    for k, v in values.items())


def _shown(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):   # a list setting, as its flag takes it
        return ",".join(map(str, v)) or "''"
    return repr(v) if isinstance(v, str) and not v.isidentifier() else str(v)
