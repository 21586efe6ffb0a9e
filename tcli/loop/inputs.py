"""What a loop reads besides its settings, checked before the run directory is touched: a missing
path is a usage error (exit 2) that names its setting and the TOML file that set it."""

from __future__ import annotations

import os

from tcli.config.loop import LoopConfig
from tcli.errors import DataError, UsageError
from tcli.prompts import read_prompts


def check_models(cfg: LoopConfig) -> None:
    """The reference model and the critic to start from exist and read the policy's token ids
    (they load only after the run directory is taken)."""
    from tcli.models.load import check_model_dir
    from tcli.models.provenance import check_same_vocabulary

    for key, path in (("train.ref_model", cfg.train.ref_model), ("critic.model", cfg.critic.model)):
        try:
            if path:
                check_model_dir(path)
                check_same_vocabulary(path, cfg.run.model)
        except UsageError as e:
            raise UsageError(f"{cfg.where(key)}: {e}") from None


def loop_prompts(cfg: LoopConfig, key: str, limit: int | None = None,
                 origin: dict | None = None) -> list[dict]:
    """The prompts of ``train_data`` or ``eval_data`` (``key``); a missing file names the key.
    ``origin`` gets where each was read (``read_prompts``). The ``[prompts]`` mapping is the train
    data's: eval records without a mapped field read the standard one (a benchmark's)."""
    try:
        return read_prompts(getattr(cfg.run, key), limit, cfg.prompts, origin,
                            standard=key == "eval_data")
    except UsageError as e:
        raise UsageError(f"{cfg.where(key)}: {e}") from None


def check_prompts_encode(cfg: LoopConfig, train: list[dict], evals: list[dict], locate) -> None:
    """The train and eval prompts encode as the loop will sample them, checked before the run
    directory is touched; ``locate`` names a bad one's file and line."""
    from tcli.models.files import max_positions
    from tcli.models.load import load_tokenizer
    from tcli.stages.evaluate import eval_sampling
    from tcli.stages.sample import check_prompts

    tok = load_tokenizer(cfg.run.model)
    if tok is None:
        return
    limit = max_positions(cfg.run.model)
    for prompts, opts in ((train, cfg.sample), (evals, eval_sampling(cfg.sample, cfg.eval))):
        try:
            check_prompts(tok, prompts, opts, limit)
        except DataError as e:
            raise locate(e, prompts) from None


def eval_is_train(cfg: LoopConfig) -> str | None:
    """A warning when ``eval_data`` is the file ``train_data`` reads (the held-out accuracy would
    be measured on training prompts), else None."""
    from tcli.io import resolve_data

    train, evals = (resolve_data(getattr(cfg.run, k)) for k in ("train_data", "eval_data"))
    if "-" in (train, evals):
        return None
    if os.path.realpath(train) != os.path.realpath(evals):
        return None
    return (f"warning: eval_data is the same file as train_data ({evals}): eval accuracy is "
            "measured on training prompts, not held-out ones")
