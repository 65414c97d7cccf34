"""The SFT stage: it trains on assistant tokens until the model answers in the R1 format (checked
with the engine and the grader), and the pipeline stage writes runs/NAME/sft/final once."""

import json

import pytest
import torch

from nanoseek import load_model
from nanoseek.data.chat_tokens import problem_messages, tokenize_conversation
from nanoseek.data.corpus import Source, build_corpus
from nanoseek.engine import Engine
from nanoseek.eval.accuracy import generate_completions
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.presets import load_preset
from nanoseek.stages.sft import sft_stage
from nanoseek.tasks import get_task
from nanoseek.train.dist import DistInfo
from nanoseek.train.sft import run_sft, split_section

from helpers import save_tiny, small_tokenizer, smallest_margin

TRAIN = {
    "batch_size": 4,
    "seq_len": 128,
    "lr": 3e-3,
    "warmup_steps": 5,
    "eval_every": 20,
    "save_every": 20,
    "log_every": 10,
    "progress": False,
    "mtp_weight": 0.0,
}


def test_sft_teaches_memorised_problems_to_the_engine(tmp_path):
    """Fine-tune a random tiny model on three problems; then greedy generation through the engine
    must reproduce the worked solutions, and the graders accept them. Proves the mask, the template
    and the prompt agree end to end. (The prompts differ from their first token, so a tiny model can
    tell them apart quickly.)"""
    base = save_tiny(tmp_path / "base", context=256)
    items = [
        (get_task("arithmetic"), get_task("arithmetic").generate(1, seed=0, difficulty=2)[0]),
        (
            get_task("arithmetic"),
            get_task("arithmetic").generate(1, seed=1, difficulty=2, lang="zh")[0],
        ),
        (get_task("word_problems"), get_task("word_problems").generate(1, seed=0)[0]),
    ]
    convs = [problem_messages(p) for _, p in items]
    summary = run_sft(
        base, tmp_path / "sft", convs, {**TRAIN, "max_steps": 120}, val_conversations=convs[:1]
    )
    assert (
        summary["steps"] == 120
        and summary["dropped_too_long"] == 0
        and summary["conversations"] == 3
    )
    assert summary["val_loss"] < 0.5  # the validation conversation is one of the training ones here
    model, tok = load_model(tmp_path / "sft" / "final"), small_tokenizer()
    for conv in convs:  # every answer token is learned by a margin that no CPU's rounding can flip
        ids, mask = tokenize_conversation(tok, conv)
        targets = [t if learned else IGNORE_INDEX for t, learned in zip(ids[1:], mask[1:])]
        assert smallest_margin(model, torch.tensor([ids[:-1]]), torch.tensor([targets])) > 1.0
    texts, fits = generate_completions(
        Engine(model, None), tok, [p for _, p in items], max_new_tokens=96
    )
    assert all(fits)
    for (task, problem), (text,) in zip(items, texts):
        assert text == problem.solution.completion(think_prefilled=True).replace(
            "</think>", "\n</think>"
        )
        reward = task.grade(problem, text, think_prefilled=True)
        assert reward.correct and reward.format == 1.0
    metrics = [
        json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[-1]["lm_loss_avg"] < metrics[0]["lm_loss_avg"] / 4


def test_sft_stage_runs_once_on_a_run_directory(tmp_path):
    run = tmp_path / "run"
    save_tiny(run / "pretrain" / "final", context=256)
    bible = (
        "Genesis 1\n\nIn the beginning, God created the heavens and the earth. "
        "The earth was formless."
    )
    build_corpus(
        run / "corpus",
        [Source("bible-web", "en", "PD", "-", lambda: [bible, bible.replace("1", "2")])],
    )
    preset = {
        "sft": {
            **TRAIN,
            "max_steps": 2,
            "tasks": {"arithmetic": [1]},
            "problems_per_task": 8,
            "identity": 4,
            "corpus_qa": 2,
            "val_problems": 2,
        }
    }
    summary = sft_stage(run, preset, DistInfo())
    # one corpus doc is in val; tool use: 15% of the mix, round(0.15 / 0.85 * 13) = 2 (one problem)
    assert summary["steps"] == 2 and summary["conversations"] == 8 + 4 + 1 + 2
    assert summary["base"] == str(run / "pretrain" / "final")
    assert (run / "sft" / "final" / "config.json").is_file() and (
        run / "sft" / "done.json"
    ).is_file()
    stamp = (run / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    assert sft_stage(run, preset, DistInfo()) == json.loads((run / "sft" / "done.json").read_text())
    assert (run / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == stamp  # skipped


def test_sft_settings_errors_and_overrides(tmp_path):
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['bogus'\]"):
        split_section({"bogus": 1})
    data, train = split_section({"lr": 0.01, "identity": 3})
    assert train["lr"] == 0.01 and data["identity"] == 3 and data["corpus_qa"] == 300
    preset = load_preset(
        "smoke", ["sft.max_steps=7", 'sft.tasks={"arithmetic": [3]}', "pretrain.lr=0.5"]
    )
    assert preset["sft"]["max_steps"] == 7 and preset["sft"]["tasks"] == {"arithmetic": [3]}
    assert preset["pretrain"]["lr"] == 0.5
    base = save_tiny(tmp_path / "base", context=128)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        run_sft(base, tmp_path / "out", [], {"seq_len": 512})
    torch.manual_seed(0)
