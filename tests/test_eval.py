"""Evaluation: the pass@k estimator, bits-per-byte arithmetic, YaRN extension, and `evaluate` end to
end on a tiny random model with the engine (API and CLI)."""

import json
import math
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import torch

from nanoseek import load_model
from nanoseek.data.corpus import Source, build_corpus
from nanoseek.eval import bits_per_byte, evaluate, pass_at_k, to_markdown
from nanoseek.eval.passkey import extended, passkey_prompts
from nanoseek.eval.stats import wilson_interval
from nanoseek.stages.eval import eval_stage
from nanoseek.train.dist import DistInfo

from helpers import save_tiny, small_tokenizer


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 2 / 5),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (10, 0, 5, 0.0),
        (4, 4, 2, 1.0),
        (3, 1, 3, 1.0),  # fewer wrong samples than k: some draw must be right
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_correct_sample():
    for n, c, k in [(6, 2, 3), (8, 5, 2), (7, 1, 4)]:
        subsets = list(combinations([1] * c + [0] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("eval") / "model")


def test_bpb_of_a_uniform_model_is_log2_vocab_per_byte(tiny):
    model, tok = load_model(tiny), small_tokenizer()
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: p = 1/V for every token
    texts = ["What is 7 + 1?", "计算 12 + 30 等于多少？" * 5, "def f(x):\n    return x\n"]
    for seq_len in (8, 512):  # many windows, and one
        r = bits_per_byte(model, tok, texts, seq_len=seq_len, batch_size=2)
        tokens = sum(len(tok.encode(t)) for t in texts)  # every token after BOS is predicted once
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        assert r["tokens"] == tokens and r["bytes"] == n_bytes
        assert r["nats"] == pytest.approx(tokens * math.log(tok.vocab_size), rel=1e-6)
        assert r["bpb"] == pytest.approx(tokens * math.log2(tok.vocab_size) / n_bytes, rel=1e-6)


def test_bpb_equals_the_direct_cross_entropy(tiny):
    model, tok = load_model(tiny), small_tokenizer()
    text = "The pass key is 12345. Remember it."
    ids = torch.tensor([tok.encode(text, add_bos=True)])
    logp = torch.log_softmax(model(ids[:, :-1]).double(), -1)
    nats = -logp[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum().item()
    r = bits_per_byte(model, tok, [text])
    assert r["bpb"] == pytest.approx(nats / (math.log(2) * len(text.encode())), rel=1e-5)


def test_yarn_extension_shares_weights_and_stretches_the_context(tiny):
    model, tok = load_model(tiny), small_tokenizer()
    assert extended(model, 512) is model
    longer = extended(model, 2048)
    assert (
        longer.config.max_position_embeddings == 2048
        and longer.config.yarn_factor == pytest.approx(4.0)
    )
    assert longer.embed_tokens.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, tok.vocab_size, (1, 1500))
    assert torch.isfinite(longer(ids)).all()
    for problem, prompt in passkey_prompts(tok, 1024, [0.0, 1.0], 1):
        assert len(prompt) <= 1024 - 48 and len(prompt) > 700  # close to the requested length
        assert problem.answer in problem.prompt


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = {
        "en": ["The river flows past the old mill. " * 8, "Birds sing in the morning light. " * 8],
        "zh": ["河水流过老磨坊。鸟儿在清晨歌唱。" * 8, "道路一直向前延伸。" * 8],
        "code": ["def add(a, b):\n    return a + b\n" * 4, "import os\nprint(os.getcwd())\n" * 4],
    }
    root = tmp_path_factory.mktemp("corpus")
    build_corpus(
        root,
        [Source(f"s-{lang}", lang, "CC0", "-", lambda d=d: d) for lang, d in docs.items()],
        val_fraction=0.5,
    )
    return root


def check_result(r):
    assert set(r["bpb"]) == {"en", "zh", "code"} and all(0 < v < 20 for v in r["bpb"].values())
    for t in r["tasks"].values():
        assert t["problems"] + t["skipped"] == 4
        for value in (*t["greedy"].values(), *t.get("sampled", {}).values()):
            if isinstance(value, float):
                assert 0.0 <= value <= 1.0
    # one row per length and language, each with its trials and Wilson interval
    assert [(row["length"], row["lang"]) for row in r["passkey"]] == [
        (256, "en"),
        (256, "zh"),
        (1024, "en"),
        (1024, "zh"),
    ]
    assert [row["beyond_trained"] for row in r["passkey"]] == [False, False, True, True]
    for row in r["passkey"]:
        assert row["trials"] == len(row["outcomes"]) == 4
        assert row["accuracy"] == pytest.approx(sum(row["outcomes"]) / 4, abs=1e-4)
        lo, hi = row["wilson95"]
        assert (lo, hi) == pytest.approx(wilson_interval(sum(row["outcomes"]), 4), abs=1e-4)
    json.dumps(r)


def test_evaluate_end_to_end_on_a_tiny_model(tiny, corpus):
    r = evaluate(
        tiny,
        tasks=["arithmetic", "countdown"],
        n_problems=4,
        n_samples=3,
        ks=[1, 2],
        max_new_tokens=24,
        corpus_dir=corpus,
        passkey_lengths=[256, 1024],
        passkey_trials=4,
    )
    check_result(r)
    assert (
        r["tasks"]["arithmetic"]["sampled"]["n"] == 3
        and "pass@2" in r["tasks"]["arithmetic"]["sampled"]
    )
    assert set(r["tasks"]["arithmetic"]["greedy"]["by_group"]) == {
        "en/d1",
        "en/d2",
        "zh/d1",
        "zh/d2",
    }
    md = to_markdown([r, r], ["a", "b"])
    assert "| a | arithmetic | 4 |" in md and "| b | countdown | 4 |" in md
    assert "Bits per byte" in md and "Passkey" in md and "| a | 1024 |" in md
    # the same seed gives the same figures
    again = evaluate(
        tiny,
        tasks=["arithmetic"],
        n_problems=4,
        n_samples=3,
        ks=[1, 2],
        max_new_tokens=24,
        bpb=False,
        passkey=False,
    )
    assert again["tasks"]["arithmetic"] == {**r["tasks"]["arithmetic"]}


def test_eval_command_writes_json_and_markdown(tiny, corpus, tmp_path):
    # one thread: a tiny model gains nothing from more, and a busy machine
    # makes OpenMP threads wait on each other
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanoseek.cli",
            "eval",
            str(tiny),
            "--tasks",
            "arithmetic",
            "--n-problems",
            "2",
            "--samples",
            "2",
            "--k",
            "1",
            "2",
            "--max-new-tokens",
            "8",
            "--corpus",
            str(corpus),
            "--no-passkey",
            "--json",
            str(tmp_path / "r.json"),
            "--markdown",
            str(tmp_path / "r.md"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert (
        set(r["tasks"]) == {"arithmetic"}
        and set(r["bpb"]) == {"en", "zh", "code"}
        and "passkey" not in r
    )
    assert r["tasks"]["arithmetic"]["sampled"]["n"] == 2
    assert (tmp_path / "r.md").read_text().strip() == out.stdout.strip()
    bad = subprocess.run(
        [sys.executable, "-m", "nanoseek.cli", "eval", str(tiny), "--tasks", "nope"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode != 0 and "unknown task(s) ['nope']" in bad.stderr


def test_eval_stage_compares_the_stages_and_reuses_unchanged_results(tmp_path, corpus):
    run = tmp_path / "run"
    save_tiny(run / "pretrain" / "final", seed=1)
    save_tiny(run / "sft" / "final", seed=2)
    preset = {
        "eval": {
            "tasks": ["arithmetic"],
            "n_problems": 2,
            "max_new_tokens": 8,
            "corpus_dir": str(corpus),
            "passkey": False,
        }
    }
    summary = eval_stage(run, preset, DistInfo())
    assert summary["stages"] == ["pretrain", "sft"] and set(summary["pass@1"]["sft"]) == {
        "arithmetic"
    }
    report = (run / "eval" / "report.md").read_text()
    assert "| pretrain | arithmetic | 2 |" in report and "| sft | arithmetic | 2 |" in report
    stamps = {s: (run / "eval" / f"{s}.json").stat().st_mtime_ns for s in ("pretrain", "sft")}
    save_tiny(run / "sft" / "final", seed=3)  # a new SFT result: only it is evaluated again
    eval_stage(run, preset, DistInfo())
    assert (run / "eval" / "pretrain.json").stat().st_mtime_ns == stamps["pretrain"]
    assert (run / "eval" / "sft.json").stat().st_mtime_ns != stamps["sft"]
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        eval_stage(tmp_path / "empty", preset, DistInfo())
