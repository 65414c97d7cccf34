"""The report card's statistics: held-out problems drawn distinct (by key, languages alternating,
never padded with repeats), per-problem outcomes that pair two evaluations of the same problems,
and the markdown rows with Wilson intervals and paired changes."""

import warnings
from collections import Counter
from types import SimpleNamespace

import pytest

from nanoseek.eval.quality import (
    paired_gain,
    paired_gains,
    task_accuracy,
    task_problems,
    to_markdown,
)
from nanoseek.eval.stats import paired_difference, wilson_interval
from nanoseek.tasks import get_task
from nanoseek.tasks.format import make_completion

from helpers import small_tokenizer


def _distinct_keys(name, difficulty):
    """Every distinct test-split key of one difficulty, found by brute force: a long draw repeats
    keys once the split runs out."""
    return {p.key for p in get_task(name).generate(400, difficulty=difficulty, split="test")}


def test_problems_are_distinct_keys_in_alternating_languages():
    task, problems, labels = task_problems("arithmetic", [1, 2], 200, ["en", "zh"])
    keys = [p.key for p in problems]
    assert len(problems) == 200 and len(set(keys)) == 200  # no key twice, in any language
    assert [p.lang for p in problems] == ["en", "zh"] * 100
    assert all(label == f"{p.lang}/d{label[-1]}" for p, label in zip(problems, labels))
    assert all(task.name == p.task for p in problems)
    # difficulty 1's test split holds ~33 keys: all of them are taken, difficulty 2 gives the rest
    d1 = _distinct_keys("arithmetic", 1)
    assert len(d1) < 100
    per_difficulty = Counter(label.split("/")[1] for label in labels)
    assert per_difficulty == {"d1": len(d1), "d2": 200 - len(d1)}
    assert {p.key for p, label in zip(problems, labels) if label.endswith("d1")} == d1
    # both languages cover both difficulties about equally
    cells = Counter(labels)
    for d in ("d1", "d2"):
        assert abs(cells[f"en/{d}"] - cells[f"zh/{d}"]) <= 1
    # the same arguments give the same problems; a Chinese problem is its English twin translated
    again = task_problems("arithmetic", [1, 2], 200, ["en", "zh"])[1]
    assert [(p.id, p.prompt) for p in again] == [(p.id, p.prompt) for p in problems]
    zh = next(p for p in problems if p.lang == "zh")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in zh.prompt)


def test_a_split_smaller_than_asked_is_taken_whole_and_reported():
    d1 = _distinct_keys("arithmetic", 1)
    with pytest.warns(UserWarning, match=f"holds {len(d1)} distinct problems, fewer than the 100"):
        _, problems, labels = task_problems("arithmetic", [1], 100, ["en", "zh"])
    assert {p.key for p in problems} == d1 and len(problems) == len(d1)  # never padded
    assert set(Counter(p.lang for p in problems).values()) <= {len(d1) // 2, len(d1) // 2 + 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough problems: no warning
        assert len(task_problems("countdown", [1], 30, ["zh"])[1]) == 30


class OracleEngine:
    """Stands in for a model: answers problem i with its worked solution when right(i), else with a
    wrong number, so the outcomes are known in advance."""

    max_model_len = 10**6

    def __init__(self, tok, problems, right):
        self.tok = tok
        self.problems = problems
        self.right = right

    def generate(self, prompts, params, use_tqdm=False):
        assert len(prompts) == len(self.problems)
        outs = []
        for i, p in enumerate(self.problems):
            answer = p.solution.answer if self.right(i) else "-987654"
            text = make_completion(p.solution.reasoning, answer, think_prefilled=True)
            ids = self.tok.encode(text, allow_special=True)
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids)]))
        return outs


def test_per_problem_outcomes_pair_two_evaluations_of_the_same_problems():
    tok = small_tokenizer()
    spec = {"arithmetic": [1, 2]}
    problems = task_problems("arithmetic", [1, 2], 48, ["en", "zh"])[1]

    def run(right):
        return task_accuracy(OracleEngine(tok, problems, right), tok, spec, 48, ["en", "zh"])

    before = run(lambda i: i % 2 == 0)["arithmetic"]
    after = run(lambda i: i % 3 == 0)["arithmetic"]
    for r, right in ((before, lambda i: i % 2 == 0), (after, lambda i: i % 3 == 0)):
        assert r["requested"] == r["distinct"] == r["problems"] == 48
        assert list(r["outcomes"].values()) == [right(i) for i in range(48)]
        k = sum(right(i) for i in range(48))
        assert r["greedy"]["pass@1"] == pytest.approx(k / 48, abs=1e-4)
        assert r["greedy"]["wilson95"] == pytest.approx(wilson_interval(k, 48), abs=1e-4)
    assert list(before["outcomes"]) == list(after["outcomes"])  # the same problems, same order
    d = paired_gain(before, after)
    # by hand: right before and not after where i is even and not a multiple of 3 (16 of 48),
    # gained where i is an odd multiple of 3 (8 of 48)
    assert (d["n"], d["lost"], d["gained"]) == (48, 16, 8)
    assert d["gain"] == pytest.approx((8 - 16) / 48)
    assert d == paired_difference([i % 2 == 0 for i in range(48)], [i % 3 == 0 for i in range(48)])
    # problems graded only once (e.g. skipped by one model) are left out of the pairing
    fewer = {**after, "outcomes": dict(list(after["outcomes"].items())[:30])}
    assert paired_gain(before, fewer)["n"] == 30
    assert paired_gain(before, {"outcomes": {}}) is None


def _result(outcomes: list[bool]) -> dict:
    k = sum(outcomes)
    n = len(outcomes)
    return {
        "checkpoint": "x/final",
        "tasks": {
            "arithmetic": {
                "requested": 60,
                "distinct": n,
                "problems": n,
                "greedy": {
                    "pass@1": k / n,
                    "wilson95": list(wilson_interval(k, n)),
                    "accuracy": k / n,
                    "format": 1.0,
                },
                "outcomes": {f"p{i}": c for i, c in enumerate(outcomes)},
            }
        },
        "passkey": [
            {
                "length": 256,
                "lang": "zh",
                "prompt_tokens": 200,
                "beyond_trained": False,
                "yarn_factor": 1.0,
                "trials": 50,
                "accuracy": 0.5,
                "wilson95": list(wilson_interval(25, 50)),
            }
        ],
    }


def test_markdown_rows_carry_intervals_distinct_counts_and_paired_changes():
    sft = _result([i < 10 for i in range(40)])  # 10 of 40
    grpo = _result([i < 10 or 10 <= i < 30 for i in range(40)])  # 30 of 40: 20 gained, 0 lost
    control = _result([i < 12 for i in range(40)])
    pairs = [("sft", "grpo"), ("sft", "sft_control"), ("sft_control", "grpo")]
    md = to_markdown([sft, control, grpo], ["sft", "sft_control", "grpo"], pairs)
    lo, hi = wilson_interval(30, 40)
    assert f"| grpo | arithmetic | 40 (split holds 40 of 60 asked) | 75.0% [{100 * lo:.1f}, " in md
    assert f"{100 * hi:.1f}] |" in md
    d = paired_difference([i < 10 for i in range(40)], [i < 30 for i in range(40)])
    lo, hi = d["interval95"]
    assert (
        f"| arithmetic | sft → grpo | 40 | 25.0% | 75.0% | +50.0 points [{100 * lo:+.1f}, "
        f"{100 * hi:+.1f}] | 20 / 0 | {d['mcnemar_p']:.3g} |" in md
    )
    assert "| arithmetic | sft → sft_control | 40 |" in md
    assert "| arithmetic | sft_control → grpo | 40 |" in md
    plo, phi = wilson_interval(25, 50)
    assert (
        f"| sft | 256 | zh | 200 | no | 1 | 50 | 50.0% [{100 * plo:.1f}, {100 * phi:.1f}] |" in md
    )
    gains = paired_gains({"sft": sft, "grpo": grpo}, pairs)
    assert list(gains) == ["sft -> grpo"] and gains["sft -> grpo"]["arithmetic"] == d
    assert "Paired changes" not in to_markdown([sft, grpo], ["sft", "grpo"])  # no pairs asked
