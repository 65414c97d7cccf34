"""The pretraining stage: a model of the preset's shape trained from scratch on the token shards
-> runs/NAME/pretrain/final. `train_on_shards` is the loop it shares with the long-context stage."""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.data.shards import PackedLoader, read_meta, val_loader
from nanoseek.model import Transformer
from nanoseek.stages.common import run_stage
from nanoseek.tokenizer import Tokenizer, load_tokenizer
from nanoseek.train.dist import DistInfo
from nanoseek.train.trainer import TrainConfig, Trainer, export_checkpoint


def train_on_shards(
    run: Path, stage: str, model: Transformer, tcfg: TrainConfig, tok: Tokenizer, info: DistInfo
) -> dict:
    """Train `model` on runs/NAME/shards (validated on its val split) and export it to
    runs/NAME/<stage>/final."""
    shards = run / "shards"
    loader = PackedLoader(
        shards / "train",
        tcfg.batch_size,
        tcfg.seq_len,
        rank=info.rank,
        world_size=info.world_size,
        seed=tcfg.seed,
        tokenizer_sha256=tok.sha256,
    )
    val_meta = read_meta(shards / "val")
    # every token but the first is a target
    bytes_per_tok = val_meta["bytes"] / max(1, val_meta["tokens"] - 1)

    def val():
        return val_loader(
            shards / "val",
            tcfg.batch_size,
            tcfg.seq_len,
            rank=info.rank,
            world_size=info.world_size,
        )

    result = Trainer(
        model,
        tcfg,
        loader,
        val_batches=val,
        val_bytes_per_token=bytes_per_tok,
        tokenizer=tok,
        dist_info=info,
    ).fit()
    if info.is_main:
        export_checkpoint(model, run / stage / "final", tok)
    return {
        "steps": result["steps"],
        "tokens": result["tokens"],
        "final_loss": result.get("lm_loss_avg"),
        "val_loss": result.get("val_loss"),
        "val_bpb": result.get("val_bpb"),
        "flops": result["flops"],
        "wall_s": result["wall_s"],
        "mfu": result["mfu"],
        "estimated_cost": result["estimated_cost"],
        "params": result["params"],
        "active_params": result["active_params"],
    }


def pretrain_stage(run: Path, preset: dict, info: DistInfo) -> dict:
    def work():
        tok = load_tokenizer(run / "tokenizer")
        cfg = ModelConfig(
            **{
                **preset["model"],
                "vocab_size": tok.vocab_size,
                "bos_token_id": tok.bos_id,
                "eos_token_id": tok.eos_id,
            }
        )
        tcfg = TrainConfig(**{**preset["pretrain"], "out_dir": str(run / "pretrain")})
        torch.manual_seed(tcfg.seed)
        model = Transformer(cfg)
        summary = train_on_shards(run, "pretrain", model, tcfg, tok, info)
        summary["unigram_entropy"] = unigram_entropy(run / "shards" / "train")
        return summary

    return run_stage("pretrain", run / "pretrain", info, work, main_only=False)


def unigram_entropy(shard_dir: Path) -> float:
    """Entropy in nats of the token frequencies: the loss of a model that ignores context."""
    import numpy as np

    meta = read_meta(shard_dir)
    counts = np.zeros(1 << 17, dtype=np.int64)
    for shard in meta["shards"]:
        data = np.memmap(shard_dir / shard["file"], dtype=meta["dtype"], mode="r")
        counts[: int(data.max()) + 1] += np.bincount(data, minlength=int(data.max()) + 1)
    p = counts[counts > 0] / counts.sum()
    return round(float(-(p * np.log(p)).sum()), 4)
