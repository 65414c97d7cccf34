"""Presets: every shipped one is complete and valid, and --set overrides behave."""

import json

import pytest

from nanoseek.config import ModelConfig
from nanoseek.data.corpus import default_sources
from nanoseek.eval.quality import _task_spec
from nanoseek.presets import PRICED, available_presets, load_preset
from nanoseek.train.grpo_trainer import GRPOConfig
from nanoseek.train.sft import split_section
from nanoseek.train.trainer import TrainConfig


@pytest.mark.parametrize("name", available_presets(stage_presets=False))
def test_every_shipped_preset_builds_every_stage(name):
    preset = load_preset(name)
    assert preset["description"] and preset["price_per_hour"] > 0
    ModelConfig(**{**preset["model"], "vocab_size": preset["data"]["vocab_size"]})
    data = preset["data"]
    default_sources(  # the data knobs are valid (no text is read here)
        retrieval_bytes=data.get("retrieval_bytes"),
        task_text=data.get("task_text"),
        source_max_bytes=data.get("source_max_bytes"),
    )
    for section in ("pretrain", "long_context"):
        TrainConfig(**{k: v for k, v in preset[section].items() if k != "factor"}).validate()
    split_section(preset["sft"])
    GRPOConfig(**preset["grpo"]).validate()
    _task_spec(preset["eval"].get("tasks"))
    # GRPO's control: time-matched (steps null) except in smoke, and evaluated with SFT and GRPO
    control = preset["sft_control"]
    assert set(control) <= {"steps", "price_per_hour"}
    assert (control["steps"] is None) == (name != "smoke")
    assert {"sft", "sft_control", "grpo"} <= set(preset["eval"]["stages"])
    for section in PRICED:  # one price for the whole run
        assert preset[section]["price_per_hour"] == preset["price_per_hour"]


def test_overrides(tmp_path):
    preset = load_preset(
        "smoke", ["price_per_hour=3", "grpo.group_size=16", 'sft.tasks={"countdown": [2]}']
    )
    assert preset["grpo"]["group_size"] == 16 and preset["sft"]["tasks"] == {"countdown": [2]}
    assert preset["pretrain"]["price_per_hour"] == 3 and preset["grpo"]["price_per_hour"] == 3
    with pytest.raises(ValueError, match="SECTION.FIELD=VALUE"):
        load_preset("smoke", ["pretrain.lr"])
    with pytest.raises(ValueError, match="SECTION.FIELD=VALUE"):
        load_preset("smoke", ["training.lr=1"])
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("nope")


def test_nested_overrides_reach_sub_sections():
    preset = load_preset("smoke", ["vision.sft.max_steps=5", "vision.grpo.lr=0.001"])
    assert preset["vision"]["sft"]["max_steps"] == 5 and preset["vision"]["grpo"]["lr"] == 0.001
    assert "sft.max_steps" not in preset["vision"]  # not a flat key with a dot in it
    with pytest.raises(ValueError, match="vision.text_share is a value"):
        load_preset("smoke", ["vision.text_share.x=1"])


def test_a_null_section_is_a_skipped_stage_and_setting_a_field_turns_it_on(tmp_path):
    own = json.loads(json.dumps(load_preset("smoke")))
    own.update(grpo=None, price_per_hour=None)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(own))
    assert load_preset(str(path))["grpo"] is None
    assert load_preset(str(path), ["grpo.max_steps=2"])["grpo"] == {"max_steps": 2}
    path.write_text(json.dumps({**own, "trainer": {}}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['trainer'\]"):
        load_preset(str(path))


def test_the_vision_presets_build_their_stage():
    from nanoseek.config import VisionConfig
    from nanoseek.tasks.visual import get_visual_task

    for name in ("vision", "smoke"):
        section = load_preset(name)["vision"]
        VisionConfig(**section["vision"])
        for phase in ("align", "sft"):
            TrainConfig(**section[phase]).validate()
        for task in section["tasks"]:
            get_visual_task(task)
    # the bar: n >= 200 held-out problems per task
    assert load_preset("vision")["vision"]["eval_problems"] >= 200
