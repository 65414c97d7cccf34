"""The SFT stage: the run's base checkpoint fine-tuned on the preset's "sft" mix ->
runs/NAME/sft/final. The data mix and the fine-tuning itself are train/sft.py's."""

from __future__ import annotations

from pathlib import Path

from nanoseek.stages.common import latest_checkpoint, run_stage
from nanoseek.train.dist import DistInfo
from nanoseek.train.sft import run_sft, sft_mix, split_section, val_mix


def base_checkpoint(run: Path) -> Path:
    """What SFT starts from: the context-extended model if there is one, else the pretrained one."""
    base = latest_checkpoint(run, ("pretrain", "long_context"))
    if base is not None:
        return base
    raise FileNotFoundError(
        f"{run}: no long_context/final or pretrain/final checkpoint; run `nanoseek pretrain` first"
    )


def sft_stage(run: Path, preset: dict, info: DistInfo, base: str | Path | None = None) -> dict:
    """The pipeline stage: the run's base checkpoint (or `base`) -> runs/NAME/sft/final."""
    run = Path(run)
    data, train = split_section(preset.get("sft") or {})

    def work():
        start = Path(base) if base else base_checkpoint(run)
        convs = sft_mix(data, run / "corpus")
        summary = run_sft(
            start, run / "sft", convs, train, val_conversations=val_mix(data), info=info
        )
        summary["data"] = {k: v for k, v in data.items()}
        return summary

    return run_stage("sft", run / "sft", info, work, main_only=False)
