"""The speedrun: raw bilingual text to a served reasoning model in one command, and its report card.

    corpus ─► tokenizer ─► shards ─► pretrain ─► long_context ─► sft ─► grpo ─► [sft_control]
           ─► [vision] ─► eval ─► export (runs/NAME/final/: weights + model card)
           ─► report (report.md)

(sft_control: GRPO's control, the SFT continued for GRPO's training time, evaluated on the same
problems; stages/sft_control.py)

(vision: a vision-language model built on the post-trained one, runs/NAME/vision/final; only when
the preset has a "vision" section, e.g. smoke; `nanoseek vision RUN` adds it to a finished run)

Every stage writes into runs/NAME/<stage>/ and leaves done.json when it finishes; running the
speedrun again skips finished stages and resumes an interrupted one from its last checkpoint. A
stage whose preset section is absent or null is skipped (data, model and pretrain always run).
`run_pretraining` runs the stages up to a pretrained, context-extended checkpoint (`nanoseek
pretrain`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nanoseek.io import atomic_write_text
from nanoseek.stages.common import latest_checkpoint
from nanoseek.stages.corpus import corpus_stage
from nanoseek.stages.eval import eval_stage
from nanoseek.stages.export import export_stage
from nanoseek.stages.grpo import grpo_stage
from nanoseek.stages.long_context import long_context_stage
from nanoseek.stages.pretrain import pretrain_stage
from nanoseek.stages.report import report_stage
from nanoseek.stages.sft import sft_stage
from nanoseek.stages.sft_control import sft_control_stage
from nanoseek.stages.shards import shards_stage
from nanoseek.stages.tokenizer import tokenizer_stage
from nanoseek.stages.vision import vision_stage
from nanoseek.train import dist
from nanoseek.train.trainer import TrainConfig


def run_speedrun(
    run: str | os.PathLike, preset: dict, *, text_paths: list[str] | None = None
) -> dict:
    """Every stage of the preset, then the report card. Works under torchrun: training stages run on
    every rank, evaluation, export and the report on rank 0. -> {stage: summary}."""
    run = Path(run)
    info = dist.init_distributed(TrainConfig(**preset["pretrain"]).resolved_device)
    try:
        if info.is_main:
            run.mkdir(parents=True, exist_ok=True)
            preset_json = json.dumps(preset, indent=2, ensure_ascii=False) + "\n"
            atomic_write_text(run / "preset.json", preset_json)
        summaries = pretraining_stages(run, preset, info, text_paths)
        if preset.get("sft") is not None:
            summaries["sft"] = sft_stage(run, preset, info)
        if preset.get("grpo") is not None:
            init = latest_checkpoint(run, ("pretrain", "long_context", "sft"))
            summaries["grpo"] = grpo_stage(run, preset, info, init=init)
            if preset.get("sft_control") is not None and preset.get("sft") is not None:
                summaries["sft_control"] = sft_control_stage(run, preset, info)
        if preset.get("vision") is not None:
            summaries["vision"] = vision_stage(run, preset, info)
        if preset.get("eval") is not None:
            summaries["eval"] = eval_stage(run, preset, info)
        summaries["export"] = export_stage(run, preset, info)
        if info.is_main:
            summaries["report"] = report_stage(run)
        return summaries
    finally:
        dist.shutdown(info)


def pretraining_stages(
    run: Path,
    preset: dict,
    info: dist.DistInfo,
    text_paths: list[str] | None = None,
    long_context: bool = True,
) -> dict:
    """corpus → tokenizer → shards → pretrain (→ long_context when the preset has that section)."""
    summaries = {
        "corpus": corpus_stage(run, preset, info, text_paths),
        "tokenizer": tokenizer_stage(run, preset, info),
        "shards": shards_stage(run, preset, info),
        "pretrain": pretrain_stage(run, preset, info),
    }
    if long_context and preset.get("long_context"):
        summaries["long_context"] = long_context_stage(run, preset, info)
    return summaries


def run_pretraining(
    run: str | os.PathLike,
    preset: dict,
    *,
    text_paths: list[str] | None = None,
    long_context: bool = True,
) -> dict:
    """The pretraining stages as one call. Works under torchrun too."""
    info = dist.init_distributed(TrainConfig(**preset["pretrain"]).resolved_device)
    try:
        return pretraining_stages(Path(run), preset, info, text_paths, long_context)
    finally:
        dist.shutdown(info)
