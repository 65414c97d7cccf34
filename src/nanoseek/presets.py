"""Presets: one JSON file per scale (smoke, cpu, gpu-1, gpu-8), with a section per stage.

    {"data": {...}, "model": {ModelConfig fields}, "pretrain": {TrainConfig fields}, "long_context": {...},
     "sft": {...}, "grpo": {GRPOConfig fields}, "eval": {keyword arguments of nanoseek.eval.evaluate}}

`load_preset("smoke")` reads the one shipped in nanoseek/configs/; a path reads your own. `--set section.key=value`
on the command line overrides any field.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

SECTIONS = ("data", "model", "pretrain", "long_context", "sft", "grpo", "eval")


def available_presets() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in resources.files("nanoseek.configs").iterdir()
                  if p.name.endswith(".json"))


def load_preset(name_or_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text("utf-8")
    elif name_or_path in available_presets():
        text = resources.files("nanoseek.configs").joinpath(f"{name_or_path}.json").read_text("utf-8")
    else:
        raise ValueError(f"unknown preset {name_or_path!r}: use one of {available_presets()} or a .json file")
    preset = json.loads(text)
    for section in SECTIONS:
        preset.setdefault(section, {})
    for item in overrides or []:
        apply_override(preset, item)
    return preset


def apply_override(preset: dict[str, Any], item: str) -> None:
    """'pretrain.max_steps=100' -> preset['pretrain']['max_steps'] = 100 (values parsed as JSON, else strings)."""
    key, sep, raw = item.partition("=")
    section, dot, field = key.partition(".")
    if not sep or not dot or section not in SECTIONS or not field:
        raise ValueError(f"--set {item!r}: expected SECTION.FIELD=VALUE with SECTION one of {list(SECTIONS)}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    preset[section][field] = value
