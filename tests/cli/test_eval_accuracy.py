"""`tcli eval` reports what the answers earned: accuracy is correctness (a task's weight never
turns a right answer into a wrong one), and its flags refuse what would give a number that looks
valid and is not. The model is an oracle engine whose answers are known in advance."""

from __future__ import annotations

import orjson
import pytest

from conftest import jsonl, run_tcli
from tcli.engines import ENGINES, Completion


class _CharTokenizer:
    """One token per character (its code point): what an oracle needs to read its prompts."""

    chat_template = None
    name_or_path = "oracle"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


class OracleEngine:
    """Answers every prompt with ``\\boxed{...}`` of the ``reply`` its prompt text ends with
    (``... reply: 7``; else ``A``), so each test says which answers are right."""

    name = "oracle"

    def __init__(self, model: str, opts, *, seed: int = 0, trainer=None):
        self.model_path = model
        self.tokenizer = _CharTokenizer()
        self.policy_version = 0

    def generate(self, prompts, n, cfg):
        out = []
        for ids in prompts:
            prompt = self.tokenizer.decode(ids)
            reply = prompt.split("reply: ")[1].split("\n")[0] if "reply: " in prompt else "A"
            text = [ord(c) for c in f"so the answer is \\boxed{{{reply}}}"]
            out.append([Completion(text, [-1.0] * len(text), "length")] * n)
        return out

    def load_weights(self, model_dir, policy_version):
        self.policy_version = policy_version


if "oracle" not in ENGINES:
    ENGINES.register("oracle")(OracleEngine)

# four prompts, three answered right by the oracle
PROMPTS = [{"id": f"q{i}", "prompt": f"what is {i} + {i}? reply: {2 * i if i != 3 else 5}",
            "answer": str(2 * i)} for i in range(1, 5)]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(jsonl(PROMPTS))
    return path


def _eval(tiny, data, *flags):
    p = run_tcli(["eval", "-m", tiny, "-d", data, "--engine", "oracle", "-j", "0", "-q",
                  "--prompt-template", "boxed", *flags])
    return p, (orjson.loads(p.stdout) if p.returncode == 0 else None)


@pytest.mark.parametrize("flags", [[], ["-t", "math", "--weights", "0.4"],
                                   ["-t", "gsm8k", "--weights", "0.4"],
                                   ["-t", "gsm8k", "--weights", "2"],
                                   ["-t", "gsm8k", "--weights", "0"],
                                   ["-t", "gsm8k", "--weights", "-1"],
                                   ["-t", "gsm8k", "-t", "math", "--weights", "0.4,1"]])
def test_accuracy_is_correctness_whatever_the_weights(tiny, data, flags):
    """A weighted task scores reward = weight x correctness, but accuracy counts right answers:
    3 of 4 here, with any weight (0.4 once made it 0 %, 2 made partial credit count)."""
    p, summary = _eval(tiny, data, *flags)
    assert p.returncode == 0, p.stderr.decode()
    assert summary["prompts"] == 4 and summary["accuracy"] == 0.75, summary
    assert summary["pass@1"] == 0.75


@pytest.mark.parametrize("value", ["50", "1.01", "-0.1", "nan"])
def test_fail_under_is_a_fraction(tiny, data, tmp_path, value):
    """`--fail-under 50` (a percentage) would fail every run after all its work: exit 2 at once,
    with the fraction to give; 0-1 works both ways."""
    p, _ = _eval(tiny, data, "--fail-under", value, "--summary", tmp_path / "s.json")
    assert p.returncode == 2 and b"--fail-under 0.5" in p.stderr, p.stderr.decode()
    assert not (tmp_path / "s.json").exists()
    assert _eval(tiny, data, "--fail-under", "0.75")[0].returncode == 0
    p, _ = _eval(tiny, data, "--fail-under", "0.8")
    assert p.returncode == 1 and b"below --fail-under 0.8" in p.stderr


def test_samples_on_stdout_need_the_summary_in_a_file(tiny, data, tmp_path):
    """`-o -` and the summary on one stdout would be one stream neither reader can parse."""
    for flags in (["-o", "-"], ["-o", "-", "--summary", "-"], ["-o", "/dev/stdout"]):
        p, _ = _eval(tiny, data, *flags)
        assert p.returncode == 2 and b"--summary FILE" in p.stderr and not p.stdout, flags
    p = run_tcli(["eval", "-m", tiny, "-d", data, "--engine", "oracle", "-j", "0", "-q", "-o", "-",
                  "--summary", tmp_path / "s.json"])
    assert p.returncode == 0, p.stderr.decode()
    samples = [orjson.loads(line) for line in p.stdout.splitlines()]
    assert len(samples) == 4 and all("verdict" in r for r in samples)
    assert orjson.loads((tmp_path / "s.json").read_bytes())["accuracy"] == 0.75


def test_limit_spans_a_benchmark_sorted_by_subject(tiny, tmp_path):
    """mmlu_med is sorted by subject: its first 8 rows are all anatomy. `--limit 8` evaluates
    rows spread over the file instead (all six subjects), the same ones for every seed."""
    got = []
    for seed in ("0", "1"):
        out = tmp_path / f"samples{seed}.jsonl"
        p = run_tcli(["eval", "-m", tiny, "-d", "mmlu_med", "--limit", "8", "--engine", "oracle",
                      "-j", "0", "-q", "-o", out, "--summary", tmp_path / "s.json", "--seed", seed])
        assert p.returncode == 0, p.stderr.decode()
        got.append([orjson.loads(line) for line in out.read_bytes().splitlines()])
    assert [r["prompt_id"] for r in got[0]] == [r["prompt_id"] for r in got[1]]
    subjects = [r["meta"]["subject"] for r in got[0]]
    assert len(subjects) == 8 and len(set(subjects)) == 6, subjects
