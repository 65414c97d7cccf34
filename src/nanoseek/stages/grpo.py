"""The GRPO stage: runs/NAME/sft/final (or `init`) -> R1-style RL on the preset's "grpo" section
-> runs/NAME/grpo/final. The trainer is train/grpo_trainer.py's."""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.checkpoint import load_model
from nanoseek.stages.common import run_stage
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.dist import DistInfo
from nanoseek.train.grpo_trainer import REWARD_PLOT, GRPOConfig, GRPOTrainer
from nanoseek.train.trainer import export_checkpoint


def grpo_stage(run: Path, preset: dict, info: DistInfo, init: str | Path | None = None) -> dict:
    """runs/NAME/sft/final (or `init`) -> GRPO on the preset's "grpo" section ->
    runs/NAME/grpo/final."""
    run = Path(run)
    section = dict(preset.get("grpo") or {})
    source = Path(init) if init is not None else run / "sft" / "final"

    def work():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(
                f"{source} is not a checkpoint: run the SFT stage first, or pass --init CKPT"
            )
        model, tok = load_model(source), load_tokenizer(source)
        cfg = GRPOConfig(**{**section, "out_dir": str(run / "grpo")})
        result = GRPOTrainer(model, cfg, tok, dist_info=info).fit()
        if info.is_main:
            export_checkpoint(model, run / "grpo" / "final", tok)
        first = _first_eval(run / "grpo" / "metrics.jsonl")
        return {
            "init": str(source),
            "steps": result["steps"],
            "reward": result.get("reward"),
            "val_accuracy_before": first,
            "val_accuracy": result.get("val_accuracy"),
            "rollout_tok_s": result.get("rollout_tok_s"),
            "wall_s": result["wall_s"],
            "estimated_cost": result["estimated_cost"],
            "reward_plot": str(run / "grpo" / REWARD_PLOT),
        }

    return run_stage("grpo", run / "grpo", info, work, main_only=False)


def _first_eval(path: Path) -> float | None:
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    return next((r["val_accuracy"] for r in rows if "val_accuracy" in r), None)
