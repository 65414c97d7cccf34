"""GRPO's control (stages/sft_control.py): its budget is GRPO's recorded training time, planned in
steps at the SFT's measured speed, or a fixed number of steps; bad settings are refused."""

import json

import pytest

from nanoseek.stages.sft_control import control_budget, sft_control_stage
from nanoseek.train.dist import DistInfo


def _record(run, stage, **cost):
    (run / stage).mkdir(parents=True, exist_ok=True)
    (run / stage / "cost.json").write_text(json.dumps(cost))


def test_the_budget_is_grpos_training_time_at_the_sfts_speed(tmp_path):
    _record(tmp_path, "grpo", wall_s=300.0, steps=60)
    _record(tmp_path, "sft", wall_s=80.0, steps=200)  # 0.4 s per step
    assert control_budget(tmp_path, {}, {"max_steps": 200}) == {
        "max_steps": 750,
        "max_time": 300.0,
        "matched": "grpo_time",
        "grpo_train_s": 300.0,
        "sft_s_per_step": 0.4,
    }
    _record(tmp_path, "grpo", wall_s=301.0)
    assert control_budget(tmp_path, {"steps": None}, {})["max_steps"] == 753  # rounded up
    # a fixed number of steps needs no record
    assert control_budget(tmp_path / "nothing", {"steps": 7}, {}) == {
        "max_steps": 7,
        "max_time": None,
        "matched": "steps",
    }


def test_without_the_sfts_speed_the_clock_alone_stops_it(tmp_path):
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "done.json").write_text(json.dumps({"wall_s": 12.5}))
    budget = control_budget(tmp_path, {}, {"max_steps": 40})
    assert budget["max_time"] == 12.5 and budget["max_steps"] == 40
    assert budget["sft_s_per_step"] is None


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no recorded GRPO training time"):
        control_budget(tmp_path, {}, {})
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        control_budget(tmp_path, {"steps": 0}, {})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['stepz'\]"):
        sft_control_stage(tmp_path, {"sft_control": {"stepz": 3}}, DistInfo())
    with pytest.raises(FileNotFoundError, match="the control needs the SFT's"):
        sft_control_stage(tmp_path, {"sft_control": {"steps": 3}}, DistInfo())


def test_under_torchrun_the_planned_steps_alone_bound_it(tmp_path):
    """Each rank's trainer reads its own clock: a time limit could stop ranks at different steps."""
    _record(tmp_path, "grpo", wall_s=30.0)
    _record(tmp_path, "sft", wall_s=10.0, steps=20)
    budget = control_budget(tmp_path, {}, {}, world_size=8)
    assert budget["max_steps"] == 60 and budget["max_time"] is None
