"""Glyph pretraining (stages/glyph.py): the tower's own loss, CTC over the columns of the adaptor's
output grid on rendered reading-task pictures. The loss falls on a tiny tower; best-path decoding
merges repeats and drops blanks; the vision stage's phase is config-driven, checked before any
training, resumable, and leaves no head in the checkpoint, which loads as before."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.checkpoint import load_vision_language_model
from nanoseek.config import VisionConfig
from nanoseek.model.vision import VisionTower
from nanoseek.stages import glyph as glyph_mod
from nanoseek.stages.glyph import (
    GlyphHead,
    glyph_phase,
    glyph_settings,
    glyphs,
    pretrain_glyphs,
    render_batch,
    transcription,
)
from nanoseek.stages.vision import train_vision
from nanoseek.train.vision import visual_problems

from helpers import TINY_VISION, save_tiny

TOWER = {**TINY_VISION, "max_tiles": 4}  # a 192 x 64 equation: a 3 x 1 local grid of 32 px tiles


def test_the_transcription_is_the_worked_solutions_first_line():
    for task in ("visual_equation", "visual_word"):
        for p in visual_problems({task: [1, 2]}, 40):
            assert transcription(p) == p.solution.reasoning.split("\n")[0]
            assert glyphs(p) == transcription(p).replace(" ", "")


def test_pictures_are_tiled_one_by_one_as_in_a_one_image_prompt():
    vcfg = VisionConfig(**TOWER)
    probs = visual_problems({"visual_equation": [1]}, 4)
    images, texts = render_batch(probs, [1, 2, 3, 4], vcfg)
    assert images.grids == [(3, 1)] * 4  # not the single tile of a prompt with 3+ images
    assert texts == [glyphs(p) for p in probs]


class _FixedHead(GlyphHead):
    def __init__(self, charset, logp):
        super().__init__(4, charset)
        self.logp = logp

    def forward(self, tower, images):
        return self.logp


def test_best_path_decoding_merges_repeats_and_drops_blanks():
    # labels per column: a a blank a b b blank -> "aab"; all blank -> ""
    def columns(labels):
        return torch.log(torch.nn.functional.one_hot(torch.tensor(labels), 3).float() + 1e-6)

    head = _FixedHead(["a", "b"], [columns([1, 1, 0, 1, 2, 2, 0]), columns([0, 0, 0])])
    assert head.read(None, None) == ["aab", ""]


def test_the_glyph_loss_falls_on_a_tiny_tower():
    vcfg = VisionConfig(**TOWER)
    torch.manual_seed(0)
    tower = VisionTower(vcfg, 48)
    probs = visual_problems({"visual_equation": [1]}, 60)
    charset = sorted({c for p in probs for c in glyphs(p)})
    held = probs[:16]
    images, texts = render_batch(held, list(range(16)), vcfg)
    torch.manual_seed(1)
    probe = GlyphHead(vcfg.hidden_size, charset)  # a fixed random head: the loss before
    before = probe.loss(tower, images, texts).item()
    head, rows = pretrain_glyphs(
        tower, probs, steps=30, batch_size=16, lr=0.003, warmup_steps=3, log_every=10
    )
    assert [r["step"] for r in rows] == [10, 20, 30]
    after = head.loss(tower, images, texts).item()
    assert after < 0.6 * before


def test_settings_are_checked_before_training():
    reading = {"tasks": {"visual_word": [1]}}
    assert glyph_settings(reading) is None  # no part: no phase
    assert glyph_settings({**reading, "glyph": {"steps": 0}}) is None
    assert glyph_settings({**reading, "glyph": {"steps": 5}})["batch_size"] == 32
    with pytest.raises(ValueError, match="unknown key"):
        glyph_settings({**reading, "glyph": {"steps": 5, "step": 3}})
    with pytest.raises(ValueError, match="steps"):
        glyph_settings({**reading, "glyph": {"steps": -1}})
    with pytest.raises(ValueError, match="visual_equation"):
        glyph_settings({"tasks": {"visual_colour": [1]}, "glyph": {"steps": 5}})
    # the phase's own tasks: reading tasks only
    own = {"steps": 5, "tasks": {"visual_equation": [1, 2]}}
    assert glyph_settings({"tasks": {"visual_colour": [1]}, "glyph": own})["tasks"] == own["tasks"]
    with pytest.raises(ValueError, match="vision.glyph.tasks"):
        glyph_settings({**reading, "glyph": {"steps": 5, "tasks": {"visual_count": [1]}}})


def test_the_presets_phase_is_off_and_valid_when_turned_on():
    from nanoseek.presets import load_preset

    assert glyph_settings(load_preset("vision")["vision"]) is None  # steps 0: off
    assert glyph_settings(load_preset("smoke")["vision"]) is None
    section = load_preset("vision", ["vision.glyph.steps=1500"])["vision"]
    assert glyph_settings(section)["tasks"] == {"visual_equation": [1, 2]}


SECTION = {
    "vision": TOWER,
    "tasks": {"visual_equation": [1]},
    "problems_per_task": 16,
    "renders": 1,
    "eval_problems": 4,
    "max_new_tokens": 12,
    "samples": 0,
    "glyph": {"steps": 6, "batch_size": 8, "warmup_steps": 2},
    "align": {"max_steps": 2, "batch_size": 4, "progress": False},
    "sft": {"max_steps": 2, "batch_size": 4, "progress": False},
    "text_eval": {"bpb_bytes": 0, "tasks": {}},
}


@pytest.fixture(scope="module")
def glyph_stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("glyph")
    base = save_tiny(root / "lm")
    out = root / "run" / "vision"
    return out, train_vision(base, out, SECTION)


def test_the_stage_runs_the_phase_and_saves_no_head(glyph_stage):
    out, summary = glyph_stage
    g = summary["glyph"]
    assert g["steps"] == 6 and g["tasks"] == {"visual_equation": [1]}
    r = g["read"]["visual_equation"]
    lo, hi = r["wilson95"]
    assert r["problems"] == 4 and lo <= r["accuracy"] <= hi
    # the checkpoint's tower is exactly a VisionTower's parameters: the head is gone
    vlm = load_vision_language_model(out / "final")
    saved = load_file(str(out / "final" / "vision.safetensors"))
    assert set(saved) == set(VisionTower(vlm.vision.config, vlm.config.hidden_size).state_dict())
    pretrained = load_file(str(out / "glyph" / "vision.safetensors"))
    assert set(pretrained) == set(saved)
    # the stage went on from the pretrained tower (its encoder stays frozen without train_encoder)
    enc = [k for k in saved if k.startswith("vision_model.")]
    assert enc and all(torch.equal(saved[k], pretrained[k]) for k in enc)
    assert json.loads((out / "glyph" / "summary.json").read_text("utf-8")) == g


def test_the_phase_trains_the_tower_and_resumes_without_training(glyph_stage, monkeypatch):
    out, summary = glyph_stage
    vcfg = VisionConfig(**TOWER)
    torch.manual_seed(0)
    fresh = VisionTower(vcfg, 64)
    after = load_file(str(out / "glyph" / "vision.safetensors"))
    key = "vision_model.embeddings.patch_embedding.weight"
    assert not torch.equal(fresh.state_dict()[key], after[key])  # the phase moved the encoder

    def no_training(*args, **kwargs):
        raise AssertionError("the phase trained again")

    monkeypatch.setattr(glyph_mod, "pretrain_glyphs", no_training)
    again = glyph_phase(
        fresh, SECTION, glyph_settings(SECTION), {}, out / "glyph", render_seed=100_000
    )
    assert again == summary["glyph"]
    assert torch.equal(fresh.state_dict()[key], after[key])
