"""The one model loader (tcli.models.load): broken model directories fail with one line naming the
broken file, exit 65 (bad data), never a SafetensorError / JSONDecodeError traceback; through
train-step before anything is written, and through the loader functions for everyone else."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import orjson
import pytest

from conftest import run_tcli

torch = pytest.importorskip("torch")


def rollouts() -> bytes:
    recs = [{"prompt_token_ids": [21, 15, 21, 33], "token_ids": [30 + s, 40, 1],
             "logprobs": [-4.5, -4.4, -4.6], "advantages": [0.5 - s / 2] * 3} for s in range(3)]
    return b"".join(orjson.dumps(r) + b"\n" for r in recs)


def _random(p: Path) -> None:
    p.write_bytes(os.urandom(4096))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _tail_cut(p: Path) -> None:
    """Only the last bytes are missing: the header is intact, the data is short."""
    p.write_bytes(p.read_bytes()[:-7])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _json_list(p: Path) -> None:
    p.write_bytes(b"[1, 2, 3]")


# (file, damage): every way a file of a model directory can be broken
BROKEN = {
    "weights random": ("model.safetensors", _random),
    "weights truncated": ("model.safetensors", _truncate),
    "weights tail cut": ("model.safetensors", _tail_cut),
    "weights empty": ("model.safetensors", _empty),
    "config random": ("config.json", _random),
    "config truncated": ("config.json", _truncate),
    "config not an object": ("config.json", _json_list),
    "tokenizer random": ("tokenizer.json", _random),
    "tokenizer truncated": ("tokenizer.json", _truncate),
}


def broken_copy(tiny: str, tmp_path: Path, case: str) -> tuple[Path, Path]:
    name, damage = BROKEN[case]
    d = tmp_path / "broken"
    shutil.copytree(tiny, d)
    damage(d / name)
    return d, d / name


def error_line(stderr: bytes) -> str:
    err = stderr.decode()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcli: error: "), err
    assert "Traceback" not in err and "SafetensorError" not in err
    assert "JSONDecodeError" not in err
    return lines[0]


@pytest.mark.parametrize("case", list(BROKEN))
def test_train_step_broken_model_file(case, tiny, tmp_path):
    model, bad = broken_copy(tiny, tmp_path, case)
    src = tmp_path / "in.jsonl"
    src.write_bytes(rollouts())
    out = tmp_path / "out"
    shutil.copytree(tiny, out)  # an existing -o checkpoint must survive the failure
    (out / "tcli_state.json").write_bytes(b'{"step": 3}')
    before = sorted(os.listdir(out))
    r = run_tcli(["train-step", src, "-m", model, "-o", out])
    assert r.returncode == 65, r.stderr.decode()
    assert f"{bad}:" in error_line(r.stderr)
    assert r.stdout == b""
    assert sorted(os.listdir(out)) == before and (out / "tcli_state.json").read_bytes() == b'{"step": 3}'
    assert sorted(os.listdir(tmp_path)) == ["broken", "in.jsonl", "out"]


@pytest.mark.parametrize("case", [c for c in BROKEN if not c.startswith("tokenizer")])
def test_ref_model_broken(case, tiny, tmp_path):
    ref, bad = broken_copy(tiny, tmp_path, case)
    src = tmp_path / "in.jsonl"
    src.write_bytes(rollouts())
    r = run_tcli(["train-step", src, "-m", tiny, "-o", tmp_path / "out", "--ref-model", ref])
    assert r.returncode == 65, r.stderr.decode()
    assert f"{bad}:" in error_line(r.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(BROKEN))
def test_loader_names_the_broken_file(case, tiny, tmp_path):
    """Every loader entry point: DataError (exit 65) with the file."""
    from tcli.errors import DataError
    from tcli.models.load import (check_model_dir, load_config, load_model, load_tokenizer,
                                  model_vocab_size)

    model, bad = broken_copy(tiny, tmp_path, case)
    calls = [load_tokenizer] if case.startswith("tokenizer") else \
        [check_model_dir, model_vocab_size, load_config, load_model]
    for fn in calls:
        with pytest.raises(DataError) as ei:
            fn(str(model))
        assert ei.value.file == str(bad) and ei.value.exit_code == 65, fn.__name__
        assert "\n" not in str(ei.value)


def test_loader_accepts_sharded_weights_and_names_a_missing_shard(tiny, tmp_path):
    from tcli.errors import DataError
    from tcli.models.load import check_model_dir, load_model, load_tokenizer

    sharded = tmp_path / "sharded"
    load_model(tiny).save_pretrained(sharded, max_shard_size="40KB")
    load_tokenizer(tiny).save_pretrained(sharded)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").exists()
    check_model_dir(str(sharded))
    a, b = load_model(tiny), load_model(str(sharded))
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    _tail_cut(sharded / shards[-1])
    with pytest.raises(DataError) as ei:
        load_model(str(sharded))
    assert ei.value.file == str(sharded / shards[-1])
    (sharded / shards[-1]).unlink()
    with pytest.raises(DataError, match="missing") as ei:
        check_model_dir(str(sharded))
    assert ei.value.file == str(sharded / "model.safetensors.index.json")


def test_loader_modes(tiny):
    from tcli.models.load import load_model, load_tokenizer

    m = load_model(tiny)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert next(m.parameters()).dtype == torch.float32
    t = load_model(tiny, train=True, dtype="bfloat16")
    assert t.training and all(p.requires_grad for p in t.parameters())
    assert next(t.parameters()).dtype == torch.bfloat16
    assert load_tokenizer(tiny).eos_token == "<|endoftext|>"


def test_loader_without_tokenizer_files(tiny, tmp_path):
    from tcli.errors import DataError
    from tcli.models.load import load_tokenizer

    bare = tmp_path / "bare"
    shutil.copytree(tiny, bare)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bare / f).unlink()
    assert load_tokenizer(str(bare)) is None
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer(str(bare), required=True)


@pytest.mark.parametrize("path, code", [("missing", 2), ("file", 2), ("empty dir", 65)])
def test_loader_usage_and_missing_files(path, code, tmp_path):
    from tcli.errors import TcliError
    from tcli.models.load import load_model

    p = tmp_path / "x"
    if path == "file":
        p.write_text("hello")
    elif path == "empty dir":
        p.mkdir()
    with pytest.raises(TcliError) as ei:
        load_model(str(p))
    assert ei.value.exit_code == code and str(p) in str(ei.value)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_train_step_refuses_pickled_weights(tiny, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(tiny, evil)
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(str(marker))}, evil / "pytorch_model.bin")
    src = tmp_path / "in.jsonl"
    src.write_bytes(rollouts())
    r = run_tcli(["train-step", src, "-m", evil, "-o", tmp_path / "out"])
    assert r.returncode == 65, r.stderr.decode()
    line = error_line(r.stderr)
    assert str(evil) in line and "Weights only load failed" in line
    assert not marker.exists() and not (tmp_path / "out").exists()
    # and a plain pickle stream too
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    r = run_tcli(["train-step", src, "-m", evil, "-o", tmp_path / "out"])
    assert r.returncode == 65 and not marker.exists(), r.stderr.decode()
    error_line(r.stderr)


def test_broken_state_file(tiny, tmp_path):
    """tcli_state.json of the start checkpoint: bad JSON or a bad counter names the file."""
    d = tmp_path / "ck"
    shutil.copytree(tiny, d)
    src = tmp_path / "in.jsonl"
    src.write_bytes(rollouts())
    for content, words in ((b"{\"step\": 1", "not valid JSON"), (b'{"step": "one"}', "'step'")):
        (d / "tcli_state.json").write_bytes(content)
        r = run_tcli(["train-step", src, "-m", d, "-o", tmp_path / "out"])
        assert r.returncode == 65, r.stderr.decode()
        line = error_line(r.stderr)
        assert str(d / "tcli_state.json") in line and words in line, line
        assert not (tmp_path / "out").exists()


def test_dtype_names():
    """Every accepted dtype name means its own dtype (fp16 is float16, not bfloat16)."""
    from tcli.models.load import torch_dtype

    want = {None: torch.float32, "auto": torch.float32, "float32": torch.float32,
            "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16, torch.float16: torch.float16}
    assert {k: torch_dtype(k) for k in want} == want


def test_training_load_turns_dropout_off_unless_kept(tiny, tmp_path):
    """train=True gives train mode without dropout (the sampler's policy is deterministic, so the
    importance ratio must compare the same function); keep_dropout keeps the config's rate."""
    from tcli.models.load import load_model

    d = tmp_path / "drop"
    shutil.copytree(tiny, d)
    cfg = orjson.loads((d / "config.json").read_bytes())
    cfg["attention_dropout"] = 0.25
    (d / "config.json").write_bytes(orjson.dumps(cfg))

    def rates(m):
        return {x.attention_dropout for x in m.modules() if hasattr(x, "attention_dropout")}

    off, kept = load_model(str(d), train=True), load_model(str(d), train=True, keep_dropout=True)
    assert off.training and kept.training
    assert rates(off) == {0.0} and rates(kept) == {0.25}


def test_state_counters_refuse_booleans(tmp_path):
    """JSON true is not a step count: a tcli_state.json with "step": true names the file and the
    field instead of resuming at step 1."""
    from tcli.errors import DataError
    from tcli.models.checkpoint import read_counters

    (tmp_path / "tcli_state.json").write_bytes(b'{"step": 3, "policy_version": true}')
    with pytest.raises(DataError) as e:
        read_counters(str(tmp_path))
    assert (e.value.file, e.value.field) == (str(tmp_path / "tcli_state.json"), "policy_version")
    (tmp_path / "tcli_state.json").write_bytes(b'{"step": 3, "policy_version": 2}')
    assert read_counters(str(tmp_path)) == {"step": 3, "policy_version": 2, "optimizer_steps": 0}
