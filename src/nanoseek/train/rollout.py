"""Rollouts for GRPO: task problems -> chat prompts -> G completions each
from the Engine -> graded samples.

    stream = PromptStream([TaskSpec("arithmetic", difficulty=1)], langs=("en", "zh"), seed=0)
    problems = stream.next(8, progress=0.0)                  # deterministic, resumable (state_dict)
    params = SamplingParams(n=8, max_tokens=96, seed=1)
    samples = generate_groups(engine, tok, problems, graders, params)
    inputs, targets = collate(samples, tok.pad_id)            # for the training model's forward

Prompts are rendered by data.chat_tokens.prompt_ids (as SFT and evaluation render them), with the
chat template's generation prompt, which ends in "<think>\\n": completions start inside the
reasoning and are graded with think_prefilled=True. The G completions of a prompt come from one
request with n=G, so the prompt is prefilled once and its cache blocks are shared by the group.
Held-out accuracy is eval/'s (eval.quality.task_accuracy).
Visual tasks (tasks/visual.py) take part too: their problems need a picture, so the caller encodes
the prompts itself (`generate_groups(..., prompts=[(ids, ImageInput), ...])`, with each `<image>`
expanded, data/images.py image_prompt_ids); every sample of a group then carries its prompt's
images, and `collate_images` gives a micro-batch's images in row order for the policy's forward.
Completion text is decoded from the token ids with special tokens kept (the engine's own text drops
them, and with them the <think>/<answer> tags that the graders read).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.data.chat_tokens import prompt_ids
from nanoseek.data.images import merge_inputs
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import IGNORE_INDEX
from nanoseek.model.vision import ImageInput
from nanoseek.tasks import TASKS, Code, Problem, Reward, Task, get_task
from nanoseek.tasks.visual import VISUAL_TASKS, get_visual_task

Grader = Callable[[list[Problem], list[str]], list[Reward]]


@dataclass
class TaskSpec:
    """One task of the training mix. The difficulty ramps linearly from `difficulty` to
    `max_difficulty` (if set) over the run: a curriculum that keeps the problems near the edge of
    what the model can do."""

    name: str
    weight: float = 1.0
    difficulty: int = 1
    max_difficulty: int | None = None
    # for the task's constructor (accuracy_weight, partial_credit...)
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in TASKS and self.name not in VISUAL_TASKS:
            raise ValueError(
                f"unknown task {self.name!r}; known: {sorted(TASKS)}, "
                f"visual (a vision-language model): {sorted(VISUAL_TASKS)}"
            )
        if (
            self.weight <= 0
            or self.difficulty < 1
            or (self.max_difficulty or self.difficulty) < self.difficulty
        ):
            raise ValueError(
                f"task {self.name!r}: need weight > 0 and 1 <= difficulty <= max_difficulty"
            )

    def difficulty_at(self, progress: float) -> int:
        top = self.max_difficulty or self.difficulty
        return min(top, self.difficulty + int(progress * (top - self.difficulty + 1)))

    @classmethod
    def parse(cls, spec: str | dict | TaskSpec) -> TaskSpec:
        """A TaskSpec from a dict, or from
        "name[:difficulty[-max]][@weight]", e.g. "arithmetic:1-2@3"."""
        if isinstance(spec, TaskSpec):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        name, _, weight = spec.partition("@")
        name, _, level = name.partition(":")
        low, _, high = level.partition("-")
        try:
            numbers = float(weight or 1), int(low or 1), int(high) if high else None
        except ValueError:
            raise ValueError(
                f"task spec {spec!r}: expected NAME[:DIFFICULTY[-MAX]][@WEIGHT]"
            ) from None
        return cls(name, *numbers)


def build_tasks(specs: Sequence[TaskSpec]) -> dict[str, Task]:
    return {
        s.name: (get_visual_task if s.name in VISUAL_TASKS else get_task)(s.name, **s.kwargs)
        for s in specs
    }


class PromptStream:
    """Training problems drawn from the tasks' train split: the k-th draw depends
    only on (seed, k), so the position (`draws`) is all a checkpoint needs to
    continue the same sequence of problems."""

    def __init__(self, specs: Sequence[TaskSpec], langs: Sequence[str] = ("en",), seed: int = 0):
        if not specs or not langs:
            raise ValueError("a prompt stream needs at least one task and one language")
        self.specs = list(specs)
        self.langs = list(langs)
        self.seed = seed
        self.tasks = build_tasks(self.specs)
        for task in self.tasks.values():
            if isinstance(task, Code):  # RL optimises any hole: refuse the sandbox's fallback mode
                task.sandbox.require_full_isolation()
        self.draws = 0

    def next(self, n: int, progress: float = 0.0) -> list[Problem]:
        """n problems; progress in [0, 1] (the run's completed fraction)
        sets each task's difficulty."""
        out = []
        for _ in range(n):
            rng = random.Random(f"grpo|{self.seed}|{self.draws}")
            self.draws += 1
            spec = rng.choices(self.specs, weights=[s.weight for s in self.specs])[0]
            lang = rng.choice(self.langs)
            problem_seed = rng.randrange(2**31)
            out.append(
                self.tasks[spec.name].generate(
                    1,
                    seed=problem_seed,
                    difficulty=spec.difficulty_at(progress),
                    split="train",
                    lang=lang,
                )[0]
            )
        return out

    def state_dict(self) -> dict:
        return {"draws": self.draws, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.draws = state["draws"]


def task_grader(tasks: dict[str, Task]) -> Grader:
    """Grade each completion with its problem's task (think prefilled, as the prompts are)."""

    def grade(problems: list[Problem], texts: list[str]) -> list[Reward]:
        rewards: list[Reward | None] = [None] * len(problems)
        for name in dict.fromkeys(p.task for p in problems):
            idx = [i for i, p in enumerate(problems) if p.task == name]
            graded = tasks[name].grade_many(
                [problems[i] for i in idx], [texts[i] for i in idx], think_prefilled=True
            )
            for i, r in zip(idx, graded):
                rewards[i] = r
        return rewards

    return grade


@dataclass
class Sample:
    problem: Problem
    prompt_ids: list[int]
    completion_ids: list[int]  # as generated, the final EOS included when the model stopped
    text: str  # the completion decoded with special tokens, EOS removed
    finish_reason: str  # "stop" or "length" (truncated)
    reward: Reward | None = None
    images: ImageInput | None = None  # the prompt's images (visual tasks), shared by the group


@dataclass
class Rollout:
    samples: list[Sample]  # groups of G, contiguous
    generated_tokens: int
    seconds: float


def generate_groups(
    engine: Engine,
    tokenizer,
    problems: list[Problem],
    grader: Grader,
    params: SamplingParams,
    prompts: Sequence[tuple[list[int], ImageInput | None]] | None = None,
) -> Rollout:
    """params.n completions for each problem (seeded per problem from params.seed), graded.
    prompts: each problem's (ids, images or None), already encoded; default: the text prompts."""
    if prompts is None:
        prompts = [(prompt_ids(tokenizer, p.prompt), None) for p in problems]
    if len(prompts) != len(problems):
        raise ValueError(f"{len(prompts)} prompts for {len(problems)} problems")
    ids_of = [ids for ids, _ in prompts]
    images = [im for _, im in prompts]
    base = params.seed if params.seed is not None else random.randrange(2**62)
    per_prompt = [_replace(params, seed=base + i) for i in range(len(problems))]
    start = time.perf_counter()
    if any(im is not None for im in images):
        outputs = engine.generate(ids_of, per_prompt, images=images)
    else:
        outputs = engine.generate(ids_of, per_prompt)
    seconds = time.perf_counter() - start
    eos = tokenizer.eos_id
    samples = []
    for problem, ids, im, out in zip(problems, ids_of, images, outputs):
        for comp in out.outputs:
            body = (
                comp.token_ids[:-1]
                if comp.token_ids and comp.token_ids[-1] == eos
                else comp.token_ids
            )
            samples.append(
                Sample(
                    problem,
                    ids,
                    list(comp.token_ids),
                    tokenizer.decode(body),
                    comp.finish_reason,
                    images=im,
                )
            )
    for s, r in zip(samples, grader([s.problem for s in samples], [s.text for s in samples])):
        s.reward = r
    return Rollout(samples, sum(len(s.completion_ids) for s in samples), seconds)


def _replace(params: SamplingParams, **changes) -> SamplingParams:
    fields = {
        k: getattr(params, k)
        for k in SamplingParams.__dataclass_fields__
        if k not in ("stop_list", "stop_ids")
    }
    return SamplingParams(**{**fields, **changes})


def collate(
    samples: Sequence[Sample], pad_id: int, mask_truncated: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> inputs [N, L] (prompt + completion, right-padded) and targets [N, L]: the next
    token where it is a completion token, IGNORE_INDEX elsewhere (prompt, padding, and
    truncated completions if mask_truncated)."""
    seqs = [s.prompt_ids + s.completion_ids for s in samples]
    length = max(len(q) for q in seqs) - 1
    inputs = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    for i, (s, q) in enumerate(zip(samples, seqs)):
        inputs[i, : len(q) - 1] = torch.tensor(q[:-1])
        if not (mask_truncated and s.finish_reason == "length"):
            p = len(s.prompt_ids)
            targets[i, p - 1 : len(q) - 1] = torch.tensor(s.completion_ids)
    return inputs, targets


def collate_images(samples: Sequence[Sample]) -> ImageInput | None:
    """The images of the samples that have any, in row order (as collate's rows and the model's
    `<image>` positions read them), or None when no sample has one."""
    images = [s.images for s in samples if s.images is not None]
    return merge_inputs(images) if images else None


def summarize(samples: Sequence[Sample]) -> dict:
    """Accuracy (exactly right), mean partial accuracy, format rate (all four format checks), mean
    completion length, overall and per task."""

    def stats(group: list[Sample]) -> dict:
        k = max(1, len(group))
        return {
            "accuracy": sum(s.reward.correct for s in group) / k,
            "partial_accuracy": sum(s.reward.accuracy for s in group) / k,
            "format": sum(s.reward.format >= 1.0 for s in group) / k,
            "length": sum(len(s.completion_ids) for s in group) / k,
            "n": len(group),
        }

    out = stats(list(samples))
    for name in dict.fromkeys(s.problem.task for s in samples):
        out.update(
            {
                f"{name}/{k}": v
                for k, v in stats([s for s in samples if s.problem.task == name]).items()
            }
        )
    return out
