"""Does MoE pay off? A MoE model and a dense model with the same active parameters per
token, trained for the same wall-clock time on the embedded corpus, compared on
validation bits per byte (DeepSeek's claim).

    python benchmarks/moe_vs_dense.py [--preset smoke] [--seconds 300] [--run runs/moe-vs-dense]

The data stages (corpus, tokenizer, shards) come from the preset and are shared by both models.
Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from train_step import dense_twin

from nanoseek import ModelConfig, Transformer
from nanoseek.data.shards import PackedLoader, read_meta, val_loader
from nanoseek.presets import load_preset
from nanoseek.stages.corpus import corpus_stage
from nanoseek.stages.shards import shards_stage
from nanoseek.stages.tokenizer import tokenizer_stage
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.dist import DistInfo
from nanoseek.train.flops import active_matmul_params
from nanoseek.train.trainer import TrainConfig, Trainer


@torch.no_grad()
def full_val_bpb(model: Transformer, shards: Path, batch: int, seq_len: int) -> float:
    """Bits per byte over the whole validation split: every token is predicted once, so the nats of
    all predictions over the bytes of all documents."""
    model.eval()
    nats = 0.0
    for inputs, targets in val_loader(shards, batch, seq_len):
        nats += torch.nn.functional.cross_entropy(
            model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        ).item()
    return nats / (math.log(2) * read_meta(shards)["bytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument(
        "--seconds", type=float, default=300.0, help="training wall-clock time per model"
    )
    ap.add_argument("--run", default="runs/moe-vs-dense")
    args = ap.parse_args()
    run, info = Path(args.run), DistInfo()
    preset = load_preset(args.preset)
    corpus_stage(run, preset, info)
    tokenizer_stage(run, preset, info)
    shards_stage(run, preset, info)
    tok = load_tokenizer(run / "tokenizer")
    moe_cfg = ModelConfig(
        **{**preset["model"], "vocab_size": tok.vocab_size, "num_nextn_predict_layers": 0}
    )
    results = {}
    for name, cfg in (("moe", moe_cfg), ("dense", dense_twin(moe_cfg))):
        out = run / name
        shutil.rmtree(out, ignore_errors=True)
        tcfg = TrainConfig(
            **{
                **preset["pretrain"],
                "out_dir": str(out),
                "max_steps": 10**6,
                "max_time": args.seconds,
                "save_every": 10**6,
                "eval_every": 10**6,
                "schedule": "wsd",
            }
        )
        torch.manual_seed(0)
        model = Transformer(cfg)
        loader = PackedLoader(
            run / "shards" / "train", tcfg.batch_size, tcfg.seq_len, tokenizer_sha256=tok.sha256
        )
        result = Trainer(model, tcfg, loader).fit()
        results[name] = {
            "val_bpb": full_val_bpb(model, run / "shards" / "val", tcfg.batch_size, tcfg.seq_len),
            "steps": result["steps"],
            "tokens": result["tokens"],
            "active_params": active_matmul_params(cfg),
            "params": model.num_parameters(),
        }
    moe, dense = results["moe"], results["dense"]
    print(
        json.dumps(
            {
                "bench": "moe_vs_dense_val_bpb",
                "ours": round(moe["val_bpb"], 4),
                "anchor": round(dense["val_bpb"], 4),
                "ratio": round(moe["val_bpb"] / dense["val_bpb"], 4),
                "unit": "validation bits per byte (lower is better); anchor = dense twin",
                "config": f"preset {args.preset}, "
                f"{args.seconds:.0f} s of training each, same active params",
                "moe": moe,
                "dense": dense,
            }
        )
    )


if __name__ == "__main__":
    main()
