"""The settings of every stage, each declared once (default, help, check).

``tcli sample-tree``, ``verify``, ``advantages``, ``train-step`` and ``eval`` take their flags from
these classes, and ``tcli loop`` takes its ``[sample]``, ``[verify]``, ``[advantages]``, ``[train]``
and ``[eval]`` tables from the same classes, so the pipeline and the loop cannot drift apart.
Config sits above what it validates: engines, algos, train and verifiers take plain values or
these objects (duck-typed) and never import config. Registries are imported only when a name is
checked or a help text is shown (no torch here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from tcli.config.choices import (
    MODES, DTYPES, PARALLEL_MODES, ENTROPY_THRESHOLD, MIN_SEGMENT,
    engine_names, branch_rule_names, estimator_names, loss_agg_names, ratio_level_names,
    kl_estimator_names, lr_schedule_names, check_template, check_device, check_tasks,
)
from tcli.config.spec import (Options, at_least, finite, finite_at_least, in_range, like, setting)
from tcli.config.tools import ToolOptions
from tcli.engines.sampling import GRAPH_MODES, SamplingConfig
from tcli.errors import UsageError

_TEMPLATE_HELP = ("Prompt template: auto (choice when the record has choices, else boxed), boxed, "
                  "choice, plain, or a string with {prompt} (and optionally {choices}).")


@dataclass(frozen=True)
class SampleOptions(ToolOptions):
    """How responses are drawn (sample-tree, eval, loop); the tool settings are ToolOptions'."""

    TABLE: ClassVar[str] = "sample"
    # how prompts are rendered, how long answers may be and which tools they may call: what a
    # checkpoint was trained with records these, and a stage the user gives none of them uses the
    # checkpoint's
    RECORDED: ClassVar[tuple[str, ...]] = ("prompt_template", "chat_template", "max_new_tokens",
                                           "tools", "tool_format", "max_turns")
    # the settings one --mode reads and the other ignores
    MODE_ONLY: ClassVar[dict[str, tuple[str, ...]]] = {
        "independent": ("n",),
        "tree": ("width", "depth", "segment_tokens", "branch", "branch_entropy",
                 "min_segment_tokens")}

    engine: str = setting("hf", "Generation engine.", choices=engine_names)
    mode: str = setting("independent", "independent (n samples per prompt) or tree (TreeRPO).",
                        choices=lambda: MODES)
    n: int = setting(8, "independent: samples per prompt.", check=at_least(1), short="-n")
    width: int = setting(2, "tree: children drawn from every node.", check=at_least(1))
    depth: int = setting(3, "tree: levels; the last runs to EOS or --max-new-tokens "
                         "(--branch entropy: splits per path at most; leaves <= width^depth).",
                         check=at_least(1))
    segment_tokens: int = setting(32, "tree: max tokens per segment of levels 1..depth-1 "
                                  "(--branch entropy on an engine without native entropy trees, "
                                  "e.g. vllm: tokens decoded per probe).", check=at_least(1))
    branch: str = setting("segments", "tree: where a node splits into --width children. "
                          "segments: after every --segment-tokens tokens; entropy: at the first "
                          "token, after --min-segment-tokens of the node's segment, whose sampling "
                          "entropy exceeds --branch-entropy (each child samples that token), at "
                          "most --depth splits per path, no split = one path; tool (with --tools): "
                          "at the root and right after each tool result, at most --depth splits "
                          "per path.",
                          choices=branch_rule_names)
    branch_entropy: float = setting(ENTROPY_THRESHOLD, "--branch entropy: threshold in nats. The "
                                    "sampling entropy of a token is that of softmax(logits / T), "
                                    "the distribution it is drawn from before top-p (the one whose "
                                    "log-probs are recorded; T = 1 when greedy); exact on hf, "
                                    "estimated from the top-20 log-probs on other engines (a "
                                    "lower bound).", check=finite_at_least(0.0))
    min_segment_tokens: int = setting(MIN_SEGMENT, "--branch entropy: tokens a segment holds "
                                      "before it may split (0: the root may split at the first "
                                      "response token; a child's segment always holds its own "
                                      "first token).", check=at_least(0))
    record_entropy: bool = setting(False, "Add `entropies` to every rollout record: the sampling "
                                   "entropy (nats, see --branch-entropy) of each response token.")
    temperature: float = setting(SamplingConfig.temperature, "Sampling temperature; 0 = greedy.",
                                 check=finite_at_least(0.0))
    top_p: float = setting(SamplingConfig.top_p, "Nucleus sampling mass (1 = off).",
                           check=in_range(0.0, 1.0, lo_open=True))
    max_new_tokens: int = setting(SamplingConfig.max_new_tokens, "Max response tokens (the whole "
                                  "path in tree mode).", check=at_least(1))
    min_new_tokens: int = setting(SamplingConfig.min_new_tokens, "EOS is masked before this many "
                                  "tokens.", check=at_least(0))
    prompt_template: str = setting("auto", _TEMPLATE_HELP, check=check_template)
    chat_template: Optional[bool] = setting(
        None, "Wrap the prompt in the tokenizer's chat template (default: when it has one).")
    batch_tokens: Optional[int] = setting(None, "hf: memory bound, max cached tokens (rows x "
                                          "length) per forward batch (default: 65536 on a CPU, "
                                          "a quarter of the free memory on CUDA).",
                                          check=at_least(1))
    prompts_per_batch: int = setting(16, "Prompts per engine call (their frontier nodes are "
                                     "batched together).", check=at_least(1))
    device: Optional[str] = setting(None, "hf: auto, cpu, cuda or cuda:N (default auto).",
                                    check=check_device)
    dtype: Optional[str] = setting(None, "Weights dtype for sampling (default float32).",
                                   choices=lambda: DTYPES)
    cuda_graphs: str = setting("auto", "hf: replay the one-token decode step as CUDA graphs "
                               "(auto: on CUDA; on: needs CUDA).", choices=lambda: GRAPH_MODES)
    gpu_memory_utilization: float = setting(0.9, "vllm: fraction of the GPU's memory its engine "
                                            "takes (weights + KV cache); lower it when the "
                                            "trainer shares the GPU (loop, one GPU).",
                                            check=in_range(0.0, 1.0, lo_open=True))

    def check(self) -> None:
        self.check_tools()
        if self.min_new_tokens > self.max_new_tokens:  # EOS could never be drawn
            raise UsageError(f"{self.label('min_new_tokens')} {self.min_new_tokens} is above "
                             f"{self.label('max_new_tokens')} {self.max_new_tokens}")
        if self.cuda_graphs == "on" and self.device == "cpu":
            raise UsageError(f"{self.label('cuda_graphs')} on needs a CUDA device, got "
                             f"{self.label('device')} cpu")
        if (self.mode == "tree" and self.branch == "entropy"
                and self.min_segment_tokens >= self.max_new_tokens):  # no token could split
            raise UsageError(f"{self.label('min_segment_tokens')} must be below "
                             f"{self.label('max_new_tokens')} with --branch entropy, got "
                             f"{self.min_segment_tokens} >= {self.max_new_tokens}")

    def ignored_settings(self) -> list[str]:
        """The settings of the other --mode changed from their defaults: this mode would ignore
        them without a word (the defaults are all a command line or a resolved config.toml can be
        compared with)."""
        default = SampleOptions()
        return [k for mode, keys in self.MODE_ONLY.items() if mode != self.mode for k in keys
                if getattr(self, k) != getattr(default, k)]

    def engine_config(self, seed: int) -> SamplingConfig:
        """The settings of one engine call."""
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens,
                              min_new_tokens=self.min_new_tokens, seed=seed)


@dataclass(frozen=True)
class PromptOptions(Options):
    """Which fields of a prompt record hold the id, the prompt and the gold answer (for data sets
    with another schema; a record with chat ``messages`` instead of a prompt is used as is)."""

    TABLE: ClassVar[str] = "prompts"

    id_field: str = setting("id", "Field holding the prompt id.")
    prompt_field: str = setting("prompt", "Field holding the prompt text.")
    answer_field: str = setting("answer", "Field holding the gold answer.")


@dataclass(frozen=True)
class VerifyOptions(Options):
    """How answers are scored (verify, eval, loop)."""

    TABLE: ClassVar[str] = "verify"

    task: tuple[str, ...] = setting(
        ("auto",), "Verifier: auto (per record, the first that fits: choices -> choice; "
        "meta.source tcli-arith -> arith, tcli-countdown -> countdown's own; a GSM8K/GSM-Hard "
        "source, a gold ending '#### 72', or a one-number gold of a prompt that did not ask for "
        "\\boxed{} -> gsm8k; else math), a registered name (math, gsm8k, choice, arith) "
        "or python:module:function. Several (-t a -t b; a list in TOML) all score every record: "
        "reward = their weighted sum (--weights), rewards and verdicts = each one's by name.",
        check=check_tasks, short="-t")
    weights: tuple[float, ...] = setting(
        (), "Several tasks: the weight of each task's reward, in order (1,0.2; a list in TOML), "
        "one per task. Default: 1 each.",
        check=lambda v: next((finite(w) for w in v if finite(w)), None))
    timeout: float = setting(5.0, "Hard limit per answer in seconds: a verifier still running is "
                             "killed and the record scores 0 with verdict.error = 'timeout' "
                             "(arith and gsm8k, bounded by design, run in this process and score "
                             "so when they return).",
                             check=lambda v: None if 0 < v < float("inf")
                             else f"must be a finite number > 0, got {v}")
    workers: Optional[int] = setting(None, "Verifier processes (default: all cores); 0 = in this "
                                     "process without a timeout (debugging).", check=at_least(0),
                                     short="-j")
    max_verifier_errors: float = setting(
        0.0, "Largest share (0-1) of answers, of the input or of a loop step's batch, on which "
        "the verifier may crash (raise, return a non-number, exit) before verification fails "
        "with exit 1. Default 0: a crash is a bug in the verifier, not a wrong answer, so the "
        "first one stops the run instead of training on rewards of 0. Crashed records score 0 "
        "with verdict.crashed = true; every answer crashing always fails; time-outs are the "
        "answer's fault and never count (several tasks: the share of each verifier).",
        check=in_range(0.0, 1.0))

    def check(self) -> None:
        if self.weights and len(self.weights) != len(self.task):
            raise UsageError(f"{self.label('weights')} needs one weight per task "
                             f"({len(self.task)}: {', '.join(self.task)}), got "
                             f"{len(self.weights)}")


@dataclass(frozen=True)
class AdvantageOptions(Options):
    """How rewards become per-token advantages (advantages, loop); docs/design.md §4."""

    TABLE: ClassVar[str] = "advantages"

    estimator: str = setting("tempo", "Advantage estimator (reinforce_pp and "
                             "reinforce_pp_baseline normalise over the whole input, or the "
                             "loop's step, as whiten does).", choices=estimator_names, short="-e")
    std: str = setting("unbiased", "Group std: unbiased (divides by G-1) or population (G).",
                       choices=lambda: ("unbiased", "population"))
    td_coef: float = setting(1.0, "TEMPO: weight lambda of the TD correction.", check=finite)
    norm: str = setting("std", "TreeRPO: normalise siblings by std or only subtract the mean.",
                        choices=lambda: ("std", "mean"))
    prune_std: float = setting(0.0, "TreeRPO: sibling groups with std below this get 0.",
                               check=finite_at_least(0.0))
    gamma: float = setting(1.0, "GAE: discount per token.", check=in_range(0.0, 1.0))
    lam: float = setting(0.95, "GAE: lambda (0 = one-step TD, 1 = Monte Carlo).",
                         check=in_range(0.0, 1.0))
    overlong_buffer: int = setting(0, "Overlong reward shaping (DAPO): a response longer than "
                                   "its sampling cap (the record's max_new_tokens) minus this many "
                                   "tokens is penalised, linearly from 0 to -overlong_penalty at "
                                   "the cap, before the estimator sees its reward (the record's "
                                   "reward is kept); 0 = off.", check=at_least(0))
    overlong_penalty: float = setting(1.0, "Overlong shaping: the penalty of a response that "
                                      "reaches the cap.", check=finite_at_least(0.0))
    whiten: bool = setting(False, "Normalise advantages to mean 0, std 1 over all tokens of the "
                           "input (buffers the whole input; PPO practice).")

    def check_read(self) -> None:
        """A setting the estimator never reads (``--lam`` with tempo; its registry entry's
        ``reads``) would change nothing: refused (user-facing commands call this)."""
        from tcli.algos.estimators import ESTIMATORS, needs
        default, names, reads = type(self)(), ESTIMATORS.names(), needs(self.estimator).reads
        for name in sorted({k for e in names for k in needs(e).reads}):
            if name not in reads and getattr(self, name) != getattr(default, name):
                readers = ", ".join(e for e in names if name in needs(e).reads)
                raise UsageError(f'{self.label(name)} is set, but {self.label("estimator")} '
                                 f'"{self.estimator}" does not read it (only {readers} '
                                 f'{"do" if "," in readers else "does"}): '
                                 "leave it out, or choose one of those")


@dataclass(frozen=True)
class TrainOptions(Options):
    """One policy-gradient update (train-step, loop); defaults as in the TEMPO paper."""

    TABLE: ClassVar[str] = "train"

    lr: float = setting(1e-6, "AdamW learning rate.", check=finite_at_least(0.0))
    lr_schedule: str = setting("constant", "Learning rate after warm-up, per optimizer step: "
                               "constant, or linear / cosine decay to min_lr_ratio x lr at "
                               "schedule_steps.", choices=lr_schedule_names)
    warmup_steps: int = setting(0, "Optimizer steps of linear warm-up (step k, 0-based, uses "
                                "lr x (k+1) / warmup_steps).", check=at_least(0))
    min_lr_ratio: float = setting(0.0, "linear/cosine: the final lr as a fraction of lr.",
                                  check=in_range(0.0, 1.0))
    schedule_steps: int = setting(0, "Optimizer steps the schedule spans, warm-up included, "
                                  "counted by the checkpoint's optimizer_steps (chained "
                                  "train-steps and loop --resume continue it exactly). "
                                  "train-step: needed by linear/cosine; loop: 0 = steps x "
                                  "epochs x mini_batches.", check=at_least(0))
    ratio_level: str = setting("token", "Importance ratio: token (PPO: pi/pi_old per token) or "
                               "sequence (GSPO: s = exp(mean over the response's tokens of "
                               "log pi - log pi_old), one clipped ratio for all its tokens; "
                               "GSPO's own objective also averages per response: loss_agg "
                               "seq-mean-token-mean).",
                               choices=ratio_level_names)
    clip_low: Optional[float] = setting(None, "Clip: ratio lower bound 1 - eps_low. Default: the "
                                        "ratio level's (token 0.2, sequence 3e-4).",
                                        check=in_range(0.0, 1.0, hi_open=True))
    clip_high: Optional[float] = setting(None, "Clip: ratio upper bound 1 + eps_high. Default: "
                                         "the ratio level's (token 0.28, sequence 4e-4).",
                                         check=finite_at_least(0.0))
    dual_clip: float = setting(3.0, "Dual-clip bound c for A < 0 (0 = off).",
                               check=lambda v: None if v == 0 or (v > 1 and v < float("inf"))
                               else f"must be > 1 (or 0 to disable), got {v}")
    loss_agg: str = setting("token-mean", "Loss aggregation.", choices=loss_agg_names)
    mask_truncated: bool = setting(False, "Leave responses that hit the length cap "
                                   "(finish_reason length) out of the loss: no policy loss, no KL, "
                                   "and not counted by the loss aggregation's denominator.")
    tis_cap: float = setting(0.0, "Truncated importance sampling against sampler/trainer "
                             "mismatch (another engine or precision): recompute the policy's own "
                             "log-probs before the update (pi_train_old), use them in the ratio, "
                             "and weight each token's loss by min(pi_train_old / pi_sampler, C) "
                             "with C this cap; 0 = off. The mismatch metrics are reported "
                             "either way.", check=lambda v: None if v == 0 or 1 <= v < float("inf")
                             else f"must be >= 1 (or 0 to disable), got {v}")
    kl_coef: float = setting(0.0, "Weight of the KL-to-reference term (needs --ref-model).",
                             check=finite_at_least(0.0))
    kl_estimator: str = setting("k3", "KL estimator.", choices=kl_estimator_names)
    ref_model: Optional[str] = setting(None, "Reference model directory (KL is reported whenever "
                                       "given).")
    epochs: int = setting(1, "Passes over the rollouts.", check=at_least(1))
    mini_batches: int = setting(1, "Optimizer steps per epoch (the rollouts are split into this "
                                "many mini-batches).", check=at_least(1))
    micro_batch_tokens: int = setting(2048, "Tokens per forward/backward (gradient "
                                      "accumulation above that): unique packed tokens with "
                                      "share_prefix, padded tokens without. Activation memory "
                                      "grows with it (SmolLM2-135M: 5.3 GB peak at 2048, 7.4 GB "
                                      "at 16384; --grad-checkpointing lowers it).",
                                      check=at_least(1))
    share_prefix: bool = setting(True, "Run each prompt's responses as one packed prefix tree "
                                 "(shared prompt and segments computed once, tree attention "
                                 "mask, no padding); off = one right-padded row per response.")
    max_grad_norm: float = setting(1.0, "Gradient-norm clip (0 = none).", check=finite_at_least(0.0))
    weight_decay: float = setting(0.0, "AdamW weight decay.", check=finite_at_least(0.0))
    bf16: bool = setting(False, "bfloat16 autocast (fp32 master weights).")
    grad_checkpointing: bool = setting(False, "Recompute activations in backward to save memory.")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.", check=check_device)
    parallel: str = setting("ddp", "Under torchrun: ddp (every rank holds the whole model) or "
                            "fsdp (FSDP2: weights, gradients and AdamW state sharded over the "
                            "ranks, one all-gather group per decoder layer).",
                            choices=lambda: PARALLEL_MODES)
    lora_rank: int = setting(0, "LoRA rank (peft): train only low-rank adapters, saved as an "
                             "adapter directory that names its base model; 0 = all weights.",
                             check=at_least(0))
    lora_alpha: float = setting(32.0, "LoRA alpha: the adapters' update is scaled by "
                                "alpha / rank.", check=lambda v: None if 0 < v < float("inf")
                                else f"must be a finite number > 0, got {v}")
    lora_targets: str = setting("all-linear", "Modules that get LoRA adapters: all-linear (every "
                                "linear layer but the LM head) or names, comma-separated "
                                "(q_proj,v_proj).")

    def check(self) -> None:
        if not any(t.strip() for t in self.lora_targets.split(",")):
            raise UsageError(f"{self.label('lora_targets')} must be all-linear or module names, "
                             f"got {self.lora_targets!r}")
        if self.kl_coef > 0 and not self.ref_model:
            raise UsageError(f"{self.label('kl_coef')} > 0 needs {self.flag('ref_model')}")
        if self.schedule_steps and self.warmup_steps > self.schedule_steps:
            raise UsageError(f"{self.label('warmup_steps')} must be <= "
                             f"{self.label('schedule_steps')}, got {self.warmup_steps} > "
                             f"{self.schedule_steps}")

    def check_used(self) -> None:
        """A setting of something turned off would change nothing: refused in train-step and
        loop (code may build any combination)."""
        for name, off, why in (("lora_alpha", not self.lora_rank, "lora_rank is 0"),
                               ("lora_targets", not self.lora_rank, "lora_rank is 0"),
                               ("kl_estimator", not self.kl_coef, "kl_coef is 0"),
                               ("min_lr_ratio", self.lr_schedule == "constant",
                                "lr_schedule is constant")):
            if off and getattr(self, name) != self.__dataclass_fields__[name].default:
                key, _, state = why.partition(" ")
                raise UsageError(f"{self.label(name)} is set, but {self.label(key)} {state}, so "
                                 "it would change nothing: leave it out")

    def clip_range(self) -> tuple[float, float]:
        """(eps_low, eps_high): the given ones, else the ratio level's defaults."""
        from tcli.algos.losses import RATIO_LEVELS

        level = RATIO_LEVELS.get(self.ratio_level)
        return (level.clip_low if self.clip_low is None else self.clip_low,
                level.clip_high if self.clip_high is None else self.clip_high)

    def require_span(self) -> None:
        """linear and cosine must know where they end (the loop fills schedule_steps in)."""
        if self.lr_schedule != "constant" and not self.schedule_steps:
            raise UsageError(f"{self.label('lr_schedule')} {self.lr_schedule} needs "
                             f"{self.flag('schedule_steps')} (the optimizer steps it spans)")


@dataclass(frozen=True)
class CriticOptions(Options):
    """The PPO critic's update (train-critic, and the loop's [critic] with estimator ppo); values
    are fitted to GAE returns with a clipped squared error."""

    TABLE: ClassVar[str] = "critic"

    lr: float = like(TrainOptions, "lr", 1e-5)
    value_clip: float = setting(0.2, "Clipped value loss: a value may move at most this far from "
                                "the one recorded at sampling time (0 = no clip).",
                                check=finite_at_least(0.0))
    epochs: int = like(TrainOptions, "epochs", 1)
    mini_batches: int = like(TrainOptions, "mini_batches", 1)
    micro_batch_tokens: int = setting(2048, "Padded tokens per forward/backward (gradient "
                                      "accumulation above that).", check=at_least(1))
    max_grad_norm: float = like(TrainOptions, "max_grad_norm", 1.0)
    weight_decay: float = like(TrainOptions, "weight_decay", 0.0)
    device: str = like(TrainOptions, "device", "auto")

    def train_options(self) -> TrainOptions:
        """The Trainer settings the critic shares; the padded layout (values are per row)."""
        return TrainOptions(lr=self.lr, epochs=self.epochs, mini_batches=self.mini_batches,
                            micro_batch_tokens=self.micro_batch_tokens,
                            max_grad_norm=self.max_grad_norm, weight_decay=self.weight_decay,
                            device=self.device, share_prefix=False)


@dataclass(frozen=True)
class EvalOptions(Options):
    """Evaluation (eval, loop): greedy by default, unlike training's sampling."""

    TABLE: ClassVar[str] = "eval"

    n: int = like(SampleOptions, "n", 1, "Samples per prompt, for accuracy and pass@k (k <= n).")
    temperature: float = like(SampleOptions, "temperature", 0.0)
    k: tuple[int, ...] = setting((1,), "k for unbiased pass@k, each between 1 and n (1,4; a list "
                                 "in TOML).")
    limit: Optional[int] = setting(None, "Evaluate N prompts spread evenly over the file (row "
                                   "i*rows//N: every subject of a benchmark sorted by subject, "
                                   "the same rows whatever the seed), N >= 1 (default: all).",
                                   check=at_least(1))  # never 0 for "all"

    @property
    def ks(self) -> list[int]:
        return parse_ks(self.k, self.n, self.label("k"))

    def check(self) -> None:
        parse_ks(self.k, self.n, self.label("k"))
        if self.n > 1 and self.temperature == 0:  # greedy: n copies of one answer
            raise UsageError(f"{self.label('n')} > 1 needs {self.label('temperature')} > 0: "
                             f"greedy samples are all the same answer (pass@k would be pass@1), "
                             f"got n {self.n} at temperature 0")


def parse_ks(k: tuple[int, ...], n: int, label: str) -> list[int]:
    ks = sorted(set(k))
    if not ks or min(ks) < 1 or max(ks) > n:
        raise UsageError(f"{label} values must be between 1 and n ({n}), got "
                         f"{','.join(map(str, k))!r}")
    return ks


STAGE_OPTIONS = (SampleOptions, PromptOptions, VerifyOptions, AdvantageOptions, TrainOptions,
                 CriticOptions, EvalOptions)
