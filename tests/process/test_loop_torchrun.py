"""`torchrun --nproc-per-node 2 -m tcli loop` (gloo, CPU) against the same loop in one process.

Each rank samples, verifies and scores its block of the step's prompts, the ranks' records are
gathered in prompt order, and the trainer's DDP/FSDP update runs on the whole batch. With one
prompt per engine batch and one group per micro-batch the two runs do the same float operations
in the same order, so rollouts are byte-identical and weights bit-identical as a rule. The tests
allow what rounding can do where it may differ (CPU matmul kernels may round by a tensor's
alignment, and PPO's critic shards responses, not groups): the bounds are conftest's (weights as
a fraction of their update) and :data:`DRIFT_TOL`. Five torchrun launches: DDP (2 steps,
TensorBoard), its resume under FSDP stopped by a wall-clock budget, PPO with whitening, refill
rounds, and a bad prompt that only rank 1 sees.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import orjson
import pytest

from conftest import REPO, arith_run_dir, assert_same_update, run_torchrun  # noqa: E402
from examples.arith.task import make_prompts  # noqa: E402

ROOT = str(REPO)
REWARD_MODULE = "tcli_test_parity_reward"
# every setting the comparison depends on; the rest are flags of each run
CONFIG = """
model = "{model}"
train_data = "{d}/train.jsonl"
eval_data = "{d}/test.jsonl"
steps = 3
prompts_per_step = 2
filter_groups = true
keep_last = 2
seed = 3
[sample]
n = 4
max_new_tokens = 12
min_new_tokens = 8
prompt_template = "plain"
prompts_per_batch = 1
[verify]
task = "python:{module}:score"
[advantages]
estimator = "tempo"
[train]
lr = 1e-3
micro_batch_tokens = 64
[eval]
every = 2
limit = 8
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, prompts, a reward with variance (the parity of the answer's length: a random
    model rarely solves arith), the TOML, and a train file whose 2nd prompt cannot be encoded."""
    d, model = arith_run_dir(tmp_path_factory, "looptr", {
        "train.jsonl": make_prompts(40, seed=1, split="train"),
        "test.jsonl": make_prompts(8, seed=2, split="test")},
        hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    (d / f"{REWARD_MODULE}.py").write_text(
        "def score(text, answer, record):\n    return float(len(text) % 2), {}\n")
    (d / "loop.toml").write_text(CONFIG.format(model=model, d=d, module=REWARD_MODULE))
    good, second = make_prompts(2, seed=5, split="train")
    bad = {"id": second["id"], "answer": second["answer"],  # 2 turns, no chat template: exit 65
           "messages": [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": second["prompt"]}]}
    (d / "bad.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in (good, bad)))
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    return d


def _one_process(d, run, **flags) -> str:
    """The reference: the same loop in this process."""
    from tcli.config.loop import load_config
    from tcli.loop import run_loop

    run_loop(load_config(str(d / "loop.toml"), {"run_dir": str(run), **flags}), log=lambda s: None)
    return str(run)


def _torchrun(d, *args, timeout=600) -> subprocess.CompletedProcess:
    return run_torchrun(["-m", "tcli", "loop", *args], timeout=timeout,
                        env={"PYTHONPATH": f"{d}{os.pathsep}{ROOT}"})


def _metrics(run) -> list[dict]:
    """metrics.jsonl without timings (and world_size, which is the point of the comparison)."""
    def keep(k: str) -> bool:
        return not (k.startswith("seconds_") or "time" in k or "per_s" in k
                    or k.endswith("world_size"))

    with open(os.path.join(run, "metrics.jsonl"), "rb") as f:
        return [{k: v for k, v in orjson.loads(x).items() if keep(k)} for x in f]


def _rollouts(run, step: int) -> list[dict]:
    from tcli.io import RecordReader

    return [r for _, r in RecordReader(os.path.join(run, "rollouts", f"step_{step}.arrow"))]


def _max_weight_diff(a: str, b: str) -> float:
    from safetensors.numpy import load_file

    wa, wb = (load_file(os.path.join(p, "model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys()
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


def assert_same_weights(start: str, a: str, b: str) -> None:
    """Checkpoints ``a`` and ``b`` trained from ``start``: conftest.assert_same_update."""
    from safetensors.numpy import load_file

    assert_same_update(*(load_file(os.path.join(p, "model.safetensors")) for p in (start, a, b)))


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    return _one_process(setup, tmp_path_factory.mktemp("ref") / "run")


@pytest.fixture(scope="module")
def ddp(setup, tmp_path_factory):
    """2 DDP ranks, steps 1-2 of the reference's 3 (TensorBoard on)."""
    base = tmp_path_factory.mktemp("ddp")
    run, tb = base / "run", base / "tb"
    p = _torchrun(setup, "-c", setup / "loop.toml", "--run-dir", run, "--steps", 2,
                  "--tensorboard", tb)
    assert p.returncode == 0, p.stderr.decode()[-4000:]
    return str(run), str(tb), p


def _floats(v) -> bool:
    return isinstance(v, float) or (isinstance(v, list) and any(isinstance(x, float) for x in v))


# Floats computed from the trained weights (log-probs, critic values, advantages, the next step's
# metrics). The two runs' weights are equal, or apart by rounding that AdamW amplifies: at most
# UPDATE_REL of their update (conftest). One update at lr 1e-3 moves these log-probs by up to
# ~0.4 (a step's rollouts rescored with that step's checkpoint), so rounding moves them by at most
# ~2e-3 * 0.4 = 8e-4; the forward's own rounding adds ~1e-6. A wrong update moves them by far more:
# a 1% wrong lr by ~4e-3, a rank that trains on its own half of the batch by ~0.1.
DRIFT_TOL = 1e-3


def assert_same_rollouts(two: list[dict], one: list[dict], tol: float = DRIFT_TOL) -> None:
    """Same records in the same order: every field equal, floats (log-probs, advantages, ...) to
    ``tol``. Usually they are byte-identical; CPU matmuls may round differently by a last bit
    when the weights sit at other addresses (mmap vs fresh allocation), so bits are not required."""
    assert len(two) == len(one)
    print("largest float difference of the rollouts:", max(
        (float(np.max(np.abs(np.asarray(a[k], float) - np.asarray(b[k], float)), initial=0.0))
         for a, b in zip(two, one) for k in a if _floats(a[k])), default=0.0))
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if not _floats(v)} == \
            {k: v for k, v in b.items() if not _floats(v)}
        assert all(_close(a[k], b[k], tol) for k in a if _floats(a[k])), a["prompt_id"]


def assert_same_metrics(two: list[dict], one: list[dict], tol: float = DRIFT_TOL) -> None:
    """Same records; floats (timings left out) to DRIFT_TOL: a step's metrics come from the
    weights the previous steps trained."""
    assert [m.keys() for m in two] == [m.keys() for m in one]
    for a, b in zip(two, one):
        assert {k: v for k, v in a.items() if not _floats(v)} == \
            {k: v for k, v in b.items() if not _floats(v)}
        assert all(_close(a[k], b[k], tol) for k in a if _floats(a[k])), a


def setup_model(run: str) -> str:
    """The start model of a run (its config.toml)."""
    import tomllib

    with open(os.path.join(run, "config.toml"), "rb") as f:
        return tomllib.load(f)["model"]


def test_ddp_loop_equals_one_process(reference, ddp):
    run, tb, p = ddp
    for step in (1, 2):  # every record of every step
        assert_same_rollouts(_rollouts(run, step), _rollouts(reference, step))
    assert len(_rollouts(run, 1)) == 2 * 4
    assert_same_metrics(_metrics(run), _metrics(reference)[:len(_metrics(run))])
    assert [(m["kind"], m["step"]) for m in _metrics(run)] == [("eval", 0), ("train", 1),
                                                              ("train", 2), ("eval", 2)]
    ref2 = os.path.join(reference, "checkpoints", "step_2")
    assert_same_weights(setup_model(reference), os.path.join(run, "checkpoints", "step_2"), ref2)
    assert _max_weight_diff(ref2, str(setup_model(reference))) > 1e-4  # training moved them
    train = [m for m in _metrics(run) if m["kind"] == "train"]
    assert all(m["train_optimizer_steps"] >= 1 for m in train)
    # rank 0 alone writes: one TensorBoard event file, one log of each step on stderr
    assert len(os.listdir(tb)) == 1
    err = p.stderr.decode()
    assert err.count("step    1  reward") == 1 and "tcli: error" not in err
    assert os.path.exists(os.path.join(run, "metrics.png"))
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["best", "step_1", "step_2"]


def test_resume_under_fsdp_stops_all_ranks_at_the_wall_budget(setup, reference, ddp):
    """The DDP run resumed with FSDP (sampling from a gathered unsharded copy) for ``steps = 4``
    under a wall-clock budget that runs out during step 3: rank 0's clock decides, every rank
    stops after step 3, which equals the reference's last step."""
    run = ddp[0]
    spent = max(m["wall_time"] for m in map(orjson.loads, open(os.path.join(run, "metrics.jsonl"),
                                                               "rb")))
    p = _torchrun(setup, "--resume", run, "--parallel", "fsdp", "--steps", 4,
                  "--max-wall-seconds", round(spent + 0.002, 3))
    assert p.returncode == 0, p.stderr.decode()[-4000:]
    assert "wall-clock budget reached" in p.stderr.decode()
    assert_same_metrics(_metrics(run), _metrics(reference))
    resumed, ref = _rollouts(run, 3), _rollouts(reference, 3)
    assert {r["model"] for r in resumed} == {setup_model(run)}  # the run's, not step_2
    assert_same_rollouts(resumed, ref)
    assert_same_weights(setup_model(reference), os.path.join(run, "checkpoints", "step_3"),
                        os.path.join(reference, "checkpoints", "step_3"))
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["best", "step_2", "step_3"]


def _close(a, b, tol: float) -> bool:
    return np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                       rtol=tol, atol=tol)


def test_ppo_with_whitening_under_torchrun(setup, tmp_path):
    """PPO: critic values per rank, whitening over the gathered batch (global statistics),
    train-critic through its DDP trainer. The critic's micro-batches hold responses of both
    ranks in one process, so floats agree to rounding (tokens and rewards exactly)."""
    flags = {"steps": 2, "estimator": "ppo", "whiten": True, "eval_every": 0,
             "filter_groups": False}
    ref = _one_process(setup, tmp_path / "ref", **flags)
    run = tmp_path / "two"
    p = _torchrun(setup, "-c", setup / "loop.toml", "--run-dir", run, "--steps", 2,
                  "--estimator", "ppo", "--whiten", "--eval-every", 0, "--no-filter-groups")
    assert p.returncode == 0, p.stderr.decode()[-4000:]
    for step in (1, 2):
        two, one = _rollouts(str(run), step), _rollouts(ref, step)
        assert [r["token_ids"] for r in two] == [r["token_ids"] for r in one]
        assert [r["reward"] for r in two] == [r["reward"] for r in one]
        for field in ("logprobs", "critic_values", "advantages", "returns"):
            assert all(_close(a[field], b[field], DRIFT_TOL) for a, b in zip(two, one)), field
        flat = np.concatenate([r["advantages"] for r in two if r["advantages"]])
        assert abs(flat.mean()) < 1e-6 and abs(flat.std() - 1) < 1e-3  # whitened globally
    for a, b in zip(_metrics(str(run)), _metrics(ref)):
        assert a.keys() == b.keys()
        assert all(_close(a[k], b[k], DRIFT_TOL) for k in a if isinstance(a[k], (int, float))), a
    ckpt = lambda r, name: os.path.join(r, "checkpoints", name)  # noqa: E731
    assert_same_weights(setup_model(ref), ckpt(run, "step_2"), ckpt(ref, "step_2"))
    assert_same_weights(ckpt(ref, "critic_0"), ckpt(run, "critic_2"), ckpt(ref, "critic_2"))


def test_refill_rounds_under_torchrun_equal_one_process(setup, tmp_path):
    """Refill (§5.9) with groups of 2 (half of them informative): the rounds, counted on the
    gathered groups, are the same on both ranks and in one process (the rounds of 3 prompts
    split 2 + 1); rollouts of every round, metrics and weights as one process's."""
    toml = tmp_path / "refill.toml"
    toml.write_text((setup / "loop.toml").read_text().replace("n = 4", "n = 2").replace(
        "prompts_per_step = 2", "prompts_per_step = 3\nrefill = true\nrefill_max_rounds = 3"))
    ref = tmp_path / "ref"
    from tcli.config.loop import load_config
    from tcli.loop import run_loop

    run_loop(load_config(str(toml), {"run_dir": str(ref), "steps": 1, "eval_every": 0}),
             log=lambda s: None)
    run = tmp_path / "two"
    p = _torchrun(setup, "-c", toml, "--run-dir", run, "--steps", 1, "--eval-every", 0)
    assert p.returncode == 0, p.stderr.decode()[-4000:]
    one, two = _metrics(str(ref)), _metrics(str(run))
    assert one[0]["refill_rounds"] == 3 and one[0]["informative_groups"] == 3  # rounds of 3
    assert_same_metrics(two, one)
    assert_same_rollouts(_rollouts(str(run), 1), _rollouts(str(ref), 1))
    ckpt = lambda r: os.path.join(r, "checkpoints", "step_1")  # noqa: E731
    assert_same_weights(setup_model(str(ref)), ckpt(str(run)), ckpt(str(ref)))


def test_a_bad_prompt_on_one_rank_ends_every_rank(setup, tmp_path):
    """A prompt that cannot be encoded (rank 1's to sample): all ranks stop with its one-line
    error (printed once, by rank 0, naming file, record and field) and a non-zero exit, before
    the run directory is made."""
    run = tmp_path / "run"
    p = _torchrun(setup, "-c", setup / "loop.toml", "--run-dir", run,
                  "--train-data", setup / "bad.jsonl", "--eval-every", 0, timeout=300)
    err = p.stderr.decode()
    assert p.returncode != 0
    lines = [x for x in err.splitlines() if x.startswith("tcli: error:")]
    assert lines == [f"tcli: error: {setup / 'bad.jsonl'}:2: field 'messages': a conversation "
                     "needs a chat template (this tokenizer has none, or --no-chat-template was "
                     "given)"], err[-3000:]
    assert "exitcode  : 65" in err  # the workers' own exit code (torchrun's is 1)
    assert not run.exists()


def test_blocks_cover_the_prompts_in_order():
    """Rank r's block; the blocks of ranks 0..N-1 concatenated are the prompts in order (what
    makes the gathered rollouts the 1-process ones), sizes within one of each other."""
    from tcli.train.dist import DistInfo, block_share

    for n in (0, 1, 2, 5, 16, 17):
        for world in (1, 2, 3, 4, 8):
            blocks = [list(block_share(n, DistInfo(r, world))) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_folded_group_stats_equal_one_accumulator():
    """The ranks' per-group AdvantageStats folded in order give the very floats of one
    accumulator that saw the groups one after another (the 1-process metrics, not just close)."""
    from tcli.algos.estimators import Group
    from tcli.loop.ranks import fold_stats
    from tcli.stages.advantages import AdvantageStats, advantages_group
    from tcli.config.stages import AdvantageOptions

    rng = np.random.default_rng(0)
    groups = []
    for g in range(7):
        recs = [{"prompt_id": f"p{g}", "sample_id": j, "prompt_token_ids": [1, 2],
                 "token_ids": rng.integers(3, 9, size=int(rng.integers(1, 9))).tolist(),
                 "reward": float(rng.random())} for j in range(4)]
        groups.append(Group.from_records(recs))
    one, parts = AdvantageStats(), []
    opts = AdvantageOptions(estimator="tempo")
    for g in groups:
        advantages_group(g, opts, one)
        parts.append(AdvantageStats())
        advantages_group(g, opts, parts[-1])
    assert fold_stats(parts).summary() == one.summary()
    assert fold_stats(parts[:3]).summary() != one.summary()
