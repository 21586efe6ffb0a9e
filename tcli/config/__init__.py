"""Every setting declared once (``spec``), per stage (``stages``), as flags (``flags``) and as the
loop's TOML tables (``loop``)."""

from tcli.config.stages import (AdvantageOptions, EvalOptions, PromptOptions,  # noqa: F401
                                SampleOptions, TrainOptions, VerifyOptions)
