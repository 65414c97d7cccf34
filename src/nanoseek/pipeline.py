"""The stages from raw text to a pretrained, context-extended checkpoint, each writing into `runs/NAME/<stage>/`.

    corpus ─► tokenizer ─► shards ─► pretrain ─► long_context
    (text)    (BPE)        (tokens)  (MoE+MLA+MTP) (YaRN, longer sequences)

A finished stage leaves `done.json` (its summary) and is skipped when the pipeline runs again; an interrupted
training stage resumes from its last checkpoint. Stages exchange files only: checkpoints, token shards, JSON.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nanoseek.checkpoint import load_model, load_weights_into, save_model
from nanoseek.config import ModelConfig
from nanoseek.data.corpus import build_corpus, default_sources, iter_texts, user_sources
from nanoseek.data.shards import PackedLoader, read_meta, val_loader, write_shards
from nanoseek.io import atomic_dir, atomic_write_text
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer, bytes_per_token, load_tokenizer
from nanoseek.train import dist as D
from nanoseek.train.trainer import TrainConfig, Trainer

DONE = "done.json"
TRAINED_STAGES = ("pretrain", "long_context", "sft", "grpo")  # the stages that leave a checkpoint, in order


def latest_checkpoint(run: Path, stages: tuple[str, ...] = TRAINED_STAGES) -> Path | None:
    """`run/<stage>/final` of the last of `stages` that has finished one, or None."""
    return next((run / s / "final" for s in reversed(stages) if (run / s / "final" / "config.json").is_file()),
                None)


def stage_done(path: Path) -> dict | None:
    f = path / DONE
    return json.loads(f.read_text("utf-8")) if f.is_file() else None


def _finish(path: Path, summary: dict) -> dict:
    atomic_write_text(path / DONE, json.dumps(summary, indent=2) + "\n")
    return summary


def run_stage(name: str, path: Path, info: D.DistInfo, work: Callable[[], dict], main_only: bool = True) -> dict:
    """Run `work` unless the stage is complete; with main_only, rank 0 works and the others wait for its result."""
    summary = stage_done(path)
    if summary is None and (info.is_main or not main_only):
        start = time.perf_counter()
        summary = work()
        # the trainer's own clock spans restarts; this one includes set-up and evaluations: keep the larger
        summary["wall_s"] = round(max(summary.get("wall_s", 0.0), time.perf_counter() - start), 2)
        if info.is_main:
            _finish(path, summary)
        print(f"[{name}] done in {summary['wall_s']:.1f}s: " + ", ".join(
            f"{k}={v}" for k, v in summary.items() if k in _HEADLINE), flush=True)
    elif summary is not None and info.is_main:
        print(f"[{name}] already complete ({path}), skipped", flush=True)
    D.barrier(info)
    return summary if summary is not None else stage_done(path)


_HEADLINE = ("docs", "bytes", "vocab_size", "bytes_per_token", "tokens", "steps", "final_loss", "val_bpb", "mfu",
             "val_accuracy_before", "val_accuracy", "checkpoint")


# ---------------------------------------------------------------------- data
def corpus_stage(run: Path, preset: dict, info: D.DistInfo, text_paths: list[str] | None = None) -> dict:
    data = preset["data"]

    def work():
        sources = user_sources(text_paths) if text_paths else default_sources()
        manifest = build_corpus(run / "corpus", sources, max_bytes=data.get("max_bytes"))
        totals = manifest.get("totals", {})
        return {"docs": totals.get("docs"), "bytes": totals.get("bytes"), "sources": len(manifest["sources"])}
    return run_stage("corpus", run / "corpus", info, work)


def tokenizer_stage(run: Path, preset: dict, info: D.DistInfo) -> dict:
    def work():
        tok = Tokenizer.train(iter_texts(run / "corpus", "train"), preset["data"].get("vocab_size", 8192))
        tok.save(run / "tokenizer")
        by_lang: dict[str, list[str]] = {}
        for line in (run / "corpus" / "val.jsonl").read_text("utf-8").splitlines():
            rec = json.loads(line)
            by_lang.setdefault(rec["lang"], []).append(rec["text"])
        return {"vocab_size": tok.vocab_size, "bytes_per_token": bytes_per_token(tok, by_lang)}
    return run_stage("tokenizer", run / "tokenizer", info, work)


def shards_stage(run: Path, preset: dict, info: D.DistInfo) -> dict:
    def work():
        tok = load_tokenizer(run / "tokenizer")
        metas = {split: write_shards(run / "corpus" / f"{split}.jsonl", tok, run / "shards" / split)
                 for split in ("train", "val")}
        return {"tokens": metas["train"]["tokens"], "val_tokens": metas["val"]["tokens"],
                "bytes": metas["train"]["bytes"]}
    return run_stage("shards", run / "shards", info, work)


# ---------------------------------------------------------------------- training
def _train(run: Path, stage: str, model: Transformer, tcfg: TrainConfig, tok: Tokenizer,
           info: D.DistInfo) -> dict:
    shards = run / "shards"
    loader = PackedLoader(shards / "train", tcfg.batch_size, tcfg.seq_len, rank=info.rank,
                          world_size=info.world_size, seed=tcfg.seed, tokenizer_sha256=tok.sha256)
    val_meta = read_meta(shards / "val")
    bytes_per_tok = val_meta["bytes"] / max(1, val_meta["tokens"] - 1)  # every token but the first is a target

    def val():
        return val_loader(shards / "val", tcfg.batch_size, tcfg.seq_len, rank=info.rank, world_size=info.world_size)
    result = Trainer(model, tcfg, loader, val_batches=val, val_bytes_per_token=bytes_per_tok, tokenizer=tok,
                     dist_info=info).fit()
    if info.is_main:
        export_checkpoint(model, run / stage / "final", tok)
    return {"steps": result["steps"], "tokens": result["tokens"], "final_loss": result.get("lm_loss_avg"),
            "val_loss": result.get("val_loss"), "val_bpb": result.get("val_bpb"), "flops": result["flops"],
            "wall_s": result["wall_s"], "mfu": result["mfu"], "estimated_cost": result["estimated_cost"],
            "params": result["params"], "active_params": result["active_params"]}


def export_checkpoint(model: Transformer, path: Path, tok: Tokenizer) -> None:
    """The stage's result as an HF directory, renamed into place once complete."""
    with atomic_dir(path) as tmp:
        save_model(model, tmp, tokenizer=tok)


def pretrain_stage(run: Path, preset: dict, info: D.DistInfo) -> dict:
    def work():
        tok = load_tokenizer(run / "tokenizer")
        cfg = ModelConfig(**{**preset["model"], "vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id,
                             "eos_token_id": tok.eos_id})
        tcfg = TrainConfig(**{**preset["pretrain"], "out_dir": str(run / "pretrain")})
        torch.manual_seed(tcfg.seed)
        model = Transformer(cfg)
        summary = _train(run, "pretrain", model, tcfg, tok, info)
        summary["unigram_entropy"] = unigram_entropy(run / "shards" / "train")
        return summary
    return run_stage("pretrain", run / "pretrain", info, work, main_only=False)


def long_context_stage(run: Path, preset: dict, info: D.DistInfo) -> dict:
    """DeepSeek's context extension at our scale: YaRN (factor s over the pretraining length), then a short run
    at the longer length."""
    lc = dict(preset.get("long_context") or {})
    if "factor" not in lc or "seq_len" not in lc:
        raise ValueError("preset section long_context needs 'seq_len' and 'factor' (the YaRN scale)")

    def work():
        base = load_model(run / "pretrain" / "final")
        tok = load_tokenizer(run / "pretrain" / "final")
        original = preset["pretrain"].get("seq_len", 256)
        factor = float(lc.pop("factor"))
        cfg = base.config.replace(max_position_embeddings=max(lc["seq_len"], int(original * factor)), rope_scaling={
            "type": "yarn", "factor": factor, "original_max_position_embeddings": original, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
        model = Transformer(cfg)
        load_weights_into(model, run / "pretrain" / "final")
        tcfg = TrainConfig(**{**lc, "out_dir": str(run / "long_context")})
        summary = _train(run, "long_context", model, tcfg, tok, info)
        summary.update(context=cfg.max_position_embeddings, yarn_factor=factor, original_context=original)
        return summary
    return run_stage("long_context", run / "long_context", info, work, main_only=False)


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


def pretraining_stages(run: Path, preset: dict, info: D.DistInfo, text_paths: list[str] | None = None,
                       long_context: bool = True) -> dict:
    """corpus → tokenizer → shards → pretrain (→ long_context when the preset has that section)."""
    summaries = {"corpus": corpus_stage(run, preset, info, text_paths),
                 "tokenizer": tokenizer_stage(run, preset, info),
                 "shards": shards_stage(run, preset, info),
                 "pretrain": pretrain_stage(run, preset, info)}
    if long_context and preset.get("long_context"):
        summaries["long_context"] = long_context_stage(run, preset, info)
    return summaries


def run_pretraining(run: str | os.PathLike, preset: dict, *, text_paths: list[str] | None = None,
                    long_context: bool = True) -> dict:
    """The pretraining stages as one call. Works under torchrun too."""
    info = D.init_distributed(TrainConfig(**preset["pretrain"]).resolved_device)
    try:
        return pretraining_stages(Path(run), preset, info, text_paths, long_context)
    finally:
        D.shutdown(info)
