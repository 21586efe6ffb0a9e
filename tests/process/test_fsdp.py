"""FSDP2 on CPU with gloo (tcli.train.parallel): 2 sharded processes train a tiny Qwen3 to the same
weights and AdamW state as 1 unsharded process, hold about half the parameters each, write one
ordinary checkpoint directory that transformers loads as is, and resume the sharded optimizer.

The test runs this file itself twice: once as 1 plain process and once under
``torch.distributed.run`` with 2 ranks (see ``driver``). Each launch first runs ``worker`` (a minimal
policy-gradient step of tcli's own pieces, ``batch_logprobs`` + ``policy_loss``, not the Trainer),
then the real ``tcli train-step`` command line in-process for every train-step test (full model
and LoRA, each resumed once), so 2 launches produce what every test below reads.
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

LR = 1e-3


# ----------------------------------------------------------------------------- the worker

def _data(vocab: int, n: int = 8):
    """Fixed prompts/responses of different lengths and +-1 advantages (same on every rank)."""
    import torch

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        p = torch.randint(3, vocab, (3 + i % 3,), generator=g).tolist()
        r = torch.randint(3, vocab, (4 + (i * 5) % 7,), generator=g).tolist()
        rows.append((p, r, 1.0 if i % 2 else -1.0))
    return rows


def _train_step(model, optimizer, rows, rank: int, world: int, sharded: bool) -> float:
    """One optimizer step: this rank's rows (i % world == rank), two micro-batches, token-mean
    loss over the GLOBAL token count, scaled by world (gradient reduction averages)."""
    import torch

    from tcli.models.logprobs import batch_logprobs, make_batch
    from tcli.train.loss import policy_loss
    from tcli.train.parallel import clip_grad_norm, set_gradient_sync

    mine = [r for i, r in enumerate(rows) if i % world == rank]
    total = sum(len(r) for _, r, _ in rows)
    micro = [mine[: len(mine) // 2], mine[len(mine) // 2:]]
    for k, mb in enumerate(micro):
        if sharded:
            set_gradient_sync(model, k == len(micro) - 1)
        batch = make_batch([p for p, _, _ in mb], [r for _, r, _ in mb], torch.device("cpu"), 0)
        logp, _ = batch_logprobs(model, batch)
        adv = torch.tensor([[a] * batch.targets.shape[1] for _, _, a in mb])
        pl = policy_loss(logp, logp.detach(), adv, batch.mask)
        (pl.loss.masked_fill(~batch.mask, 0).sum() * (world / total)).backward()
    norm = clip_grad_norm([p for p in model.parameters() if p.grad is not None], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _save(out_dir, model, opt, tok, sharded: bool, steps: int) -> None:
    from tcli.models.checkpoint import save_pretrained_atomic
    from tcli.train import parallel

    if sharded:
        parallel.save_sharded_checkpoint(out_dir, model, tok, opt, state={"step": steps})
    else:
        save_pretrained_atomic(out_dir, model, tok, state={"step": steps}, optimizer=opt)


def worker(model_dir: str, out_dir: str, steps: int, mode: str) -> None:
    """Load (plain | fsdp), resume the optimizer if model_dir has one, train ``steps``, save, and
    write this rank's parameter count and gradient norms beside the output."""
    import torch
    import torch.distributed as dist

    from tcli.models.checkpoint import OPTIMIZER_FILE, load_optimizer_state
    from tcli.models.load import load_model, load_tokenizer
    from tcli.train import parallel

    torch.manual_seed(0)
    world, sharded = int(os.environ.get("WORLD_SIZE", "1")), mode == "fsdp"
    rank = dist.get_rank() if world > 1 else 0
    model = load_model(model_dir, train=True)
    full_numel = parallel.local_numel(model)
    if sharded:
        parallel.shard_model(model, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    saved = os.path.join(model_dir, OPTIMIZER_FILE)
    if os.path.exists(saved):
        state = load_optimizer_state(saved, "cpu") if rank == 0 else None
        if sharded:
            parallel.load_full_optimizer_state(model, opt, state)
        else:
            opt.load_state_dict(state)
    rows = _data(int(model.config.vocab_size))
    norms = [_train_step(model, opt, rows, rank, world, sharded) for _ in range(steps)]
    info = {"rank": rank, "local_numel": parallel.local_numel(model), "full_numel": full_numel,
            "norms": norms}
    with open(f"{out_dir}.rank{rank}.json", "w") as f:
        json.dump(info, f)
    _save(out_dir, model, opt, load_tokenizer(model_dir) if rank == 0 else None, sharded, steps)


# ----------------------------------------------------------------------------- the launches

TRAIN_ARGS = ["--lr", "1e-3", "--micro-batch-tokens", "24", "--mini-batches", "2", "--epochs", "2",
              "--seed", "1"]
LORA = ["--lora-rank", "4", "--lora-alpha", "8"]


def cli_jobs(n: int) -> list[tuple[str, str, list[str]]]:
    """(output, start checkpoint, extra flags) of every train-step run for ``n`` processes, in
    order: full model and LoRA from the base, then each resumed from its own checkpoint."""
    fsdp = ["--parallel", "fsdp"] if n > 1 else []
    return [(f"t{n}", "base", fsdp), (f"t{n}b", f"t{n}", fsdp),
            (f"l{n}", "base", fsdp + LORA), (f"l{n}b", f"l{n}", fsdp + LORA)]


def _cli_in_process(argv: list[str], out_file: str, err_file: str) -> int:
    """``tcli *argv`` through tcli.cli.main in this process, fd 1/2 into files; the exit code."""
    from tcli.cli import main

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out_file, "wb") as out, open(err_file, "wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return code


def driver(root: str) -> None:
    """One launch: ``worker`` (2 steps), then every train-step of :func:`cli_jobs` in one process
    group (kept alive across commands: re-creating the default group in one process races on the
    store's keys), each job's exit code, stdout and stderr written beside its output."""
    from unittest import mock

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    base = os.path.join(root, "base")
    worker(base, os.path.join(root, "one" if world == 1 else "two"), 2,
           "plain" if world == 1 else "fsdp")
    with mock.patch.object(dist, "destroy_process_group"):
        for out, start, extra in cli_jobs(world):
            o = os.path.join(root, out)
            argv = ["train-step", os.path.join(root, "roll.jsonl"), "-m",
                    os.path.join(root, start), "-o", o, *TRAIN_ARGS, *extra]
            code = _cli_in_process(argv, f"{o}.stdout", f"{o}.rank{rank}.stderr")
            with open(f"{o}.rank{rank}.rc", "w") as f:
                f.write(str(code))
            if world > 1:
                dist.barrier()
    if world > 1:
        dist.destroy_process_group()


def _launch(root, nproc: int) -> None:
    from conftest import run_torchrun

    me = os.path.abspath(__file__)
    if nproc > 1:
        r = run_torchrun([me, str(root)], nproc=nproc, timeout=900)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("WORLD_SIZE", None)
        r = subprocess.run([sys.executable, me, str(root)], cwd=REPO, capture_output=True,
                           timeout=900, env=env)
    assert r.returncode == 0, r.stderr.decode()[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """base model and rollouts; 1 plain process and 2 FSDP processes each run the worker's 2
    steps and every train-step job."""
    import shutil

    d = tmp_path_factory.mktemp("fsdp")
    base = shutil.copytree(tiny_model, d / "base")
    _rollouts(base, d / "roll.jsonl")
    _launch(d, 1)
    _launch(d, 2)
    return d


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _optim(path):
    import torch

    return torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)


@pytest.mark.slow
def test_fsdp_two_ranks_equal_one_process(runs):
    """Weights, AdamW moments and gradient norms up to float32 reordering (bounds: conftest)."""
    from conftest import SUM_REL, UPDATE_REL, assert_close_state, assert_same_update

    w0, w1, w2 = _weights(runs / "base"), _weights(runs / "one"), _weights(runs / "two")
    assert set(w2) == set(w1) == set(w0)  # the tied LM head is not written twice
    assert max((w1[k] - w0[k]).abs().max().item() for k in w0) > 1e-3  # training moved them
    assert_same_update(w0, w1, w2)
    o1, o2 = _optim(runs / "one"), _optim(runs / "two")
    assert o2["param_groups"] == o1["param_groups"] and set(o2["state"]) == set(o1["state"])
    for i, s in o1["state"].items():
        assert float(o2["state"][i]["step"]) == float(s["step"]) == 2.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_state(s[key], o2["state"][i][key], label=(i, key))
    r0, r1 = (json.load(open(f"{runs / 'two'}.rank{r}.json")) for r in (0, 1))
    n1 = json.load(open(f"{runs / 'one'}.rank0.json"))
    assert r0["norms"][0] == pytest.approx(n1["norms"][0], rel=SUM_REL)  # the same weights
    assert r0["norms"][1] == pytest.approx(n1["norms"][1], rel=UPDATE_REL)  # after one update


@pytest.mark.slow
def test_fsdp_rank_holds_half_the_parameters(runs):
    r0, r1 = (json.load(open(f"{runs / 'two'}.rank{r}.json")) for r in (0, 1))
    full = r0["full_numel"]
    assert r0["local_numel"] + r1["local_numel"] == full
    for r in (r0, r1):
        assert 0.45 * full <= r["local_numel"] <= 0.55 * full


@pytest.mark.slow
def test_fsdp_checkpoint_loads_in_transformers(runs):
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import UPDATE_REL

    ids = torch.tensor([[5, 9, 17, 33, 4]])
    logits = []
    for name in ("base", "one", "two"):
        m = AutoModelForCausalLM.from_pretrained(str(runs / name))
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        with torch.no_grad():
            logits.append(m(input_ids=ids).logits.double())
    l0, l1, l2 = logits
    # weights apart by a small fraction of their update move the logits by about that fraction
    # of what the update moved them (to first order), with 2x room for the second
    assert (l1 - l2).norm() <= 2 * UPDATE_REL * (l1 - l0).norm()


# ----------------------------------------------------------------------------- train-step

def _rollouts(model_dir, path) -> None:
    """12 on-policy rollouts in 3 groups (prompts of 3 lengths), +-advantages."""
    import orjson
    import torch

    from tcli.models.load import load_model
    from tcli.models.logprobs import sequence_logprobs

    rows = _data(int(load_model(model_dir).config.vocab_size), 12)
    P = [[5, 6, 7][: 1 + i % 3] for i in range(12)]
    R = [r for _, r, _ in rows]
    with torch.no_grad():
        lps = sequence_logprobs(load_model(model_dir), P, R, micro_batch_tokens=64)
    with open(path, "wb") as f:
        for i, (p, r, lp) in enumerate(zip(P, R, lps)):
            f.write(orjson.dumps({"schema": "tcli.rollout/1", "prompt_id": i % 3, "sample_id": i,
                                  "prompt_token_ids": p, "token_ids": r, "logprobs": lp.tolist(),
                                  "advantages": [(1.0 if i % 2 else -1.0)] * len(r)}) + b"\n")


def _metrics(runs, out: str, nproc: int) -> dict:
    """The train-step job's metrics line (stdout: rank 0 only) after checking every rank's exit."""
    for r in range(nproc):
        err = (runs / f"{out}.rank{r}.stderr").read_text()
        assert (runs / f"{out}.rank{r}.rc").read_text() == "0", err[-4000:]
    lines = (runs / f"{out}.stdout").read_bytes().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


@pytest.mark.slow
def test_train_step_fsdp_equals_one_process(runs):
    """tcli train-step --parallel fsdp under torchrun (2 ranks, uneven micro-batch counts):
    metrics and weights of one process, then a second step resumed from each checkpoint."""
    from conftest import UPDATE_REL, assert_same_update

    m1, m2 = _metrics(runs, "t1", 1), _metrics(runs, "t2", 2)
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    # 4 optimizer steps: later ones see weights apart by up to UPDATE_REL of an update (conftest);
    # abs: approx_kl and clip_frac start at 0
    for k in ("loss", "clip_frac", "approx_kl", "entropy", "grad_norm", "num_tokens"):
        assert m2[k] == pytest.approx(m1[k], rel=UPDATE_REL, abs=1e-6), k
    n1, n2 = _metrics(runs, "t1b", 1), _metrics(runs, "t2b", 2)
    assert n2["grad_norm"] == pytest.approx(n1["grad_norm"], rel=UPDATE_REL)
    w0 = _weights(runs / "base")
    for a, b in (("t1", "t2"), ("t1b", "t2b")):  # both measured from base: the whole training
        w1, w2 = _weights(runs / a), _weights(runs / b)
        assert set(w1) == set(w2)
        assert_same_update(w0, w1, w2)
    w = _weights(runs / "t1b")
    assert max((w[k] - w0[k]).abs().max().item() for k in w0) > 1e-3


def _initial_adapter(base) -> dict:
    """The adapter train-step makes before its first update (same seed and LoRA settings), keyed
    as the saved adapter files: where the LoRA runs' updates are measured from."""
    from peft import get_peft_model_state_dict

    from tcli.config.stages import TrainOptions
    from tcli.train.trainer import Trainer

    seed = int(TRAIN_ARGS[TRAIN_ARGS.index("--seed") + 1])
    opts = TrainOptions(lora_rank=int(LORA[1]), lora_alpha=float(LORA[3]))
    t = Trainer(str(base), opts, seed=seed)
    start = {k: v.detach().clone() for k, v in get_peft_model_state_dict(t.peft).items()}
    assert all(not v.any() for k, v in start.items() if "lora_B" in k)  # B starts at zero
    return start


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


@pytest.mark.slow
def test_train_step_fsdp_with_lora(runs):
    """--parallel fsdp --lora-rank: an adapter on a sharded base gives the 1-process adapter and
    AdamW state (adapter parameters only) up to float32 reordering (bounds: conftest), resume
    included; no full weights written."""
    from conftest import assert_close_state, assert_same_update

    for one, two in (("l1", "l2"), ("l1b", "l2b")):
        _metrics(runs, one, 1)
        _metrics(runs, two, 2)
    start = _initial_adapter(runs / "base")
    for one, two in (("l1", "l2"), ("l1b", "l2b")):
        a1, a2 = _adapter(runs / one), _adapter(runs / two)
        assert set(a1) == set(a2) == set(start) and len(a1) == 28
        assert max(v.abs().max().item() for k, v in a1.items() if "lora_B" in k) > 1e-4
        assert_same_update(start, a1, a2)  # measured from the new adapter: the whole training
        assert not os.path.exists(runs / two / "model.safetensors")
        o1, o2 = _optim(runs / one), _optim(runs / two)
        assert len(o2["state"]) == len(o1["state"]) == 28
        for i, s in o1["state"].items():
            assert_close_state(s["exp_avg"], o2["state"][i]["exp_avg"], label=(one, i))
    assert float(_optim(runs / "l2b")["state"][0]["step"]) == 8.0  # 2 x (2 epochs x 2 minis)


if __name__ == "__main__":
    driver(sys.argv[1])
