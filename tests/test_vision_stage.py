"""The vision stage on a tiny language checkpoint: adaptor alignment (encoder and language model
frozen) then joint SFT through the project's Trainer, held-out accuracy before and after through the
engine with Wilson intervals, done.json and resume; plus the image-conversation loader and the
Wilson interval itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.checkpoint import load_vision_language_model
from nanoseek.config import VisionConfig
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.model.vision import image_token_count
from nanoseek.stages.common import DONE
from nanoseek.stages.vision import vision_stage
from nanoseek.train.dist import DistInfo
from nanoseek.train.vision import ImageConversationLoader, visual_examples, visual_problems

from helpers import save_tiny, small_tokenizer

TOWER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    max_tiles=1,
)
SECTION = {
    "vision": TOWER,
    "tasks": {"visual_colour": [1]},
    "problems_per_task": 40,
    "renders": 2,
    "size": [32, 32],
    "eval_problems": 6,
    "max_new_tokens": 16,
    "samples": 2,
    "align": {"max_steps": 6, "batch_size": 8, "lr": 0.003, "save_every": 3, "progress": False},
    "sft": {
        "max_steps": 10,
        "batch_size": 8,
        "lr": 0.003,
        "save_every": 5,
        "log_every": 1,
        "progress": False,
    },
}


def test_loader_targets_only_answers_and_resumes():
    tok = small_tokenizer()
    vcfg = VisionConfig(**TOWER)
    image_id = tok.special_ids["image"]
    examples = visual_examples(tok, vcfg, visual_problems({"visual_colour": [1]}, 6), renders=1)
    loader = ImageConversationLoader(examples, 4, 512, tok.pad_id, seed=3)
    x, y, images = next(loader)
    assert x.shape == y.shape and x.shape[0] == 4 and len(images.grids) == 4
    assert int((x == image_id).sum()) == 4 * image_token_count(vcfg, (1, 1))
    assert not ((y == image_id) & (y != IGNORE_INDEX)).any()
    assert "</answer>" in tok.decode([t for t in y[0].tolist() if t != IGNORE_INDEX])
    state = loader.state_dict()
    a = next(loader)
    loader.load_state_dict(state)
    b = next(loader)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2].pixel_values, b[2].pixel_values)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    base = save_tiny(root / "lm")
    run = root / "run"
    summary = vision_stage(run, {"vision": SECTION}, DistInfo(), init=base)
    return run, base, summary


def test_vision_stage_aligns_then_fine_tunes_and_evaluates(stage):
    run, base, summary = stage
    out = run / "vision"
    assert json.loads((out / DONE).read_text())["checkpoint"] == str(out / "final")
    assert summary["align"]["steps"] == 6 and summary["sft"]["steps"] == 10
    # (a) alignment left the language model and the encoder as they were
    lm0 = load_file(str(base / "model.safetensors"))
    align = out / "align" / "checkpoints" / "step_000006"
    lm1 = load_file(str(align / "model.safetensors"))
    assert all(torch.equal(lm0[k], lm1[k]) for k in lm0)
    tower = load_file(str(align / "vision.safetensors"))
    final_tower = load_file(str(out / "final" / "vision.safetensors"))
    enc = [k for k in tower if k.startswith("vision_model.")]
    assert enc and all(torch.equal(tower[k], final_tower[k]) for k in enc)  # encoder frozen
    assert not torch.equal(
        tower["projector.layers.0.weight"], final_tower["projector.layers.0.weight"]
    )
    # (b) joint SFT moved the language model and its loss fell
    lm2 = load_file(str(out / "final" / "model.safetensors"))
    assert any(not torch.equal(lm0[k], lm2[k]) for k in lm0)
    rows = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 10 and sum(losses[-3:]) < 0.9 * sum(losses[:3])
    # before and after: held-out accuracy with a Wilson interval around it, and chance stated
    for r in summary["tasks"].values():
        for when in ("before", "after"):
            e = r[when]
            lo, hi = e["wilson95"]
            assert (
                e["problems"] == 6
                and lo <= e["accuracy"] <= hi
                and e["chance"] == pytest.approx(1 / 6, abs=1e-4)
            )
    assert len(summary["samples"]) == 2
    assert all((out / s["image"]).is_file() for s in summary["samples"])
    vlm = load_vision_language_model(out / "final")
    assert vlm.vision.config.image_size == 32


def test_vision_stage_runs_once(stage):
    run, base, summary = stage
    again = vision_stage(run, {"vision": SECTION}, DistInfo(), init=base)
    assert again == json.loads((run / "vision" / DONE).read_text())


def test_the_report_card_shows_the_visual_tasks_and_samples(stage):
    from nanoseek.reporting.report_card import write_report

    run, _, summary = stage
    text = write_report(run).read_text("utf-8")
    assert "## Vision" in text and "| visual_colour | 6 (" in text
    r = summary["tasks"]["visual_colour"]["after"]
    lo, hi = r["wilson95"]
    assert f"[{100 * lo:.1f}%, {100 * hi:.1f}%]" in text
    for s in summary["samples"]:
        assert f"](vision/{s['image']})" in text and (run / "vision" / s["image"]).is_file()


def test_held_out_problems_have_distinct_keys_in_both_languages():
    probs = visual_problems({"visual_count": [2]}, 200, split="test", seed=1)
    assert len({p.key for p in probs}) == 200
    assert {p.lang for p in probs} == {"en", "zh"}


def test_an_unfinished_stage_resumes_from_its_checkpoints(stage, tmp_path):
    """Without done.json (a kill after training) the stage runs again: both phases resume at their
    last checkpoint (no step is trained twice) and the final weights are the same."""
    import shutil

    run, base, summary = stage
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "vision" / DONE).unlink()
    shutil.rmtree(copy / "vision" / "final")
    again = vision_stage(copy, {"vision": SECTION}, DistInfo(), init=base)
    assert again["align"]["steps"] == 6 and again["sft"]["steps"] == 10
    a = load_file(str(run / "vision" / "final" / "model.safetensors"))
    b = load_file(str(copy / "vision" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again["tasks"] == summary["tasks"]


def test_nanoseek_vision_command(stage, tmp_path, capsys):
    from nanoseek.cli import main

    _, base, _ = stage
    preset = tmp_path / "tiny-vision.json"
    preset.write_text(json.dumps({"description": "test", "price_per_hour": 0.1, "vision": SECTION}))
    run = tmp_path / "run"
    assert main(["vision", str(run), "--preset", str(preset), "--init", str(base)]) == 0
    out = capsys.readouterr().out
    assert "[vision] done in" in out
    assert json.loads(out[out.index("\n{") + 1 :])["sft"]["steps"] == 10
    assert (run / "vision" / DONE).is_file()
    assert main(["vision", str(tmp_path / "nothing"), "--preset", str(preset)]) == 2  # no sft/final
