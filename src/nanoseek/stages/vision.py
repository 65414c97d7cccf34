"""The vision stage: a language checkpoint (the run's post-trained model: grpo/final, else
sft/final) -> a DeepSeek-VL2-style vision-language model -> runs/NAME/vision/final.

    (a) align:  the adaptor (projector, newline and separator vectors) trains on image
                conversations with the encoder and the language model frozen (router biases too)
    (b) sft:    joint SFT on the same conversations: the language model and the adaptor train, the
                encoder too when the preset's `train_encoder` says so

Both phases are `Trainer.fit` (train/vision.py VisionTrainer) on the rendered visual tasks' train
split; held-out problems (a different split by key, rendered with their own seeds) are answered
greedily through the engine before and after, with 95% Wilson intervals (eval/visual.py). Like the
other stages it leaves done.json, resumes an interrupted phase from its checkpoints, and writes a
few sample images with their questions and answers under vision/samples/ for the report card.

The preset's "vision" section:
    {"vision": {VisionConfig fields}, "tasks": {task: [difficulties]}, "problems_per_task": int,
     "renders": int, "size": [w, h] or null (each task's own), "eval_problems": int,
     "eval_tasks": {task: difficulty} (default: each task's highest), "max_new_tokens": int,
     "train_encoder": bool, "samples": int, "align": {TrainConfig fields}, "sft": {...}}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from nanoseek.checkpoint import load_model, save_vision_language_model
from nanoseek.config import VisionConfig
from nanoseek.data.images import image_id_of
from nanoseek.engine import Engine
from nanoseek.eval.visual import evaluate_visual_task
from nanoseek.io import atomic_write_text
from nanoseek.model.vision import VisionLanguageModel, VisionTower
from nanoseek.stages.common import latest_checkpoint, run_stage
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.dist import DistInfo
from nanoseek.train.trainer import TrainConfig
from nanoseek.train.vision import (
    ImageConversationLoader,
    VisionTrainer,
    visual_examples,
    visual_problems,
)

PHASE_DEFAULTS = {
    "batch_size": 8,
    "seq_len": 256,
    "warmup_steps": 5,
    "schedule": "cosine",
    "min_lr_ratio": 0.1,
    "save_every": 50,
    "log_every": 10,
    "eval_every": 10**9,  # no validation loss: the stage evaluates accuracy itself
    "weight_decay": 0.0,
}


def source_checkpoint(run: Path) -> Path:
    src = latest_checkpoint(run, ("sft", "grpo"))
    if src is None:
        raise FileNotFoundError(
            f"{run}: no sft/final or grpo/final checkpoint; the vision stage starts from a "
            "post-trained language model (run the speedrun first, or pass init)"
        )
    return src


def build_vlm(source: Path, vcfg: VisionConfig, seed: int = 0):
    """The language checkpoint plus a freshly initialised tower -> (vlm, tokenizer)."""
    tok = load_tokenizer(source)
    lm = load_model(source, dtype=torch.float32)
    torch.manual_seed(seed)
    tower = VisionTower(vcfg, lm.config.hidden_size)
    return VisionLanguageModel(lm, tower, image_id_of(tok)), tok


def vision_stage(run: Path, preset: dict, info: DistInfo, init: str | Path | None = None) -> dict:
    """The pipeline stage (rank 0 only; the tiny tower and task data need no data parallelism)."""
    run = Path(run)
    section = dict(preset.get("vision") or {})
    out = run / "vision"

    def work():
        return train_vision(Path(init) if init else source_checkpoint(run), out, section, preset)

    return run_stage("vision", out, info, work)


def _phase_config(section: dict, name: str, out: Path, price: float | None) -> TrainConfig:
    # "auto" precision would time the model on random ids, which may hold the <image> id
    default_precision = "bf16" if torch.cuda.is_available() else "fp32"
    fields = {
        **PHASE_DEFAULTS,
        "precision": default_precision,
        **dict(section.get(name) or {}),
        "out_dir": str(out / name),
    }
    if fields["precision"] == "auto":
        fields["precision"] = default_precision
    if price is not None:
        fields.setdefault("price_per_hour", price)
    return TrainConfig(**fields)


def train_vision(source: Path, out: Path, section: dict, preset: dict | None = None) -> dict:
    start = time.perf_counter()
    vcfg = VisionConfig(**dict(section.get("vision") or {}))
    vlm, tok = build_vlm(source, vcfg, section.get("seed", 0))
    tasks = {k: list(v) for k, v in (section.get("tasks") or {"visual_colour": [1, 2]}).items()}
    size = tuple(section["size"]) if section.get("size") else None
    price = (preset or {}).get("price_per_hour")

    problems = visual_problems(tasks, section.get("problems_per_task", 200), split="train")
    examples = visual_examples(tok, vcfg, problems, renders=section.get("renders", 1), size=size)
    eval_tasks = section.get("eval_tasks") or {k: max(v) for k, v in tasks.items()}
    held_out = {
        name: visual_problems({name: [d]}, section.get("eval_problems", 200), split="test", seed=1)
        for name, d in eval_tasks.items()
    }

    def evaluate(samples: int = 0) -> dict:
        vlm.eval()
        engine = Engine(vlm, tok, max_batch_size=64, max_num_batched_tokens=2048)
        results = {
            name: evaluate_visual_task(
                engine,
                tok,
                probs,
                size=size,
                max_new_tokens=section.get("max_new_tokens", 64),
                samples=samples,
            )
            for name, probs in held_out.items()
        }
        vlm.train()
        return results

    before = evaluate()
    summary: dict = {"init": str(source), "examples": len(examples)}

    # (a) adaptor alignment: encoder and language model frozen (router biases held too)
    vlm.freeze(encoder=True, projector=False, language=True)
    align_cfg = _phase_config(section, "align", out, price)
    align_cfg.bias_update_speed = 0.0
    loader = ImageConversationLoader(
        examples, align_cfg.batch_size, align_cfg.seq_len, tok.pad_id, seed=align_cfg.seed
    )
    align = VisionTrainer(vlm, align_cfg, loader, tokenizer=tok).fit()

    # (b) joint SFT: language model + adaptor (+ encoder when train_encoder)
    train_encoder = bool(section.get("train_encoder", False))
    vlm.freeze(encoder=not train_encoder, projector=False, language=False)
    sft_cfg = _phase_config(section, "sft", out, price)
    loader = ImageConversationLoader(
        examples, sft_cfg.batch_size, sft_cfg.seq_len, tok.pad_id, seed=sft_cfg.seed + 1
    )
    sft = VisionTrainer(vlm, sft_cfg, loader, tokenizer=tok).fit()
    vlm.freeze()

    after = evaluate(samples=section.get("samples", 3))
    save_vision_language_model(vlm, out / "final", tokenizer=tok)
    samples = _write_samples(out / "samples", after)
    results = {}
    for name in held_out:
        a = {k: v for k, v in after[name].items() if k != "samples"}
        b = {k: v for k, v in before[name].items() if k != "samples"}
        results[name] = {"before": b, "after": a}
    summary.update(
        {
            "dropped_too_long": loader.dropped,
            "train_encoder": train_encoder,
            "align": _phase_summary(align),
            "sft": _phase_summary(sft),
            "tasks": results,
            "samples": samples,
            "checkpoint": str(out / "final"),
            "val_accuracy_before": _mean(r["before"]["accuracy"] for r in results.values()),
            "val_accuracy": _mean(r["after"]["accuracy"] for r in results.values()),
            "wall_s": round(time.perf_counter() - start, 2),
        }
    )
    return summary


def _phase_summary(result: dict) -> dict:
    keep = ("steps", "loss", "lm_loss", "wall_s", "estimated_cost")
    return {k: result[k] for k in keep if k in result}


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else 0.0


def _write_samples(path: Path, results: dict) -> list[dict]:
    """Sample images (PNG) with their questions, answers and the model's completions."""
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, r in results.items():
        for i, s in enumerate(r.get("samples", [])):
            file = path / f"{name}-{i}.png"
            s["image"].save(file)
            rows.append(
                {
                    "task": name,
                    "image": str(file.relative_to(path.parent)),
                    "question": s["question"],
                    "answer": s["answer"],
                    "completion": s["completion"],
                    "correct": s["correct"],
                }
            )
    atomic_write_text(path / "samples.json", json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    return rows
