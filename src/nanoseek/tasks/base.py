"""The common shape of a verifiable task: seeded problem generation with a
fixed held-out split, and grading.

A task draws problems from a seeded `random.Random`; each problem has a canonical `key` (its
operands, say) that is independent of language and wording. The split is a hash of that key, so a
held-out problem can never be drawn for training, whatever the seed, the difficulty or the language.
"""

import hashlib
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nanoseek.tasks.format import make_completion, parse_completion

SPLITS = ("train", "test")
LANGS = ("en", "zh")


@dataclass(frozen=True)
class Solution:
    """A worked solution: short reasoning and the final answer, for SFT
    and for the pretraining corpus."""

    reasoning: str
    answer: str

    def completion(self, think_prefilled: bool = False) -> str:
        return make_completion(self.reasoning, self.answer, think_prefilled)


@dataclass(frozen=True)
class Problem:
    id: str  # "<task>/<lang>/<hash of key>": stable across runs and machines
    task: str
    key: str  # canonical content; decides the split
    prompt: str  # the user message, format instructions included
    answer: str  # the ground truth, as text
    solution: Solution
    lang: str = "en"
    metadata: dict[str, Any] = field(default_factory=dict)  # hidden tests, operands, units...


@dataclass(frozen=True)
class Reward:
    accuracy: float  # 0..1; partial credit where a task gives it
    format: float  # 0..1
    total: float  # accuracy_weight * accuracy + format_weight * format
    violations: tuple[str, ...] = ()  # broken format rules and answer problems, for logs

    @property
    def correct(self) -> bool:
        """Exactly right: what pass@k counts."""
        return self.accuracy >= 1.0


def split_of(task: str, key: str, test_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(f"{task}\0{key}".encode()).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"


class Task:
    """Subclasses set `name` and implement `sample` (one problem from an rng)
    and `score` (accuracy of an answer)."""

    name: str = ""
    test_fraction: float = 0.1  # share of the problem space that is held out
    max_answer_chars: int = 200

    def __init__(self, accuracy_weight: float = 1.0, format_weight: float = 0.1):
        self.accuracy_weight = accuracy_weight
        self.format_weight = format_weight

    # -- to implement ------------------------------------------------------------------------------
    def sample(self, rng: random.Random, difficulty: int, lang: str) -> Problem:
        raise NotImplementedError

    def score(self, problem: Problem, answer: str) -> tuple[float, str | None]:
        """Accuracy in 0..1 of an extracted answer, and a short reason when it is not 1."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    def generate(
        self, n: int, seed: int = 0, difficulty: int = 1, split: str = "train", lang: str = "en"
    ) -> list[Problem]:
        """`n` problems, the same for the same arguments. The language is not part
        of the seed, so the "zh" set is the "en" set translated. Duplicates are
        avoided while the problem space allows it."""
        if split not in SPLITS or lang not in LANGS or difficulty < 1:
            raise ValueError(
                f"bad arguments: split={split!r} lang={lang!r} difficulty={difficulty}"
            )
        rng = random.Random(f"{self.name}|{seed}|{difficulty}|{split}")
        problems = []
        seen = set()
        draws = 0
        stale = 0
        while len(problems) < n:
            draws += 1
            if draws > 1000 * (n + 10):
                raise RuntimeError(
                    f"{self.name}: cannot draw {n} {split} problems at difficulty {difficulty}"
                )
            p = self.sample(rng, difficulty, lang)
            if split_of(self.name, p.key, self.test_fraction) != split:
                continue
            stale = stale + 1 if p.key in seen else 0
            if stale and stale < 200:  # a duplicate: skip it, unless the space seems exhausted
                continue
            seen.add(p.key)
            problems.append(p)
        return problems

    def grade(
        self, problem: Problem, completion: str, think_prefilled: bool | None = None
    ) -> Reward:
        parsed = parse_completion(completion, think_prefilled, self.max_answer_chars)
        accuracy, reason = (
            (0.0, None) if parsed.answer is None else self.score(problem, parsed.answer)
        )
        violations = parsed.violations + ((reason,) if reason else ())
        total = self.accuracy_weight * accuracy + self.format_weight * parsed.format
        return Reward(accuracy=accuracy, format=parsed.format, total=total, violations=violations)

    def grade_many(
        self,
        problems: list[Problem],
        completions: list[str],
        think_prefilled: bool | None = None,
        workers: int = 4,
    ) -> list[Reward]:
        """Grade a batch from a small thread pool: code grading mostly
        waits on its sandboxed subprocess."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        with ThreadPoolExecutor(workers) as pool:
            return list(
                pool.map(lambda p, c: self.grade(p, c, think_prefilled), problems, completions)
            )

    def problem(
        self, key: str, lang: str, prompt: str, answer: str, reasoning: str, **metadata
    ) -> Problem:
        """Helper for `sample`: assembles a Problem with its id and the worked solution."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return Problem(
            id=f"{self.name}/{lang}/{digest}",
            task=self.name,
            key=key,
            prompt=prompt,
            answer=answer,
            solution=Solution(reasoning, answer),
            lang=lang,
            metadata=metadata,
        )
