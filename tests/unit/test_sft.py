"""SFT warm start and the embedded arith task: the generator is deterministic and its gold steps are
right, the SFT loss counts response tokens only, training lowers it on a real tiny model and the
checkpoint is ready for RL; the example CLIs run end to end."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from examples.arith import task
from examples.arith.warmstart import extracted_answer, is_correct

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)
STEP = re.compile(r"(-?\d+)([+-])(\d+)=(-?\d+)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- task generator

def _steps(prompt: str):
    """(first operand, [(op, operand)]) read straight from the prompt text, independently of
    task.parse_prompt."""
    expr = prompt.removesuffix("=?\n")
    nums = [int(x) for x in re.findall(r"\d+", expr)]
    ops = re.findall(r"[+-]", expr)
    return nums[0], list(zip(ops, nums[1:]))


def _check_gold(rec: dict) -> None:
    text = task.solution(rec)
    lines = text.split("\n")
    first, terms = _steps(rec["prompt"])
    assert len(lines) == len(terms) + 1 == rec["meta"]["difficulty"] + 1
    total = first
    for line, (op, v) in zip(lines, terms):
        m = STEP.fullmatch(line)
        assert m, line
        a, o, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert (a, o, b) == (total, op, v), (line, rec["prompt"])   # chains from the last result
        assert c == (a + b if o == "+" else a - b), line             # and is arithmetically right
        assert 0 <= c <= task.MAX_TOTAL
        total = c
    last = re.findall(r"####\s*(-?\d+)", text)[-1]
    assert int(last) == int(rec["answer"]) == total
    assert extracted_answer(text) == int(rec["answer"])


def test_generator_is_deterministic_and_gold_solutions_are_right():
    a = task.make_prompts(300, 7, "train")
    assert a == task.make_prompts(300, 7, "train")
    assert a != task.make_prompts(300, 8, "train")
    assert [r["id"] for r in a[:2]] == ["arith-train-000000", "arith-train-000001"]
    assert len({r["prompt"] for r in a}) == 300
    assert {r["meta"]["difficulty"] for r in a} == set(range(task.MIN_STEPS, task.MAX_STEPS + 1))
    for r in a:
        assert set(r) == {"id", "prompt", "answer", "meta"}
        assert r["meta"]["source"] == "tcli-arith" and r["meta"]["split"] == "train"
        assert set(r["prompt"]) <= set(task.ALPHABET)
        _check_gold(r)
    t = task.make_prompts(100, 7, "test")
    for r in t:
        _check_gold(r)
    # splits are disjoint whatever the seeds
    assert not {r["prompt"] for r in t} & {r["prompt"] for r in task.make_prompts(1000, 1, "train")}
    with pytest.raises(ValueError):
        task.make_prompts(3, 0, "dev")


def test_noisy_solutions_make_the_mistakes_they_promise():
    recs = task.make_prompts(200, 0, "train")
    rng = random.Random(0)
    assert all(task.noisy_solution(r, rng) == task.solution(r) for r in recs)
    assert all(task.check_steps(task.solution(r)) for r in recs)
    n_carry = 0
    for r in recs:
        text = task.noisy_solution(r, rng, error_rate=0.0, carry_error_rate=1.0)
        first, terms = _steps(r["prompt"])
        a, o, b, _ = STEP.fullmatch(text.split("\n")[0]).groups()
        carry = task.crosses_ten(first, terms[0][0], terms[0][1])
        n_carry += carry
        got = int(text.split("\n")[0].split("=")[1])
        true = first + terms[0][1] if terms[0][0] == "+" else first - terms[0][1]
        # the first step forgets its carry/borrow exactly when it crosses a ten
        assert got == (true + (-10 if terms[0][0] == "+" else 10) if carry else true), text
        assert task.check_steps(text) == (text == task.solution(r))
        assert extracted_answer(text) == int(text.rsplit("#### ", 1)[1])
    assert 20 < n_carry < 180
    slips = [task.noisy_solution(r, rng, error_rate=0.5) for r in recs]
    wrong = sum(not is_correct(s, r["answer"]) for s, r in zip(slips, recs))
    assert 0.5 < wrong / len(recs) < 1.0


def test_answer_extraction_rule():
    assert extracted_answer("3+4=7\n#### 7") == 7
    assert extracted_answer("#### 5\nthen #### -3 and 9") == -3   # integer after the LAST ####
    assert extracted_answer("no marker 12 then 40") == 40
    assert extracted_answer("nothing") is None
    assert extracted_answer("#### so 12") is None                  # as the arith verifier reads it
    assert is_correct("1+1=2\n#### 2", "2") and not is_correct("1+1=3\n#### 3", "2")


# ----------------------------------------------------------------------------- SFT

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tcli.models.tiny import init_tiny_model

    return init_tiny_model(str(tmp_path_factory.mktemp("sft") / "init"), seed=0,
                           alphabet=task.ALPHABET, **TINY)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path))


def test_loss_counts_response_tokens_only(tiny_dir):
    from tcli.sft import encode_pairs, response_loss

    model, tok = _load(tiny_dir)
    pairs = [("7+5=?\n", "7+5=12\n#### 12"), ("12-3+1=?\n", "12-3=9\n9+1=10\n#### 10")]
    P, R = encode_pairs(tok, pairs)
    assert all(r[-1] == tok.eos_token_id for r in R)  # EOS appended: the model learns to stop
    assert P[0] == tok(pairs[0][0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        got = float(response_loss(model, P, R))
        # reference: full-sequence logits, cross-entropy on response positions only
        nll, n = 0.0, 0
        for p, r in zip(P, R):
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            for t in range(len(r)):
                nll -= float(logp[len(p) - 1 + t, r[t]])
                n += 1
    assert got == pytest.approx(nll / n, rel=1e-5)


def test_sft_lowers_loss_memorises_and_saves_an_rl_ready_checkpoint(tiny_dir, tmp_path):
    from tcli.models.checkpoint import read_state
    from tcli.sft import encode_pairs, response_nll, sft

    recs = task.make_prompts(6, 3, "train")
    pairs = [(r["prompt"], task.solution(r)) for r in recs]
    model0, tok = _load(tiny_dir)
    P, R = encode_pairs(tok, pairs)
    before = response_nll(model0, P, R)
    seen = []
    out = str(tmp_path / "sft")
    res = sft(tiny_dir, pairs, out, steps=150, lr=1e-2, batch_size=6, seed=0, warmup=10,
              log_every=50, callback=lambda step, loss, m: seen.append((step, loss)))
    assert res["steps"] == 150 and [s for s, _ in seen] == [50, 100, 150]
    assert seen[-1][1] < seen[0][1]
    model1, _ = _load(out)
    after = response_nll(model1, P, R)
    assert after < 0.25 * before and after < 0.3, (before, after)
    # memorised: greedy decoding reproduces a gold response and stops with EOS
    enc = tok([pairs[0][0]], return_tensors="pt", add_special_tokens=False)
    gen = model1.generate(**enc, do_sample=False, max_new_tokens=40,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = gen[0, enc["input_ids"].shape[1]:].tolist()
    assert tok.eos_token_id in new
    assert tok.decode(new, skip_special_tokens=True) == pairs[0][1]
    st = read_state(out)
    assert st["step"] == 0 and st["policy_version"] == 0 and st["sft"]["steps"] == 150
    assert not os.path.exists(os.path.join(out, "optimizer.pt"))  # RL starts with fresh Adam
    assert not [d for d in os.listdir(tmp_path) if ".tmp-" in d]

    # same seed, same weights; early stop via StopIteration still saves the model so far
    def stop(step, loss, m):
        raise StopIteration

    out2 = str(tmp_path / "stopped")
    r2 = sft(tiny_dir, pairs, out2, steps=150, lr=1e-2, batch_size=6, seed=0, warmup=10,
             log_every=20, callback=stop)
    assert r2["steps"] == 20 and read_state(out2)["sft"]["steps"] == 20
    assert read_state(out2)["versions"]["device"] == "cpu"
    out3 = str(tmp_path / "again")
    sft(tiny_dir, pairs, out3, steps=20, lr=1e-2, batch_size=6, seed=0, warmup=10)
    out4 = str(tmp_path / "again2")
    sft(tiny_dir, pairs, out4, steps=20, lr=1e-2, batch_size=6, seed=0, warmup=10)
    m3, _ = _load(out3)
    m4, _ = _load(out4)
    for a, b in zip(m3.state_dict().values(), m4.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        sft(tiny_dir, [], str(tmp_path / "x"), steps=1)


# ----------------------------------------------------------------------------- example CLIs

def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_make_data_and_warmstart_cli(tmp_path):
    d = tmp_path / "data"
    r = _run("-m", "examples.arith.make_data", "--out", str(d), "--n-train", "40", "--n-test",
             "8", "--seed", "5", "--quiet")
    assert r.returncode == 0, r.stderr
    first = (d / "train.jsonl").read_bytes()
    train = [json.loads(x) for x in first.splitlines()]
    test = [json.loads(x) for x in (d / "test.jsonl").read_bytes().splitlines()]
    assert len(train) == 40 and len(test) == 8
    assert train == task.make_prompts(40, 5, "train") and test[0]["meta"]["split"] == "test"
    assert _run("-m", "examples.arith.make_data", "--out", str(d), "--n-train", "40",
                "--n-test", "8", "--seed", "5", "-q").returncode == 0
    assert (d / "train.jsonl").read_bytes() == first                 # same seed, same bytes

    out = tmp_path / "ws"
    r = _run("-m", "examples.arith.warmstart", "--out", str(out), "--data", str(d), "--hidden",
             "32", "--layers", "1", "--steps", "10", "--sft-examples", "64", "--batch-size", "8",
             "--eval-n", "8", "--samples", "2", "--max-new-tokens", "12", "--quiet")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["sft_steps"] == 10 and rep["prompts"] == 8 and rep["samples_per_prompt"] == 2
    assert 0.0 <= rep["acc_sampled"] <= 1.0 and 0.0 <= rep["acc_greedy"] <= 1.0
    assert os.path.exists(out / "model.safetensors") and os.path.exists(out / "tcli_state.json")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("arith-init-")]
    bad = _run("-m", "examples.arith.warmstart", "--out", str(out), "--error-rate", "2")
    assert bad.returncode == 2 and "--error-rate" in bad.stderr
