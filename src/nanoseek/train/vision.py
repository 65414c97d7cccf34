"""Training a vision-language model with the project's Trainer: image conversations from the
rendered visual tasks, a loader that yields (inputs, targets, images), and the Trainer subclass that
passes the images to the model and saves the vision tower beside the language model.

    examples = visual_examples(tok, vcfg, {"visual_colour": [2]}, per_task=200, renders=2)
    loader = ImageConversationLoader(examples, batch_size=8, seq_len=256, pad_id=tok.pad_id)
    VisionTrainer(vlm, TrainConfig(...), loader, tokenizer=tok).fit()

A conversation is a task problem with its worked solution (data/chat_tokens.py problem_messages:
the user turn starts with `<image>\\n`), its placeholder expanded to the image's token count; only
the assistant's tokens are targets. Rows of a batch are padded to the longest (targets ignored).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from nanoseek.checkpoint import VISION_FILE, load_weights_into, save_vision_language_model
from nanoseek.config import VisionConfig
from nanoseek.data.chat_tokens import problem_messages
from nanoseek.data.images import encode_image_conversation, merge_inputs
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.model.vision import ImageInput
from nanoseek.tasks.visual import get_visual_task
from nanoseek.train.trainer import Trainer

Example = tuple[list[int], list[bool], ImageInput]


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
    """Batches of image conversations, reshuffled each epoch, resumable: yields (inputs [B, T],
    targets [B, T], ImageInput of the batch's images in row order). T is the batch's longest
    conversation minus one; conversations longer than seq_len + 1 tokens are dropped (counted)."""

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seq_len: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
    ):
        self.examples = [e for e in examples if len(e[0]) <= seq_len + 1]
        self.dropped = len(examples) - len(self.examples)
        if not self.examples:
            raise ValueError(f"no image conversation fits seq_len={seq_len}")
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.epochs = epochs
        self.epoch = 0
        self.pos = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.pos = state["pos"]

    def _order(self) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, ImageInput]:
        if self.pos >= len(self.examples):
            self.epoch += 1
            self.pos = 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        order = self._order()
        rows = [self.examples[i] for i in order[self.pos : self.pos + self.batch_size]]
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
        return x, y, merge_inputs([im for _, _, im in rows])


class VisionTrainer(Trainer):
    """Trainer.fit on a VisionLanguageModel: the batches carry images, checkpoints carry the tower
    (vision.safetensors) beside the language model. Which parts train is set beforehand
    (`vlm.freeze`); frozen parameters get no optimizer state."""

    progress_name = "vision"
    supports_fsdp = False

    def unpack(self, batch):
        inputs, targets, images = batch
        images = ImageInput(images.pixel_values.to(self.device), images.grids)
        return inputs.to(self.device), targets.to(self.device), {"images": images}

    def save_weights(self, path: Path) -> None:
        save_vision_language_model(self.host, path, tokenizer=self.tokenizer)

    def load_weights(self, path: Path) -> None:
        load_weights_into(self.host.language_model, path)
        self.host.vision.load_state_dict(load_file(str(Path(path) / VISION_FILE)))
