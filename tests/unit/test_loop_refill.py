"""Refill (docs/design.md §5.9): further prompts until a step holds ``prompts_per_step``
informative groups. The rounds on their own with a scripted sampler (draws, caps, order, exact
metrics), then ``tcli loop`` in process with the real trainer and an engine whose informative
prompts are known in advance: the trained step, refill off unchanged, resume."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import arith_run_dir, loop_config, read_metrics, register_engine

# ----------------------------------------------------------------------------- the rounds alone

POOL = [{"id": f"p{i}"} for i in range(10)]
TOKENS = 3  # per response; 2 responses per group: 6 sampled tokens per prompt


def _rounds(informative: list[list[bool]]):
    """A sample_round whose k-th call returns groups informative as ``informative[k]`` says
    (prompt by prompt, repeated as needed), with a log of (prompts, seed) per call."""
    calls = []

    def sample_round(prompts, seed):
        flags = informative[len(calls)]
        calls.append(([p["id"] for p in prompts], seed))
        recs = [{"prompt_id": p["id"], "sample_id": j, "token_ids": [5] * TOKENS}
                for p in prompts for j in range(2)]
        return recs, [(2, None, flags[i % len(flags)]) for i in range(len(prompts))]
    return sample_round, calls


def _refill(want=3, rounds=4, tokens=0, pool=POOL, step=1, seed=0):
    from tcli.loop.refill import Refill

    return Refill(pool, want, seed, step, rounds, tokens)


def test_prompt_draws_are_deterministic_and_never_repeat():
    from tcli.loop.refill import refill_prompts

    used = {id(p) for p in POOL[:3]}
    a = refill_prompts(POOL, used, 4, 7, 2, 1)
    assert [p["id"] for p in a] == [p["id"] for p in refill_prompts(POOL, set(used), 4, 7, 2, 1)]
    assert len(a) == 4 and not {id(p) for p in a} & used
    # another round, step or seed draws otherwise (from the same 7 unused prompts)
    others = [refill_prompts(POOL, used, 4, *k) for k in ((7, 2, 2), (7, 3, 1), (8, 2, 1))]
    assert any([p["id"] for p in o] != [p["id"] for p in a] for o in others)
    used |= {id(p) for p in a}
    b = refill_prompts(POOL, used, 4, 7, 2, 2)
    assert len(b) == 3 and not {id(p) for p in b} & used  # only 3 left
    assert refill_prompts(POOL, used | {id(p) for p in b}, 4, 7, 2, 3) == []


def test_round_seeds_first_is_the_steps_own():
    from tcli.loop.refill import refill_seed
    from tcli.loop.steps import step_seed

    assert refill_seed(5, 3, 0) == step_seed(5, 3)
    seeds = {refill_seed(5, s, r) for s in range(1, 20) for r in range(5)}
    assert len(seeds) == 19 * 5 and all(0 <= x < 2**31 for x in seeds)
    assert refill_seed(5, 3, 2) == refill_seed(5, 3, 2)


def test_evaluation_seed_differs_from_the_training_seed():
    """Evaluation at step s samples with its own seed, not the one training sampled with."""
    from tcli.loop.steps import step_seed

    # (seed * 1_000_003 + step * 7919 + evaluation) mod 2^31: 5_000_015 + 23_757 (+ 1)
    assert step_seed(5, 3) == 5_023_772
    assert step_seed(5, 3, evaluation=True) == 5_023_773


def test_round_size_and_keep_order():
    from tcli.loop.refill import keep_first, round_size

    assert round_size(8, 0, 8) == 8         # nothing informative yet: a full step
    assert round_size(8, 6, 8) == 3         # 2 missing at a rate of 6/8: ceil(2.67)
    assert round_size(8, 1, 8) == 8         # 7 / (1/8) = 56, capped at a step's worth
    assert keep_first([False, True, True, False, True, True], 3) == [False, True, True, False,
                                                                     True, False]


def test_surplus_round_keeps_the_first_in_prompt_order_and_exact_metrics():
    sample_round, calls = _rounds([[False, True, False], [True, True, True]])
    r = _refill().run(_first(3), sample_round)
    # round 0: 1 of 3 informative; round 1: 2 missing / (1/3) = 6, capped at 3 prompts
    assert [len(p) for p, _ in calls] == [3, 3]
    assert r.keep() == [False, True, False, True, True, False]
    assert r.metrics() == {"informative_share": 1 / 3, "refill_rounds": 1,
                           "refill_tokens": 3 * 2 * TOKENS, "refill_stop": "filled",
                           "informative_groups": 3,
                           "tokens_per_informative_group": 6 * 2 * TOKENS / 3}
    from tcli.loop.refill import refill_seed

    assert [s for _, s in calls] == [refill_seed(0, 1, 0), refill_seed(0, 1, 1)]
    ids = [i for p, _ in calls for i in p]
    assert len(ids) == len(set(ids))         # no prompt twice in a step


def _first(k, seed=0, step=1):
    from tcli.loop.steps import step_prompts

    return step_prompts(POOL, k, seed, step)


@pytest.mark.parametrize("kw, stop, rounds", [({"rounds": 2}, "max_rounds", 2),
                                               ({"tokens": 10}, "max_tokens", 1),
                                               ({"tokens": 19}, "max_tokens", 2),
                                               ({"rounds": 0}, "max_rounds", 0)])
def test_caps_stop_the_rounds_and_the_step_keeps_what_it_has(kw, stop, rounds):
    sample_round, calls = _rounds([[False, True, False]] + [[False] * 3] * 9)
    r = _refill(**kw).run(_first(3), sample_round)
    assert (r.stop, r.rounds, len(calls)) == (stop, rounds, rounds + 1)
    m = r.metrics()
    assert m["informative_groups"] == 1 and m["refill_tokens"] == rounds * 3 * 2 * TOKENS
    assert m["tokens_per_informative_group"] == (rounds + 1) * 3 * 2 * TOKENS
    assert sum(r.keep()) == 1


def test_an_exhausted_pool_stops_and_nothing_informative_gives_null():
    sample_round, calls = _rounds([[False] * 3] * 4)
    r = _refill(pool=POOL[:5]).run(POOL[:3], sample_round)
    assert r.stop == "no_prompts" and [len(p) for p, _ in calls] == [3, 2]
    assert sorted(i for p, _ in calls for i in p) == [p["id"] for p in POOL[:5]]
    m = r.metrics()
    assert m["informative_groups"] == 0 and m["tokens_per_informative_group"] is None
    assert r.keep() == [False] * 5


def test_refill_runs_again_identically():
    runs = []
    for _ in range(2):
        sample_round, calls = _rounds([[False, False, True]] * 5)
        _refill(want=4, step=6, seed=3).run(_first(4, seed=3, step=6), sample_round)
        runs.append(calls)
    assert runs[0] == runs[1] and len(runs[0]) > 2


# ----------------------------------------------------------------------------- settings

def test_settings_reach_flags_and_toml(tmp_path):
    from tcli.config.loop import config_fields, dump_toml, load_config, loop_flags
    from tcli.errors import UsageError

    assert {"refill", "refill_max_rounds", "refill_max_tokens"} <= set(config_fields())
    flags = {lf.param: lf.flag for lf in loop_flags()}
    assert flags["refill_max_tokens"] == "--refill-max-tokens"
    toml = tmp_path / "run.toml"
    toml.write_text("refill = true\nrefill_max_rounds = 2\nrefill_max_tokens = 500\n")
    cfg = load_config(str(toml))
    assert (cfg.run.refill, cfg.run.refill_max_rounds, cfg.run.refill_max_tokens) == (True, 2, 500)
    assert "refill = true\nrefill_max_rounds = 2\nrefill_max_tokens = 500\n" in dump_toml(cfg)
    assert "refill = false\n" in dump_toml(load_config(None))
    with pytest.raises(UsageError, match=r"--refill-max-rounds \(refill_max_rounds\) must be >= 0"):
        load_config(None, {"refill_max_rounds": -1})
    with pytest.raises(UsageError, match=r"--refill \(refill\) needs groups of 2 or more"):
        load_config(None, {"refill": True, "n": 1})


# ----------------------------------------------------------------------------- the loop

N = 4
PROMPTS = [{"id": f"q{i}", "prompt": f"{i}+{i}=?", "answer": str(2 * i)} for i in range(1, 13)]
INFORMATIVE = {2, 3, 5, 7, 11}   # prompts answered right by half their samples; the rest: none


class RefillEngine:
    """Prompt i is answered right by N/2 of its samples when i is in ``informative``, else by
    none, whatever the policy; every call's (prompt numbers, seed) is logged."""

    name = "scripted_refill"
    informative = INFORMATIVE
    calls: list = []

    def __init__(self, model: str, opts, *, seed: int = 0, trainer=None):
        from transformers import AutoTokenizer

        self.model_path = model
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.policy_version = trainer.policy_version if trainer else 0

    def generate(self, prompts, n, cfg):
        from tcli.engines import Completion

        nums = [int(self.tokenizer.decode(list(p), skip_special_tokens=True).split("+")[0])
                for p in prompts]
        RefillEngine.calls.append((nums, cfg.seed))
        out = []
        for i in nums:
            good = n // 2 if i in self.informative else 0
            texts = [f"#### {2 * i if j < good else 2 * i + 1}" for j in range(n)]
            ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"]
                   + [self.tokenizer.eos_token_id] for t in texts]
            out.append([Completion(x, [-1.0] * len(x), "stop") for x in ids])
        return out

    def load_weights(self, model_dir, policy_version):
        self.policy_version = policy_version

    def follow(self, trainer):
        self.policy_version = trainer.policy_version


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    register_engine("scripted_refill", RefillEngine)
    return arith_run_dir(tmp_path_factory, "refill", {"prompts.jsonl": PROMPTS})


def _cfg(model, run_dir, **flags):
    d, _ = model
    return loop_config(model, run_dir, **{"train_data": str(d / "prompts.jsonl"), "eval_every": 0,
                                          "engine": "scripted_refill", "n": N, "keep_last": 5,
                                          "steps": 2, **flags})


def _run(cfg, resume=False) -> list[dict]:
    from tcli.loop import run_loop

    run_loop(cfg, resume=resume, log=lambda s: None)
    return [m for m in read_metrics(cfg.run.run_dir) if m["kind"] == "train"]


def _rollouts(run_dir, step: int) -> list[dict]:
    from tcli.io import RecordReader

    return [r for _, r in RecordReader(os.path.join(run_dir, "rollouts", f"step_{step}.arrow"))]


def _no_timings(m: dict) -> dict:
    return {k: v for k, v in m.items() if not (k.startswith("seconds_") or "time" in k
                                               or "per_s" in k)}


def test_loop_trains_on_exactly_prompts_per_step_informative_groups(model, tmp_path):
    RefillEngine.calls.clear()
    train = _run(_cfg(model, tmp_path / "run", refill=True))
    for m in train:
        recs = _rollouts(tmp_path / "run", m["step"])
        ids = [r["prompt_id"] for r in recs[::N]]
        assert len(ids) == len(set(ids))                        # no prompt twice in a step
        first = [int(i[1:]) in INFORMATIVE for i in ids[:4]]
        assert m["informative_share"] == sum(first) / 4 < 1
        assert m["refill_rounds"] >= 1 and m["refill_stop"] == "filled"
        assert m["informative_groups"] == 4
        assert m["train_num_sequences"] == 4 * N                # the 4 informative groups only
        assert m["groups_dropped"] == len(ids) - 4
        assert m["sampled_tokens"] == sum(len(r["token_ids"]) for r in recs)  # every round's
        assert m["tokens_per_informative_group"] == m["sampled_tokens"] / 4
        assert m["refill_tokens"] == sum(len(r["token_ids"]) for r in recs[4 * N:])
    assert train[1]["sampled_tokens_total"] == train[0]["sampled_tokens"] + train[1]["sampled_tokens"]
    # the engine sampled every round with its own seed
    from tcli.loop.refill import refill_seed

    seeds = [refill_seed(1, m["step"], r) for m in train for r in range(m["refill_rounds"] + 1)]
    assert list(dict.fromkeys(s for _, s in RefillEngine.calls)) == seeds


TRAIN_KEYS = ["kind", "step", "sampled_tokens", "leaf_tokens", "sampled_tokens_total",
              "reward_mean", "zero_variance_share", "branch_token_share", "mean_abs_advantage",
              "groups_dropped"]


def test_refill_off_is_the_loop_as_before(model, tmp_path, monkeypatch):
    """Off: the train record has the keys it always had, in their order. On, with every group
    informative: the same rollouts (bytes) and weights, the same metrics plus refill's."""
    from safetensors.numpy import load_file

    monkeypatch.setattr(RefillEngine, "informative", set(range(1, 13)))
    off = _run(_cfg(model, tmp_path / "off", seed=2))
    on = _run(_cfg(model, tmp_path / "on", seed=2, refill=True))
    assert list(off[0])[:len(TRAIN_KEYS)] == TRAIN_KEYS
    assert not {"informative_share", "refill_rounds", "refill_stop"} & set(off[0])
    refill_keys = ["informative_share", "refill_rounds", "refill_tokens", "refill_stop",
                   "informative_groups", "tokens_per_informative_group"]
    for a, b in zip(off, on):
        assert list(b) == TRAIN_KEYS + refill_keys + list(a)[len(TRAIN_KEYS):]
        assert _no_timings(a) == {k: v for k, v in _no_timings(b).items() if k not in refill_keys}
        assert (b["informative_share"], b["refill_rounds"]) == (1.0, 0)
    for step in (1, 2):
        files = [d / "rollouts" / f"step_{step}.arrow" for d in (tmp_path / "off", tmp_path / "on")]
        assert files[0].read_bytes() == files[1].read_bytes()
    wa, wb = (load_file(str(d / "checkpoints" / "step_2" / "model.safetensors"))
              for d in (tmp_path / "off", tmp_path / "on"))
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_resume_mid_run_equals_an_uninterrupted_run(model, tmp_path):
    from safetensors.numpy import load_file

    from tcli.loop import resume_config

    ref = _run(_cfg(model, tmp_path / "ref", refill=True, steps=3, seed=4))
    _run(_cfg(model, tmp_path / "run", refill=True, steps=3, seed=4))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_3")  # as if killed before saving 3
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_2")
    got = _run(resume_config(str(tmp_path / "run"), {}), resume=True)
    assert [m["step"] for m in got] == [1, 2, 3]
    assert [_no_timings(m) for m in got] == [_no_timings(m) for m in ref]
    assert sum(m["refill_rounds"] for m in ref) >= 2
    for step in (2, 3):  # every field, the model included: the run's, not the checkpoint's
        assert _rollouts(tmp_path / "run", step) == _rollouts(tmp_path / "ref", step)
    wa, wb = (load_file(str(d / "checkpoints" / "step_3" / "model.safetensors"))
              for d in (tmp_path / "ref", tmp_path / "run"))
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_the_token_cap_is_reached_at_equality():
    """18 tokens per round (3 prompts of 2 responses of 3 tokens): a cap of 18 is reached by the
    first refill round, so no second round starts."""
    sample_round, calls = _rounds([[False, True, False]] + [[False] * 3] * 9)
    r = _refill(tokens=3 * 2 * TOKENS).run(_first(3), sample_round)
    assert (r.stop, r.rounds, len(calls)) == ("max_tokens", 1, 2)


def test_informative_share_is_over_round_zeros_groups_not_prompts_per_step():
    """A pool smaller than prompts_per_step: round 0 samples all 10 prompts, 5 informative; the
    share is 5 / 10 (what round 0 held), not 5 / 12."""
    sample_round, calls = _rounds([[True, False]])
    r = _refill(want=12).run(_first(12), sample_round)
    assert len(calls) == 1 and r.stop == "no_prompts"
    assert r.metrics()["informative_share"] == 0.5 and r.metrics()["informative_groups"] == 5


def test_refill_tokens_count_a_trees_shared_segment_once():
    """Tree groups: two leaves share their first segment (2 of 3 tokens), so a prompt samples
    4 tokens, not 6. refill_tokens, the token cap and tokens_per_informative_group count those."""
    calls = []

    def sample_round(prompts, seed):
        flags = [False, True, False] if not calls else [False] * 3
        calls.append(prompts)
        recs = [{"prompt_id": p["id"], "sample_id": j, "token_ids": [5] * 3,
                 "node_path": [0, j], "segment_ends": [2, 3]} for p in prompts for j in range(2)]
        return recs, [(2, None, f) for f in flags[:len(prompts)]]

    r = _refill(rounds=2).run(_first(3), sample_round)
    m = r.metrics()
    assert (r.stop, m["refill_tokens"]) == ("max_rounds", 2 * 3 * 4)
    assert m["tokens_per_informative_group"] == 3 * 3 * 4
    calls.clear()
    r = _refill(tokens=3 * 4 + 1).run(_first(3), sample_round)  # 12 per round: not reached
    assert (r.stop, r.rounds) == ("max_tokens", 2)


def test_without_refill_a_step_samples_its_prompts_with_the_steps_seed():
    """Refill off: one round, step_prompts with step_seed, every group as filter_groups says."""
    from types import SimpleNamespace

    from tcli.loop.refill import step_rollouts
    from tcli.loop.steps import step_prompts, step_seed

    sample_round, calls = _rounds([[True, False]])
    run = SimpleNamespace(refill=False, prompts_per_step=3, seed=4)
    recs, groups, keep, metrics = step_rollouts(POOL, run, 7, sample_round)
    assert calls == [([p["id"] for p in step_prompts(POOL, 3, 4, 7)], step_seed(4, 7))]
    assert (len(recs), len(groups), keep, metrics) == (6, 3, None, {})
