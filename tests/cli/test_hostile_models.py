"""Hostile model files and settings: damaged GGUF files, extreme entropy-branching thresholds,
odd LoRA adapters and targets, and checkpoint writes that fail (read-only parent, full disk).

Each case runs the real command (``run_tcli``, or ``run_python`` where a write is made to fail)
and checks what a user sees (DESIGN §2.5, §5, §8.1): the documented exit code, one line on
stderr naming the file (and field), no traceback, and nothing written or replaced on failure.
The GGUF cases need the ``gguf`` package (the ``real`` extra) to build their files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import subprocess

import orjson
import pytest

from conftest import failed, run_python, run_tcli

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
    reason="GGUF files are built with the gguf package: pip install 'tcli[real]' "
           "(gguf==0.19.0, accelerate) to run these")


def tree_hash(path) -> str:
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, path).encode() + open(p, "rb").read())
    return h.hexdigest()


# ----------------------------------------------------------------------------- GGUF

def write_gguf(path, arch: str = "llama", skip=(), raw_type=None) -> str:
    """A tiny llama-shaped GGUF file (29-token sentencepiece vocabulary, one layer) written by the
    gguf package; ``raw_type`` stores the matrices as zero bytes of that quantisation type."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    h, ff, heads, kv = 32, 64, 2, 1
    for add, v in ((w.add_context_length, 64), (w.add_embedding_length, h), (w.add_block_count, 1),
                   (w.add_feed_forward_length, ff), (w.add_head_count, heads),
                   (w.add_head_count_kv, kv), (w.add_layer_norm_rms_eps, 1e-6),
                   (w.add_rope_freq_base, 1e4), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2)):
        add(v)
    toks = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 123)]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * len(toks))
    w.add_token_types([2, 3, 3] + [1] * (len(toks) - 3))
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(toks), h), "output_norm.weight": (h,),
              "output.weight": (len(toks), h), "blk.0.attn_norm.weight": (h,),
              "blk.0.ffn_norm.weight": (h,), "blk.0.attn_q.weight": (h, h),
              "blk.0.attn_k.weight": (h // heads * kv, h),
              "blk.0.attn_v.weight": (h // heads * kv, h),
              "blk.0.attn_output.weight": (h, h), "blk.0.ffn_gate.weight": (ff, h),
              "blk.0.ffn_up.weight": (ff, h), "blk.0.ffn_down.weight": (h, ff)}
    for name, shape in shapes.items():
        if name in skip:
            continue
        if raw_type is not None and len(shape) == 2:
            block, size = gguf.GGML_QUANT_SIZES[raw_type]
            raw = np.zeros((shape[0], shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=raw_type)
        else:
            w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "ok.gguf")


def _damaged(data: bytes, kind: str) -> bytes:
    """``data`` with one kind of damage; header fields are found by the last tensor's name."""
    name = b"output.weight"
    info = data.rfind(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    type_at = info + 4 + 8 * struct.unpack_from("<I", data, info)[0]
    b = bytearray(data)
    if kind == "truncated in the tensor data":
        return data[: len(data) - 100]
    if kind == "truncated in the header":
        return data[:200]
    if kind == "unknown tensor type":
        struct.pack_into("<I", b, type_at, 99)
    elif kind == "1000 dimensions":
        struct.pack_into("<I", b, info, 1000)
    elif kind == "data offset past the end":
        struct.pack_into("<Q", b, type_at + 4, 1 << 40)
    elif kind == "2^60 tensors":
        struct.pack_into("<Q", b, 8, 1 << 60)
    elif kind == "random bytes":
        return bytes(range(256)) * 8
    elif kind == "a JSON file":
        return b'{"model": "llama", "layers": 1}\n'
    return bytes(b)


@needs_gguf
def test_the_tiny_gguf_imports(good_gguf, tmp_path):
    """The control: the undamaged file converts, so each failure below is its damage's."""
    r = run_tcli(["import-gguf", good_gguf, tmp_path / "out", "-q"])
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "out" / "model.safetensors").is_file()


@needs_gguf
@pytest.mark.parametrize("kind, words", [
    ("truncated in the tensor data", "truncated GGUF file"),
    ("truncated in the header", "not a GGUF file"),
    ("unknown tensor type", "unknown GGML type 99"),
    ("1000 dimensions", "1000 dimensions"),
    ("data offset past the end", "truncated GGUF file"),
    ("2^60 tensors", "tensors in a"),
    ("random bytes", "not a GGUF file"),
    ("a JSON file", "not a GGUF file")])
def test_damaged_gguf_is_bad_data(kind, words, good_gguf, tmp_path):
    """Before: truncation and bad tensor infos surfaced as NumPy reshape or enum errors of the
    tokenizer ("cannot reshape array of size 699 into shape (29,32)")."""
    src = tmp_path / "m.gguf"
    src.write_bytes(_damaged(open(good_gguf, "rb").read(), kind))
    failed(run_tcli(["import-gguf", src, tmp_path / "out"]), 65, str(src), words)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


@needs_gguf
@pytest.mark.parametrize("how, words", [
    ({"arch": "bert"}, "unsupported GGUF architecture 'bert'"),
    ({"raw_type": "Q8_1"}, "Q8_1"),
    ({"skip": ("blk.0.ffn_down.weight",)}, "no tensor for 1 weight(s)"),
    ({"skip": ("output_norm.weight", "blk.0.attn_q.weight")}, "model.norm.weight")])
def test_unsupported_gguf_content(how, words, tmp_path):
    """A quantisation without a dequantizer and a missing tensor: before, the missing tensor's
    weight was left at its random initialisation and the import succeeded."""
    import gguf

    if "raw_type" in how:
        how = {"raw_type": getattr(gguf.GGMLQuantizationType, how["raw_type"])}
    src = write_gguf(tmp_path / "m.gguf", **how)
    failed(run_tcli(["import-gguf", src, tmp_path / "out"]), 65, str(src), words)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


# ----------------------------------------------------------------------------- entropy branching

def _sample_entropy(tiny, tmp_path, *flags):
    src = tmp_path / "p.jsonl"
    src.write_bytes(b'{"id": "a", "prompt": "1+1="}\n{"id": "b", "prompt": "2+3="}\n')
    out = tmp_path / "out.jsonl"
    r = run_tcli(["sample-tree", src, "-m", tiny, "--mode", "tree", "--branch", "entropy",
                  "--width", "2", "--depth", "2", "--max-new-tokens", "6", *flags, "-o", out])
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()] if out.exists() else None
    return r, recs


@pytest.mark.parametrize("tau, leaves", [("0", 4), ("-0.0", 4), ("1e-300", 4), ("1e300", 1)])
def test_extreme_entropy_thresholds_terminate_within_bounds(tau, leaves, tiny, tmp_path):
    """τ = 0 splits at the first chance everywhere, bounded by depth and width (4 leaves); a
    huge τ never splits (one path per prompt)."""
    r, recs = _sample_entropy(tiny, tmp_path, "--branch-entropy", tau)
    assert r.returncode == 0, r.stderr.decode()
    for pid in ("a", "b"):
        group = [x for x in recs if x["prompt_id"] == pid]
        assert len(group) == leaves
        assert all(len(x["node_path"]) <= 3 and len(x["token_ids"]) <= 6 for x in group)


@pytest.mark.parametrize("flags, words", [
    (["--branch-entropy", "inf"], "--branch-entropy"), (["--branch-entropy", "nan"], "finite"),
    (["--branch-entropy", "-1e-9"], ">= 0"),
    (["--min-segment-tokens", "6"], "--min-segment-tokens"),
    (["--min-segment-tokens", "100"], "--max-new-tokens")])
def test_invalid_entropy_settings_exit_2(flags, words, tiny, tmp_path):
    """A minimum segment as long as the response leaves no token to split at: before, it
    sampled one path per prompt without a word."""
    r, recs = _sample_entropy(tiny, tmp_path, *flags)
    failed(r, 2, words)
    assert recs is None


def test_longest_useful_min_segment_still_splits(tiny, tmp_path):
    r, recs = _sample_entropy(tiny, tmp_path, "--branch-entropy", "0", "--min-segment-tokens", "5")
    assert r.returncode == 0, r.stderr.decode()
    split = [x for x in recs if len(x["node_path"]) > 1]
    assert split and all(x["segment_ends"][0] == 5 for x in split)


# ----------------------------------------------------------------------------- LoRA

TRAIN = [{"prompt_id": "p", "sample_id": s, "prompt_token_ids": [21, 15], "token_ids": [30, 31, 1],
          "logprobs": [-4.0] * 3, "advantages": [1.0 - 2 * s] * 3, "reward": 1.0 - s}
         for s in range(2)]


@pytest.mark.parametrize("cmd", ["sample-tree", "eval"])
def test_a_response_that_could_run_past_the_models_positions_is_refused(cmd, tmp_path_factory,
                                                                         tmp_path):
    """A model of 64 positions: a prompt whose tokens plus --max-new-tokens exceed them is bad
    data naming its file, line and the numbers, before anything is sampled or written; the same
    prompts with room to answer run."""
    from conftest import SMALL, shared_model

    model = shared_model(tmp_path_factory, max_positions=64, **SMALL)
    src = tmp_path / "p.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"id": f"p{i}", "prompt": "1+1=" * (3 if i < 2 else 12),
                                           "answer": "2"}) + b"\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    args = ([cmd, src, "-n", "2"] if cmd == "sample-tree" else [cmd, "--data", src]) + [
        "-m", model, "--prompt-template", "plain", "-q", "-o", out]
    r = run_tcli([*args, "--max-new-tokens", "20"])
    err = r.stderr.decode()
    assert r.returncode == 65 and f"{src}:3: field 'prompt': 48 prompt tokens" in err, err
    assert "= 68 exceed the model's 64 positions" in err and not out.exists()
    r = run_tcli([*args, "--max-new-tokens", "16"])
    assert r.returncode == 0, r.stderr.decode()


def test_train_step_refuses_records_longer_than_the_models_positions(tmp_path_factory, tmp_path):
    """Records from elsewhere may be longer than the model's positions: bad data naming the line,
    before any weights load; nothing written."""
    from conftest import SMALL, shared_model

    model = shared_model(tmp_path_factory, max_positions=64, **SMALL)

    def rec(i, n_prompt, n_resp):
        return {"prompt_id": f"p{i}", "sample_id": 0, "prompt_token_ids": [5] * n_prompt,
                "token_ids": [6] * n_resp, "logprobs": [-1.0] * n_resp, "advantages": [1.0] * n_resp}

    src = tmp_path / "r.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in (rec(0, 30, 34), rec(1, 40, 30))))
    out = tmp_path / "out"
    r = run_tcli(["train-step", src, "-m", model, "-o", out, "-q"])
    err = r.stderr.decode()
    assert r.returncode == 65 and f"{src}:2: field 'token_ids': 40 prompt + 30 response" in err, err
    assert "exceed the model's 64 positions" in err and not out.exists()


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    """(base, adapter): a copy of the tiny model and a rank-4 adapter trained on it."""
    d = tmp_path_factory.mktemp("lora")
    base, adapter = d / "base", d / "adapter"
    shutil.copytree(tiny, base)
    (d / "train.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in TRAIN))
    r = run_tcli(["train-step", d / "train.jsonl", "-m", base, "-o", adapter, "--lora-rank", "4"])
    assert r.returncode == 0, r.stderr.decode()
    return base, adapter


def _moved_base(adapter, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    return moved


@pytest.mark.parametrize("kind", ["empty directory", "other files", "full checkpoint",
                                  "base moved", "into itself", "into its base", "inside itself",
                                  "inside its base"])
def test_merge_lora_on_odd_inputs(kind, lora, tmp_path):
    """Before: a directory without an adapter exited 65 ("no model weights"), and merging into
    the adapter itself or into its base replaced it (every adapter of that base then silently
    loaded the merged weights as its base)."""
    base, adapter = lora
    src, out, code, words = adapter, tmp_path / "merged", 2, ["refusing to write there"]
    if kind in ("empty directory", "other files", "full checkpoint"):
        src, words = tmp_path / "src", ["is not a LoRA adapter directory"]
        if kind == "full checkpoint":
            shutil.copytree(base, src)
        else:
            src.mkdir()
            if kind == "other files":
                (src / "notes.txt").write_text("keep")
    elif kind == "base moved":
        src, code = _moved_base(adapter, tmp_path), 65
        words = ["adapter_config.json: field 'base_model_name_or_path'", "not a directory"]
    else:
        out = adapter if kind.endswith("itself") else base
        out = out / "sub" if kind.startswith("inside") else out
    before = {p: tree_hash(p) for p in (base, adapter)}
    failed(run_tcli(["merge-lora", src, out]), code, *words)
    assert {p: tree_hash(p) for p in (base, adapter)} == before
    assert not (tmp_path / "merged").exists()


def test_merge_lora_writes_a_full_checkpoint(lora, tmp_path):
    r = run_tcli(["merge-lora", lora[1], tmp_path / "merged", "-q"])
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("flags, words", [
    (["--lora-rank", "-1"], "--lora-rank"),
    (["--lora-rank", "4", "--lora-targets", "foo_proj"], "no module named 'foo_proj'"),
    (["--lora-rank", "4", "--lora-targets", "q_proj,v_prj"], "no module named 'v_prj'"),
    (["--lora-rank", "4", "--lora-targets", " , "], "--lora-targets")])
def test_bad_lora_settings_exit_2(flags, words, lora, tmp_path):
    """A target list with one misspelt name: before, peft skipped it and trained the others."""
    src = tmp_path / "train.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in TRAIN))
    failed(run_tcli(["train-step", src, "-m", lora[0], "-o", tmp_path / "out", *flags]), 2, *words)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- failing writes

@pytest.fixture
def read_only_dir(tmp_path):
    """(mount_first, seal): a directory to fill, then to make unwritable: remounted read-only
    as root (where mode bits do not stop writes; skipped if tmpfs cannot be mounted), mode 0555
    otherwise."""
    d = tmp_path / "ro"
    d.mkdir()
    mounted = []

    def mount_first():
        if os.geteuid() == 0:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)],
                               capture_output=True)
            if r.returncode:
                pytest.skip(f"root cannot make a read-only directory here without a tmpfs: "
                            f"{r.stderr.decode().strip()}")
            mounted.append(d)
        return d

    def seal():
        if mounted:
            r = subprocess.run(["mount", "-o", "remount,ro", str(d)], capture_output=True)
            if r.returncode:
                pytest.skip(f"cannot remount read-only: {r.stderr.decode().strip()}")
        else:
            os.chmod(d, 0o555)
        return d

    yield mount_first, seal
    if mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
    else:
        os.chmod(d, 0o755)


def test_checkpoint_into_a_read_only_directory(read_only_dir, tiny, tmp_path):
    """One line naming the checkpoint (before: the temporary directory's name), exit 1, the
    previous checkpoint unchanged; a new one is simply not there."""
    mount_first, seal = read_only_dir
    d = mount_first()
    src = tmp_path / "train.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in TRAIN))
    assert run_tcli(["train-step", src, "-m", tiny, "-o", d / "ckpt"]).returncode == 0
    seal()
    before = tree_hash(d / "ckpt")
    for target, kept in ((d / "ckpt", "the previous checkpoint is unchanged"),
                         (d / "new", "nothing was written")):
        r = run_tcli(["train-step", src, "-m", tiny, "-o", target])
        line = failed(r, 1, "cannot write checkpoint", kept, f"({target})")
        assert ".tmp-" not in line and r.stdout == b""
    assert tree_hash(d / "ckpt") == before and os.listdir(d) == ["ckpt"]


FAILING_SAVE = """if True:
    import errno, os, sys
    from unittest import mock
    import transformers.modeling_utils as mu
    code = getattr(errno, sys.argv[1])

    def failing(tensors, filename, *a, **kw):  # half a file, then the error
        with open(filename, "wb") as f:
            f.write(b"x" * 4096)
        raise OSError(code, os.strerror(code))

    sys.argv = ["tcli"] + sys.argv[2:]
    with mock.patch.object(mu, "safe_save_file", failing):
        from tcli.cli import main
        main()
"""


@pytest.mark.parametrize("err, words", [("ENOSPC", "no space left on device"),
                                        ("EIO", "Input/output error")])
@pytest.mark.parametrize("cmd", ["train-step", "merge-lora"])
def test_checkpoint_write_fails_half_way(err, words, cmd, lora, tmp_path):
    """The weights file fails half-written: exit 1, one line, the previous checkpoint intact and
    no temporary directory left beside it."""
    base, adapter = lora
    out = tmp_path / "ckpt"
    shutil.copytree(adapter if cmd == "train-step" else base, out)  # a previous checkpoint
    before = tree_hash(out)
    src = tmp_path / "train.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in TRAIN))
    args = (["train-step", src, "-m", base, "-o", out] if cmd == "train-step"
            else ["merge-lora", adapter, out])
    r = run_python(FAILING_SAVE, [err, *args])
    failed(r, 1, "cannot write checkpoint", words, "the previous checkpoint is unchanged")
    assert tree_hash(out) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "train.jsonl"]
