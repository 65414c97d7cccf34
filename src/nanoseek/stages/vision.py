"""The vision stage: a language checkpoint (the run's post-trained model: grpo/final, else
sft/final) -> a DeepSeek-VL2-style vision-language model -> runs/NAME/vision/final.

    (0) glyph:  only when the section has a "glyph" part with steps: the tower's encoder trained
                alone to transcribe the reading tasks' pictures by CTC (stages/glyph.py; its head
                is dropped afterwards), so that it reads before the language model sees it
    (a) align:  the adaptor (projector, newline and separator vectors) trains on image
                conversations with the encoder and the language model frozen (router biases too)
    (b) sft:    joint SFT on the same conversations: the language model and the adaptor train, the
                encoder too when the preset's `train_encoder` says so; `text_share` of the epoch's
                conversations are text-only ones from the text SFT's own mix (train/sft.py sft_mix,
                the run's corpus), so that the language model keeps its text (DeepSeek-VL2 keeps
                about 30% text-only data in its VL mix)
    (c) grpo:   GRPO on the visual tasks (train/vision.py VisualGRPOTrainer: the text GRPO loop,
                the pictures in the prompts, each task's grader as the reward); the same parts
                train as in (b). Only when the section has a "grpo" part.

(a) and (b) are `Trainer.fit` (train/vision.py VisionTrainer) on the rendered visual tasks' train
split, (c) is `GRPOTrainer.fit`; held-out problems (a different split by key, rendered with their
own seeds) are answered greedily through the engine before training, after SFT and after GRPO, the
same problems with the same pictures each time, with 95% Wilson intervals (eval/visual.py) and the
paired interval of GRPO's change (eval/stats.py paired_difference). Every problem's outcomes go to
vision/outcomes.jsonl.

What vision costs text: the language model's bits per byte on the run's held-out text (en, zh,
code; eval/bpb.py) and its greedy accuracy on a few held-out text-task problems (eval/accuracy.py),
measured on the starting checkpoint and on the final model's language part, the task change with
its paired interval; with a GRPO phase, the bits per byte after SFT too (what GRPO adds to it).

The data: vision/manifest.json records, like the corpus's manifest, where the pictures come from:
each task's difficulties and share of photo backgrounds, and every real photo that those can draw
over (tasks/photos.py), with its package, version, file, sha256, licence and attribution.

Like the other stages it leaves done.json, resumes an interrupted phase from its checkpoints, and
writes a few sample images with their questions and answers under vision/samples/ for the report
card.

The preset's "vision" section:
    {"vision": {VisionConfig fields}, "tasks": {task: [difficulties]}, "problems_per_task": int,
     "renders": int, "size": [w, h] or null (each task's own), "eval_problems": int,
     "eval_tasks": {task: difficulty} (default: each task's highest), "max_new_tokens": int,
     "train_encoder": bool, "samples": int,
     "glyph": {stages/glyph.py GLYPH_DEFAULTS fields: steps, batch_size, lr, ...} (default: none),
     "align": {TrainConfig fields}, "sft": {...},
     "text_share": float in [0, 1) (joint SFT's text-only share; default 0: images only),
     "text_mix": {train/sft.py DATA_DEFAULTS fields over the preset's own "sft" data settings},
     "grpo": {GRPOConfig fields; tasks default to the section's, "name:lowest-highest"},
     "text_eval": {"bpb_bytes": int per language (0: none), "tasks": {task: [difficulties]},
                   "n_problems": int per task, "langs": [...], "max_new_tokens": int,
                   "corpus": a corpus directory (default: the run's, else none: no bpb)}}
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
from nanoseek.eval.accuracy import generate_completions
from nanoseek.eval.bpb import bits_per_byte, heldout_texts
from nanoseek.eval.quality import task_problems
from nanoseek.eval.stats import paired_difference, wilson_interval
from nanoseek.eval.visual import evaluate_visual_task
from nanoseek.io import atomic_write_text
from nanoseek.model.vision import VisionLanguageModel, VisionTower
from nanoseek.stages.common import latest_checkpoint, run_stage
from nanoseek.stages.glyph import glyph_phase, glyph_settings
from nanoseek.tasks import TASKS
from nanoseek.tasks.photos import photo_manifest
from nanoseek.tasks.visual import get_visual_task
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.dist import DistInfo
from nanoseek.train.grpo_trainer import REWARD_PLOT, GRPOConfig
from nanoseek.train.sft import DATA_DEFAULTS, sft_mix, split_section
from nanoseek.train.trainer import TrainConfig
from nanoseek.train.vision import (
    ImageConversationLoader,
    VisionTrainer,
    VisualGRPOTrainer,
    text_examples,
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
GRPO_DEFAULTS = {
    "eval_problems": 0,  # the stage evaluates the held-out problems itself, before and after
    "log_every": 1,
    "save_every": 10,
    "scale_rewards": "batch",
    "epsilon_high": 0.28,
}
TEXT_EVAL_DEFAULTS = {
    "bpb_bytes": 20_000,
    "tasks": {"arithmetic": [1]},
    "n_problems": 32,
    "langs": ["en", "zh"],
    "max_new_tokens": 64,
    "corpus": None,
}
OUTCOMES = "outcomes.jsonl"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "nanoseek-vision-data-v1"


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
    # the later phases' settings are checked before any training
    text_eval = text_eval_settings(section)
    text_share, mix_data = text_mix_settings(section, preset, out.parent)
    glyph_section = {**section, "tasks": tasks}  # the tasks with their defaults
    glyph = glyph_settings(glyph_section)
    grpo_cfg = grpo_phase_config(section, tasks, out, price) if section.get("grpo") else None
    if grpo_cfg is not None:
        grpo_cfg.validate()

    manifest = data_manifest(tasks)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    problems = visual_problems(tasks, section.get("problems_per_task", 200), split="train")
    examples = visual_examples(tok, vcfg, problems, renders=section.get("renders", 1), size=size)
    eval_tasks = section.get("eval_tasks") or {k: max(v) for k, v in tasks.items()}
    held_out = {
        name: visual_problems({name: [d]}, section.get("eval_problems", 200), split="test", seed=1)
        for name, d in eval_tasks.items()
    }

    def evaluate(samples: int = 0) -> dict:
        vlm.eval()
        engine = Engine(vlm, tok, max_batch_size=64, max_num_batched_tokens=2048, decode="eager")
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

    corpus = _text_corpus(text_eval["corpus"], out.parent, source)
    text_pool = []
    if text_share:  # the text SFT's own kinds of conversation, corpus Q&A from the run's corpus
        text_pool = text_examples(tok, sft_mix(mix_data, corpus))
    texts = {}
    if corpus is not None and text_eval["bpb_bytes"]:
        texts = heldout_texts(corpus, text_eval["bpb_bytes"])
    text_before = text_figures(vlm.language_model, tok, texts, text_eval)
    before = evaluate()
    summary: dict = {"init": str(source), "examples": len(examples)}

    # (0) glyph pretraining: the tower alone learns to transcribe the reading tasks' pictures
    if glyph is not None:
        summary["glyph"] = glyph_phase(
            vlm.vision, glyph_section, glyph, held_out, out / "glyph", size
        )

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
        examples,
        sft_cfg.batch_size,
        sft_cfg.seq_len,
        tok.pad_id,
        seed=sft_cfg.seed + 1,
        text_examples=text_pool,
        text_share=text_share,
    )
    sft = VisionTrainer(vlm, sft_cfg, loader, tokenizer=tok).fit()
    n_samples = section.get("samples", 3)
    image_targets, text_targets = loader.target_tokens()
    text_mix = {
        "share": text_share,
        "text_target_share": round(text_targets / max(1, image_targets + text_targets), 4),
        "image_per_epoch": len(loader.examples),
        "text_per_epoch": loader.text_per_epoch,
        "text_pool": len(loader.text_examples),
        "text_dropped_too_long": loader.text_dropped,
    }

    # (c) GRPO on the visual tasks: the policy is the whole model that SFT trained, the same
    # parts train (the answers' errors are mostly misreadings: the tower must be able to move)
    grpo = None
    after_sft = evaluate(samples=0 if grpo_cfg is not None else n_samples)
    after = after_sft
    bpb_sft = None
    if grpo_cfg is not None:
        bpb_sft = text_bpb(vlm.language_model, tok, texts)  # what GRPO adds to SFT's text cost
        vlm.train()
        grpo = VisualGRPOTrainer(vlm, grpo_cfg, tok, size=size).fit()
        after = evaluate(samples=n_samples)
    vlm.freeze()

    text_after = text_figures(vlm.language_model, tok, texts, text_eval)
    save_vision_language_model(vlm, out / "final", tokenizer=tok)
    samples = _write_samples(out / "samples", after)
    results = {}
    for name in held_out:
        # "after" is the final model (after GRPO when it ran); "sft" the point between
        r = {"before": _figures(before[name])}
        if grpo is not None:
            r["sft"] = _figures(after_sft[name])
        r["after"] = _figures(after[name])
        if grpo is not None:
            r["grpo_change"] = _paired(after_sft[name]["outcomes"], after[name]["outcomes"])
        results[name] = r
    final = after if grpo is not None else None
    _write_outcomes(out / OUTCOMES, held_out, before, after_sft, final, text_before, text_after)
    summary.update(
        {
            "dropped_too_long": loader.dropped,
            "train_encoder": train_encoder,
            "align": _phase_summary(align),
            "sft": _phase_summary(sft),
            "text_mix": text_mix,
            **({"grpo": _grpo_summary(grpo, out / "grpo")} if grpo is not None else {}),
            "tasks": results,
            "text": _text_summary(text_before, text_after, corpus, text_eval, bpb_sft),
            "samples": samples,
            "manifest": str(out / MANIFEST),
            "photos": [p["name"] for p in manifest["photos"]],
            "checkpoint": str(out / "final"),
            "val_accuracy_before": _mean(r["before"]["accuracy"] for r in results.values()),
            "val_accuracy_sft": _mean(
                r.get("sft", r["after"])["accuracy"] for r in results.values()
            ),
            "val_accuracy": _mean(r["after"]["accuracy"] for r in results.values()),
            "wall_s": round(time.perf_counter() - start, 2),
        }
    )
    return summary


def data_manifest(tasks: dict) -> dict:
    """Where the stage's pictures come from: per visual task its difficulties and the share of
    pictures drawn over a photo at each; the photos that any of them can draw over, with package,
    version, sha256 and licence (tasks/photos.py photo_manifest)."""
    entries = {}
    for name, difficulties in tasks.items():
        task = get_visual_task(name)
        entries[name] = {
            "difficulties": list(difficulties),
            "photo_share": {str(d): task.share_of_photos(d) for d in difficulties},
        }
    with_photos = [name for name, e in entries.items() if any(e["photo_share"].values())]
    return {
        "format": MANIFEST_FORMAT,
        "tasks": entries,
        "photos": photo_manifest(with_photos) if with_photos else [],
        "note": "every picture is rendered here with Pillow (tasks/visual.py); the photos are "
        "files that installed packages ship, read in place",
    }


def grpo_phase_config(section: dict, tasks: dict, out: Path, price: float | None) -> GRPOConfig:
    """The GRPO phase's settings: the section's "grpo" part over GRPO_DEFAULTS; the tasks default
    to the stage's (difficulty ramping from the lowest to the highest), the longest answer to the
    stage's max_new_tokens."""
    fields = {
        **GRPO_DEFAULTS,
        "tasks": [f"{name}:{min(d)}-{max(d)}" for name, d in tasks.items()],
        "max_new_tokens": section.get("max_new_tokens", 64),
        **dict(section["grpo"]),
        "out_dir": str(out / "grpo"),
    }
    if price is not None:
        fields.setdefault("price_per_hour", price)
    return GRPOConfig(**fields)


def text_eval_settings(section: dict) -> dict:
    """The section's "text_eval" part over TEXT_EVAL_DEFAULTS; an unknown key or task is an error
    before any training."""
    given = dict(section.get("text_eval") or {})
    unknown = sorted(set(given) - set(TEXT_EVAL_DEFAULTS))
    if unknown:
        raise ValueError(
            f"vision.text_eval: unknown key(s) {unknown}; known: {sorted(TEXT_EVAL_DEFAULTS)}"
        )
    settings = {**TEXT_EVAL_DEFAULTS, **given}
    bad = sorted(set(settings["tasks"] or {}) - set(TASKS))
    if bad:
        raise ValueError(
            f"vision.text_eval.tasks: unknown text task(s) {bad}; known: {sorted(TASKS)}"
        )
    return settings


def text_mix_settings(
    section: dict, preset: dict | None, run: Path | None = None
) -> tuple[float, dict]:
    """(text_share, the text SFT data settings of joint SFT's text-only conversations): the "sft"
    data settings of the preset, else of the run's own preset (runs/NAME/preset.json: what its text
    SFT used), train/sft.py DATA_DEFAULTS where neither has them, the section's "text_mix" over
    them; an unknown key or a share outside [0, 1) is an error before training."""
    share = section.get("text_share", 0.0)
    if not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise ValueError(
            f"vision.text_share: a share of joint SFT's conversations in [0, 1), got {share!r}"
        )
    given = dict(section.get("text_mix") or {})
    unknown = sorted(set(given) - set(DATA_DEFAULTS))
    if unknown:
        raise ValueError(
            f"vision.text_mix: unknown key(s) {unknown}; known: {sorted(DATA_DEFAULTS)}"
        )
    sft = (preset or {}).get("sft")
    run_preset = Path(run) / "preset.json" if run is not None else None
    if sft is None and run_preset is not None and run_preset.is_file():
        sft = json.loads(run_preset.read_text("utf-8")).get("sft")
    data, _ = split_section(dict(sft or {}))
    return float(share), {**data, **given}


def _text_corpus(given, run: Path, source: Path) -> Path | None:
    """Where the held-out text is: the section's corpus, else the run's (runs/NAME/corpus), else
    one beside the starting checkpoint's run; None: no bits per byte (nothing is built here)."""
    if given:
        path = Path(given)
        if not (path / "val.jsonl").is_file():
            raise FileNotFoundError(f"text_eval.corpus={given}: no val.jsonl there")
        return path
    for parent in [run, *list(Path(source).resolve().parents)[:3]]:
        if (parent / "corpus" / "val.jsonl").is_file():
            return parent / "corpus"
    return None


def text_figures(lm, tok, texts: dict[str, list[str]], settings: dict) -> dict:
    """The language model alone, as a text model: bits per byte per language, and greedy pass@1 of
    held-out text-task problems with each problem's outcome (the problems that fit the context)."""
    bpb = text_bpb(lm, tok, texts)
    lm.eval()
    engine = Engine(lm, None, max_batch_size=64, max_num_batched_tokens=2048, decode="eager")
    tasks = {}
    for name, difficulties in (settings.get("tasks") or {}).items():
        task, problems, _ = task_problems(
            name, difficulties, settings["n_problems"], settings["langs"]
        )
        completions, fits = generate_completions(
            engine, tok, problems, max_new_tokens=settings["max_new_tokens"]
        )
        kept = [(p, c[0]) for p, c, ok in zip(problems, completions, fits) if ok]
        rewards = task.grade_many([p for p, _ in kept], [c for _, c in kept], think_prefilled=True)
        correct = sum(r.correct for r in rewards)
        lo, hi = wilson_interval(correct, len(kept))
        tasks[name] = {
            "difficulties": list(difficulties),
            "problems": len(kept),
            "correct": correct,
            "accuracy": round(correct / max(1, len(kept)), 4),
            "wilson95": [round(lo, 4), round(hi, 4)],
            "keys": [(p.key, p.lang) for p, _ in kept],
            "outcomes": [bool(r.correct) for r in rewards],
        }
    return {"bpb": bpb, "tasks": tasks}


def text_bpb(lm, tok, texts: dict[str, list[str]]) -> dict:
    """Bits per byte of the language model on each language's held-out text."""
    return {lang: round(bits_per_byte(lm, tok, t)["bpb"], 4) for lang, t in texts.items()}


def _figures(result: dict) -> dict:
    """An evaluation's figures without its pictures and per-problem outcomes (those go to
    outcomes.jsonl)."""
    return {k: v for k, v in result.items() if k not in ("samples", "outcomes", "keys")}


def _paired(before: list[bool], after: list[bool]) -> dict:
    d = paired_difference(before, after)
    return {
        "gain": round(d["gain"], 4),
        "interval95": [round(x, 4) for x in d["interval95"]],
        "gained": d["gained"],
        "lost": d["lost"],
        "mcnemar_p": round(d["mcnemar_p"], 4),
    }


def _text_summary(
    before: dict, after: dict, corpus: Path | None, settings: dict, bpb_sft: dict | None = None
) -> dict:
    tasks = {}
    for name, b in before["tasks"].items():
        a = after["tasks"][name]
        tasks[name] = {
            "before": _figures(b),
            "after": _figures(a),
            "change": _paired(b["outcomes"], a["outcomes"]) if b["problems"] else None,
        }
    return {
        "bpb_before": before["bpb"],
        **({"bpb_sft": bpb_sft} if bpb_sft is not None else {}),
        "bpb_after": after["bpb"],
        "bpb_source": str(corpus) if corpus else None,
        "bpb_bytes": settings["bpb_bytes"] if corpus else 0,
        "tasks": tasks,
    }


def _grpo_summary(result: dict, path: Path) -> dict:
    rows = [
        json.loads(line)
        for line in (path / "metrics.jsonl").read_text("utf-8").splitlines()
        if line.strip()
    ]
    rewards = [r["reward"] for r in rows if "reward" in r]
    return {
        **_phase_summary(result),
        "reward_first": rewards[0] if rewards else None,
        "reward": rewards[-1] if rewards else None,
        "zero_var_frac": _mean(r["zero_var_frac"] for r in rows if "zero_var_frac" in r),
        "reward_plot": str(path / REWARD_PLOT) if (path / REWARD_PLOT).is_file() else None,
    }


def _write_outcomes(path: Path, held_out, before, sft, grpo, text_before, text_after) -> None:
    """One JSON row per held-out problem and evaluation point: the pairs behind every interval."""
    rows = []
    for name, problems in held_out.items():
        for i, p in enumerate(problems):
            row = {
                "kind": "visual",
                "task": name,
                "key": p.key,
                "lang": p.lang,
                "before": before[name]["outcomes"][i],
                "sft": sft[name]["outcomes"][i],
            }
            if grpo is not None:
                row["grpo"] = grpo[name]["outcomes"][i]
            rows.append(row)
    for name, b in text_before["tasks"].items():
        a = text_after["tasks"][name]
        for (key, lang), x, y in zip(b["keys"], b["outcomes"], a["outcomes"]):
            rows.append(
                {"kind": "text", "task": name, "key": key, "lang": lang, "before": x, "after": y}
            )
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


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
