"""FSDP2 loading on CPU with gloo (tcli.train.parallel.shard_from_rank0): a reference model sharded
like the policy gives the 1-process KL step, and rank 0 alone reading the weights (the others build
the model on the meta device and receive their shards) gives exactly the weights, buffers and tied
head of every rank loading the whole model.

Two torchrun launches: ``tcli train-step --parallel fsdp --ref-model`` and this file itself as the
worker that loads a policy, a LoRA policy and a reference both ways (see ``worker``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TRAIN_ARGS = ["--lr", "1e-3", "--micro-batch-tokens", "24", "--mini-batches", "2", "--epochs", "2",
              "--seed", "1"]


# ----------------------------------------------------------------------------- the worker

def _load_both_ways(path: str, make):
    """(every rank loads the whole model, rank 0 only) for ``make(meta) -> (model, root)``."""
    import torch
    import torch.distributed as dist

    from tcli.train import parallel

    old, old_root = make(False)
    parallel.shard_model(old, torch.device("cpu"))
    new, new_root = make(dist.get_rank() != 0)
    parallel.shard_from_rank0(new, torch.device("cpu"), root=new_root)
    return (old_root or old), (new_root or new)


def _compare(old, new) -> dict:
    """Differences between two sharded models, from this rank's point of view."""
    import torch

    from tcli.train import parallel

    numel = parallel.local_numel(new)  # before a forward leaves the root group gathered
    a, b = parallel.full_model_state(old), parallel.full_model_state(new)
    ids = torch.tensor([[5, 9, 17, 33, 4, 8]])
    with torch.no_grad():
        la, lb = old(input_ids=ids).logits, new(input_ids=ids).logits
    core = new.get_base_model() if hasattr(new, "get_base_model") else new
    return {
        "state_keys_equal": set(a) == set(b),
        "state_max_diff": max([(a[k] - b[k]).abs().max().item() for k in a] or [0.0]),
        "buffers_equal": all(torch.equal(x, y) for x, y in zip(old.buffers(), new.buffers())),
        "requires_grad_equal": [p.requires_grad for p in old.parameters()]
        == [p.requires_grad for p in new.parameters()],
        "tied": core.lm_head.weight is core.model.embed_tokens.weight,
        "logits_max_diff": (la - lb).abs().max().item(),
        "local_numel": numel,
    }


def _trainer_numels(model_dir: str) -> dict:
    """Parameter elements this rank holds of the Trainer's policy and reference under FSDP."""
    from tcli.config.stages import TrainOptions
    from tcli.train.dist import init_distributed
    from tcli.train.parallel import local_numel
    from tcli.train.trainer import Trainer

    t = Trainer(model_dir, TrainOptions(parallel="fsdp", ref_model=model_dir),
                dist_info=init_distributed())
    return {"policy": local_numel(t.model), "ref": local_numel(t.ref_model),
            "full": sum(p.numel() for p in t.model.parameters())}


def worker(model_dir: str, out: str) -> None:
    """Load a policy, a new LoRA adapter on it, and a reference both ways; write the comparison."""
    import torch
    import torch.distributed as dist

    from tcli.models.load import load_model
    from tcli.train import lora

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    policy = lambda meta: (load_model(model_dir, train=True, meta=meta), None)  # noqa: E731
    ref = lambda meta: (load_model(model_dir, train=False, meta=meta), None)  # noqa: E731

    def adapter(meta):
        torch.manual_seed(0)  # the old path: every rank draws the same adapter
        pm = lora.load_trainable(model_dir, 4, 8.0, "all-linear", meta=meta)
        if not meta:  # a non-zero B, so that the adapter changes the logits
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_B" in n:
                        p.normal_()
        return pm.get_base_model(), pm

    info = {}
    for name, make in (("policy", policy), ("ref", ref), ("lora", adapter)):
        info[name] = _compare(*_load_both_ways(model_dir, make))
    info["trainer"] = _trainer_numels(model_dir)
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(info, f)
    dist.barrier()  # no rank tears gloo down while a peer still talks to it (an abort at exit)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- helpers

def _run(args, nproc: int) -> subprocess.CompletedProcess:
    """``python *args`` in 1 process, or under torchrun with ``nproc`` ranks."""
    from conftest import run_torchrun

    if nproc > 1:
        r = run_torchrun(args, nproc=nproc, timeout=600)
    else:
        r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr.decode()[-4000:]
    return r


def _rollouts(model_dir, path) -> None:
    """12 on-policy rollouts in 3 groups (prompts of 3 lengths, responses of 4..10 tokens)."""
    import orjson
    import torch

    from tcli.models.load import load_model
    from tcli.models.logprobs import sequence_logprobs

    model = load_model(str(model_dir))
    g = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    P = [[5, 6, 7][: 1 + i % 3] for i in range(12)]
    R = [torch.randint(3, vocab, (4 + (i * 5) % 7,), generator=g).tolist() for i in range(12)]
    with torch.no_grad():
        lps = sequence_logprobs(model, P, R, micro_batch_tokens=64)
    with open(path, "wb") as f:
        for i, (p, r, lp) in enumerate(zip(P, R, lps)):
            f.write(orjson.dumps({"schema": "tcli.rollout/1", "prompt_id": i % 3, "sample_id": i,
                                  "prompt_token_ids": p, "token_ids": r, "logprobs": lp.tolist(),
                                  "advantages": [(1.0 if i % 2 else -1.0)] * len(r)}) + b"\n")


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model, tiny_model_seed1):
    """A tiny policy, a different tiny model of the same shape as the reference, rollouts."""
    import shutil

    d = tmp_path_factory.mktemp("fsdp_ref")
    shutil.copytree(tiny_model, d / "base")
    shutil.copytree(tiny_model_seed1, d / "ref")
    _rollouts(d / "base", d / "roll.jsonl")
    return d


def _train_step(d, out, nproc: int, *extra) -> dict:
    r = _run(["-m", "tcli", "train-step", str(d / "roll.jsonl"), "-m", str(d / "base"),
              "-o", str(d / out), "--ref-model", str(d / "ref"), "--kl-coef", "0.5", *TRAIN_ARGS,
              *extra], nproc)
    return json.loads(r.stdout)


# ----------------------------------------------------------------------------- the tests

def test_meta_load_reads_no_weights(models):
    """Ranks > 0 build the architecture only: every tensor on the meta device."""
    from tcli.models.load import load_model

    m = load_model(str(models / "base"), train=True, meta=True)
    assert {p.device.type for p in m.parameters()} == {"meta"}
    assert m.lm_head.weight is m.model.embed_tokens.weight and m.training
    ref = load_model(str(models / "base"), meta=True)
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training


@pytest.mark.slow
def test_train_step_fsdp_ref_model_equals_one_process(models):
    """--ref-model with --parallel fsdp: the reference is sharded like the policy, and KL, loss
    and weights equal one process's (up to float32 reordering, see conftest), with uneven
    micro-batch counts and a second epoch whose shards miss other ranks' cached reference
    log-probs."""
    from conftest import UPDATE_REL, assert_same_update

    m1 = _train_step(models, "one", 1)
    m2 = _train_step(models, "two", 2, "--parallel", "fsdp")
    assert m1["kl"] > 1e-3 and (m1["world_size"], m2["world_size"]) == (1, 2)
    print(f"kl {m1['kl']:.6g} vs {m2['kl']:.6g}, loss {m1['loss']:.6g} vs {m2['loss']:.6g}")
    # 4 optimizer steps: later ones see weights apart by up to UPDATE_REL of an update (conftest);
    # abs: approx_kl and clip_frac start at 0
    for k in ("loss", "kl", "clip_frac", "approx_kl", "entropy", "grad_norm", "num_tokens"):
        assert m2[k] == pytest.approx(m1[k], rel=UPDATE_REL, abs=1e-6), k
    w0, w1, w2 = (_weights(models / n) for n in ("base", "one", "two"))
    assert set(w1) == set(w2) and max((w1[k] - w0[k]).abs().max().item() for k in w0) > 1e-3
    assert_same_update(w0, w1, w2)


@pytest.mark.slow
def test_rank0_load_equals_every_rank_loading(models):
    """shard_from_rank0 vs every rank reading the whole model, for a policy, a reference and a
    LoRA PeftModel (rank 0's adapter reaches the others): the same gathered state bit for bit,
    the same buffers (rotary inv_freq is not in the state dict), the LM head still tied, the
    same logits, half the parameters per rank; the Trainer shards its --ref-model the same way."""
    out = models / "load"
    _run([os.path.abspath(__file__), str(models / "base"), str(out)], 2)
    ranks = [json.load(open(f"{out}.rank{r}.json")) for r in (0, 1)]
    for rank, info in enumerate(ranks):
        for name, c in ((n, info[n]) for n in ("policy", "ref", "lora")):
            assert c["state_keys_equal"] and c["buffers_equal"] and c["tied"], (rank, name)
            assert c["requires_grad_equal"], (rank, name)
            # the same bits through the same sharded forward: no reordering, so exact
            assert c["logits_max_diff"] == 0.0, (rank, name, c["logits_max_diff"])
            if rank == 0:  # the gathered state exists on rank 0 only
                assert c["state_max_diff"] == 0.0, (name, c["state_max_diff"])
    for name in ("policy", "ref"):
        full = ranks[0][name]["local_numel"] + ranks[1][name]["local_numel"]
        assert all(0.45 * full <= r[name]["local_numel"] <= 0.55 * full for r in ranks), name
    # the Trainer shards its reference model like the policy
    full = ranks[0]["policy"]["local_numel"] + ranks[1]["policy"]["local_numel"]
    for r in ranks:
        assert r["trainer"]["ref"] == r["trainer"]["policy"] == r["policy"]["local_numel"]
        assert r["trainer"]["ref"] <= 0.55 * full


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
