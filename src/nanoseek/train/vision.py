"""Training a vision-language model with the project's trainers: image conversations from the
rendered visual tasks, a loader that yields (inputs, targets, images), the Trainer subclass that
passes the images to the model and saves the vision tower beside the language model, and GRPO on
the visual tasks (the text GRPO trainer with three hooks of its own).

    examples = visual_examples(tok, vcfg, {"visual_colour": [2]}, per_task=200, renders=2)
    loader = ImageConversationLoader(examples, batch_size=8, seq_len=256, pad_id=tok.pad_id)
    VisionTrainer(vlm, TrainConfig(...), loader, tokenizer=tok).fit()
    VisualGRPOTrainer(vlm, GRPOConfig(tasks=["visual_colour:1-2"], ...), tok).fit()

A conversation is a task problem with its worked solution (data/chat_tokens.py problem_messages:
the user turn starts with `<image>\\n`), its placeholder expanded to the image's token count; only
the assistant's tokens are targets. Rows of a batch are padded to the longest (targets ignored).
Joint SFT may mix in text-only conversations (`text_examples`, the text SFT's kinds; a share of each
epoch, `text_share`) so that the language model keeps its text while it learns images: a text row
simply has no image.

GRPO: each drawn problem is rendered (a fresh picture for every draw, seeded by the prompt stream's
position, so a resumed run renders what the uninterrupted one did), its `<image>` expanded, and the
G completions of its group come from one engine request with the image in the prompt. The update's
forward is the SFT forward: the same tiles through the tower, the features written over the
`<image>` positions (VisionLanguageModel.embed), the log-probabilities of the completion tokens
only. The rewards are each visual task's own grader. Which parts train is set beforehand, as for
SFT (`vlm.freeze`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from nanoseek.checkpoint import VISION_FILE, load_weights_into, save_vision_language_model
from nanoseek.config import VisionConfig
from nanoseek.data.chat_tokens import problem_messages, prompt_ids, tokenize_conversations
from nanoseek.data.images import encode_image_conversation, image_prompt_ids, merge_inputs
from nanoseek.engine import Engine, SamplingParams
from nanoseek.eval.visual import evaluate_visual_task
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.model.vision import ImageInput, VisionLanguageModel
from nanoseek.tasks.visual import VISUAL_TASKS, get_visual_task
from nanoseek.train import dist
from nanoseek.train.grpo_trainer import GRPOConfig, GRPOTrainer, trim_columns
from nanoseek.train.rollout import Grader, Sample, collate_images
from nanoseek.train.trainer import Trainer

Example = tuple[list[int], list[bool], ImageInput | None]  # None: a text-only conversation


def visual_problems(
    tasks: Mapping[str, Sequence[int]],
    per_task: int,
    *,
    split: str = "train",
    seed: int = 0,
    langs: Sequence[str] = ("en", "zh"),
) -> list:
    """`per_task` problems of each visual task (name -> difficulties), spread over difficulties,
    with distinct keys within a difficulty (as far as its space allows): the languages alternate
    over one list of problems (the task's "zh" set is its "en" set translated, so drawing each
    language separately would repeat every key). The split is the task's (by problem key)."""
    out = []
    for name, difficulties in tasks.items():
        task = get_visual_task(name)
        for k, d in enumerate(difficulties):
            n = per_task // len(difficulties) + (k < per_task % len(difficulties))
            if not n:
                continue
            by_lang = [
                task.generate(n, seed=seed, difficulty=d, split=split, lang=lang) for lang in langs
            ]
            out += [by_lang[i % len(langs)][i] for i in range(n)]
    return out


def visual_examples(
    tok,
    vcfg: VisionConfig,
    problems: Sequence,
    *,
    renders: int = 1,
    seed: int = 0,
    size: tuple[int, int] | None = None,
) -> list[Example]:
    """Each problem drawn `renders` times (different render seeds: positions, sizes, ink, never
    the answer) as a training conversation."""
    out = []
    for i, p in enumerate(problems):
        task = get_visual_task(p.task)
        for r in range(renders):
            img = task.render(p, seed=seed + 1000 * r + i, size=size)
            out.append(encode_image_conversation(tok, problem_messages(p), [img], vcfg))
    return out


class ImageConversationLoader:
    """Batches of image conversations, optionally mixed with text-only ones, reshuffled each epoch,
    resumable: yields (inputs [B, T], targets [B, T], ImageInput of the batch's images in row order,
    or None when no row has one). T is the batch's longest conversation minus one; conversations
    longer than seq_len + 1 tokens are dropped (counted in `dropped`).

    text_examples / text_share: an epoch holds every image conversation plus
    round(share / (1 - share) * images) text-only conversations (so text is `text_share` of the
    epoch's conversations), taken in turn from a fixed seeded permutation of the text pool: each
    epoch continues where the previous one stopped, wrapping round when the pool runs out. A text
    example is (ids, trainable, None): no image, its targets the assistant's tokens. The state is
    (epoch, pos) as without text; the epoch's order is a function of the seed and the epoch."""

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seq_len: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        text_examples: Sequence[Example] = (),
        text_share: float = 0.0,
    ):
        if not 0 <= text_share < 1:
            raise ValueError(
                f"text_share is a share of the conversations in [0, 1), got {text_share!r}"
            )
        self.examples = [e for e in examples if len(e[0]) <= seq_len + 1]
        self.text_examples = [e for e in text_examples if len(e[0]) <= seq_len + 1]
        self.dropped = len(examples) - len(self.examples)
        self.text_dropped = len(text_examples) - len(self.text_examples)
        if not self.examples:
            raise ValueError(f"no image conversation fits seq_len={seq_len}")
        if text_share and not self.text_examples:
            raise ValueError(
                f"text_share={text_share} but no text conversation fits seq_len={seq_len}"
            )
        self.text_per_epoch = (
            round(text_share / (1 - text_share) * len(self.examples)) if text_share else 0
        )
        self.text_pool = list(range(len(self.text_examples)))
        random.Random(seed * 1_000_003 + 999_983).shuffle(self.text_pool)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.epochs = epochs
        self.epoch = 0
        self.pos = 0

    @property
    def epoch_size(self) -> int:
        """Conversations per epoch: every image conversation plus the epoch's text ones."""
        return len(self.examples) + self.text_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.pos = state["pos"]

    def epoch_examples(self, epoch: int) -> list[Example]:
        """The conversations of one epoch in the order it yields them."""
        n_text = self.text_per_epoch
        start = epoch * n_text
        text = [
            self.text_examples[self.text_pool[(start + k) % len(self.text_pool)]]
            for k in range(n_text)
        ]
        rows = [*self.examples, *text]
        order = list(range(len(rows)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return [rows[i] for i in order]

    def target_tokens(self, epoch: int = 0) -> tuple[int, int]:
        """(image conversations', text conversations') target tokens in one epoch: text's share of
        the loss, larger than its share of the conversations when its answers are longer."""
        rows = self.epoch_examples(epoch)
        image = sum(sum(m[1:]) for _, m, im in rows if im is not None)
        text = sum(sum(m[1:]) for _, m, im in rows if im is None)
        return image, text

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, ImageInput | None]:
        if self.pos >= self.epoch_size:
            self.epoch += 1
            self.pos = 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        rows = self.epoch_examples(self.epoch)[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        T = max(len(ids) for ids, _, _ in rows) - 1
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, trainable, _) in enumerate(rows):
            n = len(ids) - 1
            x[r, :n] = torch.tensor(ids[:-1])
            y[r, :n] = torch.tensor(
                [t if m else IGNORE_INDEX for t, m in zip(ids[1:], trainable[1:])]
            )
        images = [im for _, _, im in rows if im is not None]
        return x, y, merge_inputs(images) if images else None


def text_examples(tok, conversations: Sequence) -> list[Example]:
    """Text-only conversations (data/chat_tokens.py Messages) as loader examples: no image, the
    assistant's tokens trainable."""
    return [(ids, mask, None) for ids, mask in tokenize_conversations(tok, conversations)]


class TowerCheckpoints:
    """For a Trainer on a VisionLanguageModel: checkpoints carry the tower (vision.safetensors)
    beside the language model, and a resume loads both."""

    def save_weights(self, path: Path) -> None:
        save_vision_language_model(self.host, path, tokenizer=self.tokenizer)

    def load_weights(self, path: Path) -> None:
        load_weights_into(self.host.language_model, path)
        self.host.vision.load_state_dict(load_file(str(Path(path) / VISION_FILE)))


class VisionTrainer(TowerCheckpoints, Trainer):
    """Trainer.fit on a VisionLanguageModel: the batches carry images, checkpoints carry the tower
    (vision.safetensors) beside the language model. Which parts train is set beforehand
    (`vlm.freeze`); frozen parameters get no optimizer state."""

    progress_name = "vision"
    supports_fsdp = False

    def unpack(self, batch):
        inputs, targets, images = batch
        if images is not None:  # None: a batch of text-only conversations
            images = ImageInput(images.pixel_values.to(self.device), images.grids)
        return inputs.to(self.device), targets.to(self.device), {"images": images}


class NoToken:
    """A logits processor that never lets `token` be drawn."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, output_ids, logits: torch.Tensor) -> torch.Tensor:
        logits[self.token] = float("-inf")
        return logits


RENDER_SEED = 1_000_000  # GRPO's pictures: seed RENDER_SEED + the draw's position in the stream


class VisualGRPOTrainer(TowerCheckpoints, GRPOTrainer):
    """GRPOTrainer on a VisionLanguageModel and the visual tasks (text tasks may join the mix: their
    prompts simply carry no image). Rollouts, advantages, the clipped loss, dynamic sampling, the
    KL reference, checkpoints and exact resume are GRPOTrainer's; this class renders the pictures
    (`encode_prompts`), gives the update's forward each row's images (`micro_batch`) and measures
    held-out visual accuracy (`evaluate`, eval/visual.py, as the vision stage does). Which parts of
    the model train is set beforehand (`vlm.freeze`)."""

    progress_name = "vision-grpo"
    takes_images = True

    def __init__(
        self,
        model: VisionLanguageModel,
        cfg: GRPOConfig,
        tokenizer,
        grader: Grader | None = None,
        dist_info: dist.DistInfo | None = None,
        size: tuple[int, int] | None = None,
    ):
        """size: the rendered pictures' (w, h); None: each task's own."""
        if not isinstance(model, VisionLanguageModel):
            raise ValueError("VisualGRPOTrainer trains a VisionLanguageModel")
        if cfg.precision == "auto":  # its timing probe runs random ids, which may hold <image>
            cfg.precision = "bf16" if torch.cuda.is_available() else "fp32"
        self.size = tuple(size) if size else None
        self.vcfg = model.vision.config
        super().__init__(model, cfg, tokenizer, grader=grader, dist_info=dist_info)
        self.image_id = model.image_token_id
        self._held_out: dict | None = None

    def encode_prompts(self, problems, first_draw: int) -> list[tuple[list[int], ImageInput]]:
        """A visual problem -> its picture, rendered afresh for this draw, and the prompt with the
        `<image>` expanded; a text problem -> its text prompt, no image."""
        out = []
        for i, p in enumerate(problems):
            if p.task not in VISUAL_TASKS:
                out.append((prompt_ids(self.tokenizer, p.prompt), None))
                continue
            img = self.loader.tasks[p.task].render(
                p, seed=RENDER_SEED + first_draw + i, size=self.size
            )
            out.append(image_prompt_ids(self.tokenizer, p.prompt, [img], self.vcfg))
        return out

    def _sampling(self, engine: Engine, prompts, seed: int) -> SamplingParams:
        """GRPOTrainer's sampling, never drawing `<image>`: a sampled placeholder has no picture
        behind it (the engine embeds it as a token), while the update's forward writes image
        features over every `<image>` position and would find one position too many."""
        params = super()._sampling(engine, prompts, seed)
        no_image = NoToken(self.image_id)
        return dataclasses.replace(params, logits_processors=(*params.logits_processors, no_image))

    def micro_batch(self, inputs, targets, samples: list[Sample]):
        """The rows' images go with them; the trim keeps every image position (they precede the
        completions, but a micro-batch with nothing to score would otherwise be cut to a column)."""
        image_cols = (inputs == self.image_id).any(0).nonzero()
        x, y = trim_columns(inputs, targets, int(image_cols.max()) + 1 if len(image_cols) else 1)
        images = collate_images(samples)
        if images is None:
            return x, y, {}
        return x, y, {"images": ImageInput(images.pixel_values.to(self.device), images.grids)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out greedy accuracy on the visual tasks' test split, as the vision stage measures
        it (eval.visual.evaluate_visual_task): eval_problems per task and language, at each task's
        highest difficulty, distinct keys. Text tasks in the mix are not evaluated here. ->
        val_accuracy, val_problems, val_<task>/accuracy."""
        if not self.info.is_main:
            return {}
        cfg = self.cfg
        if self._held_out is None:
            self._held_out = {
                s.name: visual_problems(
                    {s.name: [s.max_difficulty or s.difficulty]},
                    cfg.eval_problems * len(cfg.langs),
                    split="test",
                    seed=1,
                    langs=cfg.langs,
                )
                for s in self.specs
                if s.name in VISUAL_TASKS
            }
        engine = Engine(
            self.model, self.tokenizer, max_batch_size=64, max_model_len=cfg.seq_len, decode="eager"
        )
        was_training = self.model.training
        self.model.eval()
        budget = cfg.eval_max_new_tokens or cfg.max_new_tokens
        results = {
            name: evaluate_visual_task(
                engine, self.tokenizer, probs, size=self.size, max_new_tokens=budget
            )
            for name, probs in self._held_out.items()
        }
        self.model.train(was_training)
        problems = sum(r["problems"] for r in results.values())
        correct = sum(r["correct"] for r in results.values())
        figures = {
            "val_accuracy": round(correct / max(1, problems), 4),
            "val_problems": problems,
            **{f"val_{name}/accuracy": r["accuracy"] for name, r in results.items()},
        }
        self.last_eval = {"step": self.step, **figures}
        tqdm.write(
            f"[vision-grpo] step {self.step}: "
            f"held-out visual accuracy {figures['val_accuracy']:.3f}"
        )
        return figures
