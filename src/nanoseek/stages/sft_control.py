"""The control for GRPO: the SFT continued from runs/NAME/sft/final for as long as GRPO trained,
on the same SFT data with the same settings -> runs/NAME/sft_control/final. The eval stage grades
it on the same problems as the SFT and GRPO checkpoints, so "GRPO beats more SFT" is a paired
comparison at equal training time.

The budget is GRPO's recorded training time (runs/NAME/grpo/cost.json: the trainer's clock, which
counts training steps across restarts and leaves out set-up and in-run evaluations; the control's
clock counts the same way). It becomes a step plan through the SFT's own measured seconds per
step (runs/NAME/sft/cost.json); the control stops at whichever of the time and the planned steps
comes first (under torchrun, at the planned steps: ranks must stop together). The learning rate
restarts: the SFT's warm-up (at most a fifth of the plan) to the SFT's peak, then the SFT's cosine
down to the same floor over the planned steps. A continuation at the SFT's final (floor) rate
would barely move the weights and make the control a straw man; a warm restart is the strongest
plain "more SFT" at that budget. The data loader reshuffles (seed + 1), so the control does not
replay the SFT's first batches.

The preset section "sft_control" holds "steps" (null: match GRPO's time; a number: exactly that many
steps, reproducible across runs — the smoke preset uses it so that its exact-resume test compares
every figure) and optionally TrainConfig fields that override the SFT's. It resumes like every
stage: done.json when finished, the trainer's last checkpoint when interrupted (the budget is read
again from the same files, so it is the same).
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

from nanoseek.stages.common import run_stage
from nanoseek.train.dist import DistInfo
from nanoseek.train.sft import run_sft, sft_mix, split_section, val_mix
from nanoseek.train.trainer import TrainConfig

STAGE = "sft_control"


def _read(path: Path) -> dict:
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}


def control_budget(run: Path, section: dict, sft_train: dict, world_size: int = 1) -> dict:
    """How long the control trains: {"max_steps", "max_time" (s or None), "matched" ("grpo_time" or
    "steps"), "grpo_train_s", "sft_s_per_step"}. Under torchrun (world_size > 1) the planned steps
    alone bound it: each rank's trainer reads its own clock, and ranks that stopped at different
    steps would wait on each other for ever."""
    run = Path(run)
    if section.get("steps") is not None:
        steps = int(section["steps"])
        if steps < 1:
            raise ValueError(f"sft_control: steps={steps} must be >= 1 (or null: GRPO's time)")
        return {"max_steps": steps, "max_time": None, "matched": "steps"}
    grpo = _read(run / "grpo" / "cost.json") or _read(run / "grpo" / "done.json")
    if not grpo.get("wall_s"):
        raise FileNotFoundError(
            f"{run}/grpo: no recorded GRPO training time (cost.json or done.json); the control "
            "runs after the GRPO stage, or give sft_control.steps"
        )
    sft = _read(run / "sft" / "cost.json")
    if sft.get("steps") and sft.get("wall_s"):
        per_step = sft["wall_s"] / sft["steps"]
    else:  # no measurement: plan the SFT's own length and let the clock stop it
        per_step = None
    seconds = float(grpo["wall_s"])
    planned = (
        max(1, math.ceil(seconds / per_step)) if per_step else int(sft_train.get("max_steps", 1))
    )
    return {
        "max_steps": planned,
        "max_time": seconds if world_size == 1 else None,
        "matched": "grpo_time",
        "grpo_train_s": seconds,
        "sft_s_per_step": round(per_step, 4) if per_step else None,
    }


def sft_control_stage(run: Path, preset: dict, info: DistInfo) -> dict:
    """runs/NAME/sft/final -> the SFT continued for GRPO's training time ->
    runs/NAME/sft_control/final."""
    run = Path(run)
    section = dict(preset.get(STAGE) or {})
    train_fields = {f.name for f in fields(TrainConfig)}
    unknown = set(section) - {"steps"} - train_fields
    if unknown:
        raise ValueError(
            f"{STAGE}: unknown setting(s) {sorted(unknown)}; it takes 'steps' and TrainConfig "
            "fields (the rest is the sft section's)"
        )
    data, train = split_section(preset.get("sft") or {})
    source = run / "sft" / "final"

    def work():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"{source} is not a checkpoint: the control needs the SFT's")
        budget = control_budget(run, section, train, info.world_size)
        overrides = {k: v for k, v in section.items() if k != "steps"}
        control = {
            **train,
            **overrides,
            "max_steps": budget["max_steps"],
            "max_time": budget["max_time"],
            "warmup_steps": min(train["warmup_steps"], max(1, budget["max_steps"] // 5)),
            "seed": train.get("seed", 0) + 1,
        }
        convs = sft_mix(data, run / "corpus")
        summary = run_sft(
            source, run / STAGE, convs, control, val_conversations=val_mix(data), info=info
        )
        summary["train_s"] = summary["wall_s"]  # the trainer's clock, as GRPO's budget was read
        summary["budget"] = budget
        summary["stopped_by"] = "steps" if summary["steps"] >= budget["max_steps"] else "time"
        return summary

    return run_stage(STAGE, run / STAGE, info, work, main_only=False)
