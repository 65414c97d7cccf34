"""What every stage shares: a finished stage leaves `done.json` (its summary) and is skipped when
the pipeline runs again; an interrupted training stage resumes from its last checkpoint (the Trainer
does that); a stage's model is read from the `final/` checkpoint of the stage before it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from nanoseek.io import atomic_write_text
from nanoseek.train import dist

DONE = "done.json"
# the stages that leave a checkpoint, in order
TRAINED_STAGES = ("pretrain", "long_context", "sft", "grpo")


def latest_checkpoint(run: Path, stages: tuple[str, ...] = TRAINED_STAGES) -> Path | None:
    """`run/<stage>/final` of the last of `stages` that has finished one, or None."""
    finished = (run / s / "final" for s in reversed(stages))
    return next((path for path in finished if (path / "config.json").is_file()), None)


def stage_done(path: Path) -> dict | None:
    f = path / DONE
    return json.loads(f.read_text("utf-8")) if f.is_file() else None


def write_done(path: Path, summary: dict) -> dict:
    """Mark the stage at `path` finished, with its summary."""
    atomic_write_text(path / DONE, json.dumps(summary, indent=2) + "\n")
    return summary


def run_stage(
    name: str, path: Path, info: dist.DistInfo, work: Callable[[], dict], main_only: bool = True
) -> dict:
    """Run `work` unless the stage is complete; with main_only, rank 0 works
    and the others wait for its result."""
    summary = stage_done(path)
    if summary is None and (info.is_main or not main_only):
        start = time.perf_counter()
        summary = work()
        # the trainer's own clock spans restarts; this one includes set-up
        # and evaluations: keep the larger
        summary["wall_s"] = round(max(summary.get("wall_s", 0.0), time.perf_counter() - start), 2)
        if info.is_main:
            write_done(path, summary)
        print(
            f"[{name}] done in {summary['wall_s']:.1f}s: "
            + ", ".join(f"{k}={v}" for k, v in summary.items() if k in _HEADLINE),
            flush=True,
        )
    elif summary is not None and info.is_main:
        print(f"[{name}] already complete ({path}), skipped", flush=True)
    dist.barrier(info)
    return summary if summary is not None else stage_done(path)


_HEADLINE = (
    "docs",
    "bytes",
    "vocab_size",
    "bytes_per_token",
    "tokens",
    "steps",
    "final_loss",
    "val_bpb",
    "mfu",
    "val_accuracy_before",
    "val_accuracy",
    "checkpoint",
)
