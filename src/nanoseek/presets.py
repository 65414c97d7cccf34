"""Presets: one JSON file per scale (smoke, cpu, gpu-1, gpu-8), with a section per stage.

    {"description": str, "price_per_hour": $ per device-hour for the cost estimates,
     "data": {...}, "model": {ModelConfig fields}, "pretrain": {TrainConfig fields},
     "long_context": {...}, "sft": {...}, "grpo": {GRPOConfig fields},
     "sft_control": {"steps": null or N, TrainConfig overrides} (GRPO's control),
     "eval": {keyword arguments of nanoseek.eval.evaluate}, "distill": {...},
     "vision": {stages/vision.py's section}}

A stage section that is absent or null is a stage the speedrun skips (data, model and pretrain are
always there). `load_preset("smoke")` reads the one shipped in nanoseek/configs/; a path reads your
own. `--set section.key=value` on the command line overrides any field, `--set price_per_hour=2.5` a
top-level one.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

SECTIONS = (
    "data",
    "model",
    "pretrain",
    "long_context",
    "sft",
    "grpo",
    "sft_control",
    "eval",
    "distill",
    "vision",
)
# presets that hold only a stage to run on top of an existing run (`nanoseek vision RUN`)
STAGE_PRESETS = ("vision",)
REQUIRED = ("data", "model", "pretrain")
TOP_LEVEL = ("description", "price_per_hour")
# sections whose cost the trainer estimates
PRICED = ("pretrain", "long_context", "sft", "grpo", "sft_control")


def available_presets(stage_presets: bool = True) -> list[str]:
    """The shipped presets; stage_presets=False leaves out those that are not whole runs."""
    return sorted(
        p.name.removesuffix(".json")
        for p in resources.files("nanoseek.configs").iterdir()
        if p.name.endswith(".json")
        and (stage_presets or p.name.removesuffix(".json") not in STAGE_PRESETS)
    )


def load_preset(name_or_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text("utf-8")
    elif name_or_path in available_presets():
        text = (
            resources.files("nanoseek.configs").joinpath(f"{name_or_path}.json").read_text("utf-8")
        )
    else:
        raise ValueError(
            f"unknown preset {name_or_path!r}: use one of {available_presets()} or a .json file"
        )
    preset = json.loads(text)
    unknown = set(preset) - set(SECTIONS) - set(TOP_LEVEL)
    if unknown:
        raise ValueError(
            f"preset {name_or_path!r}: unknown key(s) {sorted(unknown)}; "
            f"sections are {list(SECTIONS)}, top-level settings {list(TOP_LEVEL)}"
        )
    for section in REQUIRED:
        preset.setdefault(section, {})
    for item in overrides or []:
        apply_override(preset, item)
    price = preset.get("price_per_hour")
    for section in PRICED:  # one price for the whole run unless a stage names its own
        if price is not None and preset.get(section) is not None:
            preset[section].setdefault("price_per_hour", price)
    return preset


def section(preset: dict[str, Any], name: str) -> dict[str, Any]:
    """A stage's settings; {} when the preset leaves them out (the stage's defaults)."""
    return dict(preset.get(name) or {})


def apply_override(preset: dict[str, Any], item: str) -> None:
    """'pretrain.max_steps=100' -> preset['pretrain']['max_steps'] = 100, and deeper for nested
    sections ('vision.sft.max_steps=5'); values parsed as JSON, else strings."""
    key, sep, raw = item.partition("=")
    name, dot, field = key.partition(".")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if sep and not dot and key in TOP_LEVEL:
        preset[key] = value
        return
    if not sep or not dot or name not in SECTIONS or not field:
        raise ValueError(
            f"--set {item!r}: expected SECTION.FIELD=VALUE with SECTION one of {list(SECTIONS)}, "
            f"or one of {list(TOP_LEVEL)}=VALUE"
        )
    if preset.get(name) is None:  # setting a field of a skipped stage turns it on
        preset[name] = {}
    # a nested field ('vision.sft.max_steps=5') walks the section's sub-sections
    *path, last = field.split(".")
    target = preset[name]
    for i, part in enumerate(path):
        if target.get(part) is None:
            target[part] = {}
        if not isinstance(target[part], dict) or not part or not last:
            where = ".".join([name, *path[: i + 1]])
            raise ValueError(f"--set {item!r}: {where} is a value, not a section with fields")
        target = target[part]
    target[last] = value
