"""A loss of the tower's own: glyph pretraining before the vision stage's alignment.

The reading tasks (visual_equation, visual_word) draw one line of text, read left to right. The
tower's encoder (the ViT) is trained alone to transcribe it, by CTC over the columns of the image's
local view:

    picture ──► tiles ──► the ViT's patch features [g*g, C] per local tile
            ──► the local tiles as one [th*g, tw*g, C] canvas ──► mean over each column
            ──► Linear(C, 1 + |characters|) ──► CTC against the transcription (spaces left out)

The adaptor is left out on purpose: trained by this loss its outputs grew to about 35 times the
norm of the language model's token embeddings (measured), and with such a tower the model did not
come to read (docs/multimodal.md); left fresh, alignment fits it as it always did.

The pictures are rendered afresh for every step from the tasks' train split (render seeds of their
own, never the held-out problems' nor the stage's training renders), the characters are those of
the tasks' transcriptions. The head exists only here: the stage keeps the tower, drops the head, and
the checkpoint is the one it always was. `greedy_read` (best path: the most likely label per column,
repeats merged, blanks dropped) measures whether the tower alone reads held-out pictures.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from nanoseek.data.images import image_input, merge_inputs
from nanoseek.eval.stats import wilson_interval
from nanoseek.eval.visual import EVAL_RENDER_SEED
from nanoseek.io import atomic_write_text
from nanoseek.model.vision import VisionTower
from nanoseek.tasks.visual import get_visual_task

READING_TASKS = ("visual_equation", "visual_word")
RENDER_SEED = 3_000_000  # glyph pictures: seed RENDER_SEED + the draw's position in the stream


def transcription(problem) -> str:
    """What a reader writes down first: `8 + 3`, `r i n g` (the worked solution's first line)."""
    if problem.task not in READING_TASKS:
        raise ValueError(f"{problem.task}: no transcription (reading tasks: {READING_TASKS})")
    return problem.solution.reasoning.split("\n", 1)[0]


def glyphs(problem) -> str:
    """The CTC target: the transcription's characters, spaces left out."""
    return transcription(problem).replace(" ", "")


class GlyphHead(nn.Module):
    """Column-pooled encoder features -> per-column logits over blank (0) + the characters."""

    def __init__(self, width: int, charset: Sequence[str]):
        super().__init__()
        self.charset = list(charset)
        self.index = {c: i + 1 for i, c in enumerate(self.charset)}
        self.proj = nn.Linear(width, 1 + len(self.charset))

    def columns(self, tower: VisionTower, images) -> list[torch.Tensor]:
        """Each image's local view, column by column: [tw*g, C] per image (g patches a side)."""
        weight = tower.vision_model.embeddings.patch_embedding.weight
        # the global thumbnails are not read here: only the local tiles go through the encoder
        keep = []
        start = 0
        for tw, th in images.grids:
            keep += range(start + 1, start + 1 + tw * th)
            start += 1 + tw * th
        feats = tower.vision_model(images.pixel_values[keep].to(weight.device, weight.dtype))
        g = tower.config.patch_grid
        out = []
        start = 0
        for tw, th in images.grids:
            local = feats[start : start + tw * th]
            start += tw * th
            C = local.shape[-1]
            canvas = local.view(th, tw, g, g, C).permute(0, 2, 1, 3, 4).reshape(th * g, tw * g, C)
            out.append(canvas.mean(dim=0))
        return out

    def forward(self, tower: VisionTower, images) -> list[torch.Tensor]:
        """-> per image, log-probabilities [columns, 1 + |characters|]."""
        return [F.log_softmax(self.proj(c), dim=-1) for c in self.columns(tower, images)]

    def loss(self, tower: VisionTower, images, texts: Sequence[str]) -> torch.Tensor:
        """Mean CTC loss (per target character) of a batch; texts are glyph strings."""
        logp = self(tower, images)
        T = max(x.shape[0] for x in logp)
        device = logp[0].device
        padded = torch.zeros(T, len(logp), logp[0].shape[-1], dtype=logp[0].dtype, device=device)
        for i, x in enumerate(logp):
            padded[: x.shape[0], i] = x
        targets = torch.tensor([self.index[c] for t in texts for c in t], device=device)
        return F.ctc_loss(
            padded,
            targets,
            input_lengths=torch.tensor([x.shape[0] for x in logp]),
            target_lengths=torch.tensor([len(t) for t in texts]),
            blank=0,
            reduction="mean",
            zero_infinity=True,
        )

    @torch.no_grad()
    def read(self, tower: VisionTower, images) -> list[str]:
        """Best-path decoding: the most likely label per column, repeats merged, blanks dropped."""
        out = []
        for x in self(tower, images):
            best = x.argmax(-1).tolist()
            chars = [b for i, b in enumerate(best) if b and (i == 0 or b != best[i - 1])]
            out.append("".join(self.charset[b - 1] for b in chars))
        return out


def charset_of(problems: Sequence) -> list[str]:
    return sorted({c for p in problems for c in glyphs(p)})


def render_batch(problems: Sequence, seeds: Sequence[int], vcfg, size=None):
    """Pictures of the problems (one render seed each) -> (ImageInput, glyph strings)."""
    # each picture tiled on its own, as in a one-image prompt (image_input of several pictures at
    # once would tile them as one prompt's: three or more get a single 1 x 1 local tile each)
    inputs = [
        image_input([get_visual_task(p.task).render(p, seed=s, size=size)], vcfg)
        for p, s in zip(problems, seeds)
    ]
    return merge_inputs(inputs), [glyphs(p) for p in problems]


def greedy_read(
    tower, head, problems: Sequence, seeds: Sequence[int], vcfg, size=None, batch: int = 64
):
    """(exact reads, the reads) of the problems' pictures rendered with the given seeds."""
    reads = []
    for i in range(0, len(problems), batch):
        images, _ = render_batch(problems[i : i + batch], seeds[i : i + batch], vcfg, size)
        reads += head.read(tower, images)
    exact = sum(r == glyphs(p) for r, p in zip(reads, problems))
    return exact, reads


def pretrain_glyphs(
    tower: VisionTower,
    problems: Sequence,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup_steps: int = 20,
    seed: int = 0,
    log_every: int = 25,
    log=None,
    charset: Sequence[str] | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[GlyphHead, list[dict]]:
    """Train the tower's encoder (the adaptor is not in the loss) and a fresh GlyphHead by CTC on
    fresh renders of the problems (reading tasks' train split); AdamW, linear warm-up then cosine
    to 10%. Returns the head (the caller drops it) and the logged rows {step, loss, wall_s}."""
    problems = [p for p in problems if p.task in READING_TASKS]
    if not problems:
        raise ValueError(f"glyph pretraining needs problems of {READING_TASKS}")
    vcfg = tower.config
    torch.manual_seed(seed)
    weight = tower.vision_model.embeddings.patch_embedding.weight
    head = GlyphHead(vcfg.hidden_size, charset or charset_of(problems)).to(weight.device)
    params = [p for p in tower.vision_model.parameters() if p.requires_grad]
    params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def rate(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    rng = random.Random(seed)
    rows = []
    start = time.perf_counter()
    tower.train()
    bar = tqdm(range(steps), desc="vision glyph", unit="step", mininterval=1.0)
    for step in bar:
        picked = [problems[rng.randrange(len(problems))] for _ in range(batch_size)]
        seeds = [RENDER_SEED + step * batch_size + i for i in range(batch_size)]
        images, texts = render_batch(picked, seeds, vcfg, size)
        for g in opt.param_groups:
            g["lr"] = lr * rate(step)
        loss = head.loss(tower, images, texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            row = {
                "step": step + 1,
                "loss": round(loss.item(), 4),
                "wall_s": round(time.perf_counter() - start, 2),
            }
            rows.append(row)
            bar.set_postfix(loss=row["loss"])
            if log is not None:
                log(row)
    bar.close()
    return head, rows


# ------------------------------------------------------------------ the vision stage's phase
GLYPH_DEFAULTS = {
    "steps": 0,  # 0: no glyph pretraining
    "batch_size": 32,
    "lr": 0.003,
    "warmup_steps": 20,
    "problems_per_task": None,  # default: the section's problems_per_task
    "tasks": None,  # {reading task: [difficulties]}; default: the section's reading tasks
    "seed": 0,
}
WEIGHTS = "vision.safetensors"  # the tower after the phase (no head)
SUMMARY = "summary.json"


def glyph_settings(section: Mapping) -> dict | None:
    """The section's "glyph" part over GLYPH_DEFAULTS, checked before any training; None when the
    phase does not run (no part, or steps 0)."""
    given = dict(section.get("glyph") or {})
    unknown = sorted(set(given) - set(GLYPH_DEFAULTS))
    if unknown:
        raise ValueError(f"vision.glyph: unknown key(s) {unknown}; known: {sorted(GLYPH_DEFAULTS)}")
    settings = {**GLYPH_DEFAULTS, **given}
    steps = settings["steps"]
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"vision.glyph.steps: a number of steps >= 0, got {steps!r}")
    if not steps:
        return None
    if settings["tasks"] is not None:
        bad = sorted(set(settings["tasks"]) - set(READING_TASKS))
        if bad or not settings["tasks"]:
            raise ValueError(
                f"vision.glyph.tasks: reading tasks ({list(READING_TASKS)}) with their "
                f"difficulties, got {settings['tasks']!r}"
            )
        return settings
    tasks = section.get("tasks") or {}
    if not any(name in READING_TASKS for name in tasks):
        raise ValueError(
            f"vision.glyph: the phase reads the pictures of {list(READING_TASKS)}; "
            f"the section's tasks are {sorted(tasks)}"
        )
    return settings


def glyph_phase(
    tower: VisionTower,
    section: Mapping,
    settings: dict,
    held_out: Mapping[str, Sequence],
    out: Path,
    size: tuple[int, int] | None = None,
    render_seed: int = EVAL_RENDER_SEED,
) -> dict:
    """The vision stage's glyph pretraining: the tower's encoder trained by CTC on fresh
    renders of the section's reading tasks (train split), then best-path reads of the held-out
    problems' pictures (the stage's own evaluation renders). The tower's weights go to
    out/vision.safetensors and the figures to out/summary.json; with both there (an interrupted
    stage run again), the phase loads them instead of training. The head is dropped."""
    from nanoseek.train.vision import visual_problems

    if (out / WEIGHTS).is_file() and (out / SUMMARY).is_file():
        tower.load_state_dict(load_file(str(out / WEIGHTS)))
        return json.loads((out / SUMMARY).read_text("utf-8"))
    reading = settings["tasks"] or {k: v for k, v in section["tasks"].items() if k in READING_TASKS}
    reading = {k: list(v) for k, v in reading.items()}
    per_task = settings["problems_per_task"] or section.get("problems_per_task", 200)
    train = visual_problems(reading, per_task, split="train")
    tests = {name: list(probs) for name, probs in held_out.items() if name in reading}
    # the head's characters: every transcription's, held-out ones too (a character never trained
    # is simply never written)
    charset = charset_of(train + [p for probs in tests.values() for p in probs])
    was_training = tower.training
    head, rows = pretrain_glyphs(
        tower,
        train,
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        warmup_steps=settings["warmup_steps"],
        seed=settings["seed"],
        charset=charset,
        size=size,
    )
    tower.eval()
    read = {}
    for name, probs in tests.items():
        seeds = [render_seed + i for i in range(len(probs))]
        exact, _ = greedy_read(tower, head, probs, seeds, tower.config, size)
        lo, hi = wilson_interval(exact, len(probs))
        read[name] = {
            "problems": len(probs),
            "read": exact,
            "accuracy": round(exact / max(1, len(probs)), 4),
            "wilson95": [round(lo, 4), round(hi, 4)],
        }
    tower.train(was_training)
    summary = {
        "steps": settings["steps"],
        "tasks": reading,
        "characters": len(charset),
        "loss_first": rows[0]["loss"] if rows else None,
        "loss": rows[-1]["loss"] if rows else None,
        "wall_s": rows[-1]["wall_s"] if rows else 0.0,
        "read": read,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(out / WEIGHTS))
    atomic_write_text(out / SUMMARY, json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    return summary
