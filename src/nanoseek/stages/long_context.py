"""The long-context stage: DeepSeek's context extension at our scale, YaRN (factor s over the
pretraining length) and then a short run at the longer length: runs/NAME/pretrain/final ->
runs/NAME/long_context/final."""

from __future__ import annotations

from pathlib import Path

from nanoseek.checkpoint import load_model, load_weights_into
from nanoseek.model import Transformer
from nanoseek.stages.common import run_stage
from nanoseek.stages.pretrain import train_on_shards
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.dist import DistInfo
from nanoseek.train.trainer import TrainConfig


def long_context_stage(run: Path, preset: dict, info: DistInfo) -> dict:
    lc = dict(preset.get("long_context") or {})
    if "factor" not in lc or "seq_len" not in lc:
        raise ValueError(
            "preset section long_context needs 'seq_len' and 'factor' (the YaRN scale)"
        )

    def work():
        base = load_model(run / "pretrain" / "final")
        tok = load_tokenizer(run / "pretrain" / "final")
        original = preset["pretrain"].get("seq_len", 256)
        factor = float(lc.pop("factor"))
        yarn = {
            "type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
        context = max(lc["seq_len"], int(original * factor))
        cfg = base.config.replace(max_position_embeddings=context, rope_scaling=yarn)
        model = Transformer(cfg)
        load_weights_into(model, run / "pretrain" / "final")
        tcfg = TrainConfig(**{**lc, "out_dir": str(run / "long_context")})
        summary = train_on_shards(run, "long_context", model, tcfg, tok, info)
        summary.update(
            context=cfg.max_position_embeddings, yarn_factor=factor, original_context=original
        )
        return summary

    return run_stage("long_context", run / "long_context", info, work, main_only=False)
