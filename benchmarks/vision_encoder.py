"""Train the vision encoder in joint SFT, or keep it frozen? The vision stage run twice on the same
language checkpoint, differing only in `train_encoder`, compared on 200 held-out `visual_colour`
problems (difficulty 2, distinct scenes) with 95% Wilson intervals.

    python benchmarks/vision_encoder.py CKPT [--out runs/vision-encoder] [--sft-steps 400]

CKPT: a post-trained language checkpoint whose tokenizer has `<image>` (e.g. a smoke run's
grpo/final). Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nanoseek.stages.vision import train_vision


def section(sft_steps: int, train_encoder: bool) -> dict:
    return {
        "vision": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "max_tiles": 1,
        },
        "tasks": {"visual_colour": [1, 2]},
        "eval_tasks": {"visual_colour": 2},
        "problems_per_task": 300,
        "renders": 2,
        "size": [32, 32],
        "eval_problems": 200,
        "max_new_tokens": 32,
        "train_encoder": train_encoder,
        "align": {
            "max_steps": 60,
            "batch_size": 8,
            "lr": 0.003,
            "log_every": 10,
            "progress": False,
        },
        "sft": {
            "max_steps": sft_steps,
            "batch_size": 8,
            "lr": 0.002,
            "log_every": 10,
            "progress": False,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", default="runs/vision-encoder")
    ap.add_argument("--sft-steps", type=int, default=400)
    args = ap.parse_args()
    for enc in (False, True):
        start = time.perf_counter()
        out = Path(args.out) / f"train_encoder-{enc}"
        s = train_vision(Path(args.checkpoint), out, section(args.sft_steps, enc))
        rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").open()]
        r = s["tasks"]["visual_colour"]
        print(
            json.dumps(
                {
                    "train_encoder": enc,
                    "after": r["after"],
                    "before": r["before"]["accuracy"],
                    "sft_loss_last_logs": [x["loss"] for x in rows if "loss" in x][-5:],
                    "wall_s": round(time.perf_counter() - start, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
