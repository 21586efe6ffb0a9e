"""The GPU recipes in examples/gsm8k and examples/math, checked on CPU: every TOML key and every
command in their READMEs and scripts parses and reaches the options objects (GPU-only settings
included), and the memory arithmetic of examples/gsm8k/memory.py matches real models' parameter
counts, peft's adapter size and the tensors autograd keeps."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from tcli.cli import _register_commands, app
from tcli.config.flags import param_name
from tcli.config.loop import load_config
from tcli.config.spec import settings_of
from tcli.config.stages import (AdvantageOptions, EvalOptions, SampleOptions, TrainOptions,
                                VerifyOptions)
from tcli.io.benchmarks import BENCHMARKS, resolve_data

ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIRS = [ROOT / "examples" / "gsm8k", ROOT / "examples" / "math"]
TOMLS = sorted(p for d in RECIPE_DIRS for p in d.glob("*.toml"))
STAGE_OPTIONS = {"train-step": [TrainOptions], "sample-tree": [SampleOptions],
                 "verify": [VerifyOptions], "advantages": [AdvantageOptions],
                 "eval": [EvalOptions, SampleOptions, VerifyOptions]}


def _memory():
    spec = importlib.util.spec_from_file_location("recipe_memory", ROOT / "examples/gsm8k/memory.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _params(argv: list[str]) -> tuple[str, dict]:
    """Parse ``tcli NAME ARGS`` as the CLI does (unknown flags and bad types raise), run nothing."""
    _register_commands()
    name, *args = argv
    cmd = typer.main.get_command(app).commands[name]
    return name, cmd.make_context(name, args).params


def _options(name: str, params: dict) -> dict:
    """The stage's Options objects built from parsed flags (their checks run)."""
    return {cls: cls(**{f.name: params[param_name(cls, f.name)] for f in settings_of(cls)
                        if param_name(cls, f.name) in params})
            for cls in STAGE_OPTIONS[name]}


def _loop(params: dict):
    kw = {k: v for k, v in params.items() if k not in ("config", "resume", "quiet")}
    return load_config(params["config"], kw)


def _readme_commands(readme: Path) -> list[str]:
    """Indented code lines of a README that run tcli, torchrun or a recipe script."""
    return [ln.strip() for ln in readme.read_text().splitlines()
            if re.match(r"    (tcli |torchrun |MODEL=)", ln)]


def _tcli_argv(line: str) -> list[str]:
    words = shlex.split(line)
    if words[0] == "torchrun":
        words = words[words.index("tcli", words.index("-m")) + 1:]
    else:
        words = words[1:]
    return words


@pytest.mark.parametrize("path", TOMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_toml_loads_with_gpu_settings(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(str(path), {"model": "/models/any"})
    assert cfg.run.train_data == "gsm8k_train" and cfg.run.eval_data in BENCHMARKS  # shipped
    assert os.path.isfile(resolve_data(cfg.run.train_data))
    t, s = cfg.train, cfg.sample
    assert t.bf16 and t.grad_checkpointing and t.device == "cuda"
    if t.lora_rank:  # LoRA: the vllm engine does not read adapter directories yet
        assert s.engine == "hf" and t.lora_targets == "all-linear" and t.lora_alpha == 128
        assert t.lr_schedule == "cosine" and t.schedule_steps == cfg.run.steps
    else:
        assert s.engine == "vllm" and s.dtype == "bfloat16" and s.gpu_memory_utilization == 0.5


@pytest.mark.parametrize("readme", [d / "README.md" for d in RECIPE_DIRS],
                         ids=lambda p: p.parent.name)
def test_readme_commands_parse(readme, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    lines = _readme_commands(readme)
    kinds = {ln.split()[0].split("=")[0] for ln in lines}
    assert kinds == {"tcli", "torchrun", "MODEL"}, lines
    for line in lines:
        if line.startswith("MODEL="):
            _check_script(line, tmp_path)
            continue
        name, params = _params(_tcli_argv(line))
        if name == "loop":
            cfg = _loop(params)
            assert cfg.run.model.startswith("/models/")
        else:
            t = _options(name, params)[TrainOptions]
            assert (t.parallel, t.bf16, t.grad_checkpointing, t.device) == ("fsdp", True, True,
                                                                           "cuda")
            assert f"--nproc-per-node {8 if 'math' in str(readme) else 4}" in line


def _check_script(line: str, tmp_path: Path) -> None:
    """Run a recipe script with DRY_RUN=1 and parse every tcli command it would run."""
    *assigns, script = shlex.split(line)
    env = dict(os.environ, DRY_RUN="1", STEPS="2", EVAL_EVERY="1", OUT=str(tmp_path / "run"),
               **dict(a.split("=", 1) for a in assigns))
    out = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    commands = [c.split("\n") for c in out.stdout.strip().split("\n\n")]
    names = [_tcli_argv(shlex.join(c))[0] for c in commands]
    assert names == ["sample-tree", "verify", "build-tree", "advantages", "train-step", "eval"] * 2
    for words in commands:
        name, params = _params(_tcli_argv(shlex.join(words)))
        opts = _options(name, params) if name in STAGE_OPTIONS else {}
        if name in ("sample-tree", "eval"):
            assert (opts[SampleOptions].engine, opts[SampleOptions].dtype) == ("vllm", "bfloat16")
        if name == "train-step":
            assert opts[TrainOptions].parallel == "fsdp" and opts[TrainOptions].bf16
            assert words[:3] == ["torchrun", "--nproc-per-node", env.get("NGPU", "8")]
    assert (tmp_path / "run/step_1/prompts.jsonl").read_text().count("\n") == 32


def test_vllm_engine_gets_dtype_and_memory_share(monkeypatch):
    """The vllm factory hands SampleOptions' dtype and gpu_memory_utilization to the engine (the
    engine itself needs vllm; its constructor is replaced by a recorder)."""
    import tcli.engines.vllm_engine as ve
    from tcli.engines import open_engine

    seen = {}
    monkeypatch.setattr(ve, "VLLMEngine", lambda model, **kw: seen.update(kw, model=model))
    open_engine("/models/m", SampleOptions(engine="vllm", dtype="bfloat16",
                                           gpu_memory_utilization=0.4), seed=3)
    assert (seen["model"], seen["dtype"], seen["gpu_memory_utilization"], seen["seed"]) == (
        "/models/m", "bfloat16", 0.4, 3)
    with pytest.raises(Exception, match="gpu.memory.utilization"):
        load_config(None, {"gpu_memory_utilization": 1.5})


def _tiny(kind: str):
    """A small real model of the recipes' architectures (Qwen3: q/k norm, tied; Qwen2: biases)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    torch.manual_seed(0)
    common = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=384, vocab_size=1000)
    cfg = (Qwen3Config(head_dim=32, tie_word_embeddings=True, **common) if kind == "qwen3"
           else Qwen2Config(tie_word_embeddings=False, **common))
    cfg._attn_implementation = "sdpa"
    return cfg, AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_parameter_and_adapter_counts_match_real_models(kind):
    from peft import LoraConfig, get_peft_model

    mem = _memory()
    cfg, model = _tiny(kind)
    arch = mem.Arch.from_config(cfg.to_dict())
    assert arch.params() == sum(p.numel() for p in model.parameters())
    assert arch.layer_params() == sum(p.numel() for p in model.model.layers[0].parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert arch.lora_params(4) == trainable


def test_activation_estimate_matches_saved_tensors():
    """Bytes autograd keeps per token and layer under bf16 autocast (difference of two sequence
    lengths, so the per-layer weight copies cancel) within 10 % of the formula."""
    import torch

    mem = _memory()
    cfg, model = _tiny("qwen3")
    arch = mem.Arch.from_config(cfg.to_dict())

    def saved(tokens: int) -> int:
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        ids = torch.randint(0, cfg.vocab_size, (1, tokens))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            model.model(ids)
        return sum(storages.values())

    per = (saved(512) - saved(256)) / 256 / cfg.num_hidden_layers
    assert abs(per / arch.act_bytes_per_token_layer() - 1) < 0.10, (per, arch.act_bytes_per_token_layer())


def test_readme_memory_totals_are_memory_py_output():
    """Every recipe's bold trainer total in the READMEs is what memory.py computes."""
    mem = _memory()
    for model, title, tk, _ in mem.RECIPES:
        total = sum(mem.trainer_bytes(mem.Arch.from_config(mem.PRESETS[model]), **tk).values())
        readme = ROOT / "examples" / title.split("/")[0] / "README.md"
        text = readme.read_text()
        if f"**{total / mem.GB:.1f} GB**" not in text:
            assert "as gsm8k" in text and f"trainer {total / mem.GB:.1f} GB" in text, title
    published = {"Qwen3-1.7B": 1.72e9, "Qwen3-8B": 8.19e9, "Qwen2.5-Math-7B": 7.62e9}
    for name, p in published.items():
        assert abs(mem.Arch.from_config(mem.PRESETS[name]).params() / p - 1) < 0.005
