"""Verifiable tasks for SFT, GRPO and evaluation: generators with a fixed
held-out split, and strict graders.

    task = get_task("countdown")
    problems = task.generate(64, seed=0, difficulty=1, split="train", lang="en")
    reward = task.grade(problems[0], completion)        # Reward(accuracy, format, total,
    violations)
"""

from nanoseek.tasks.arithmetic import Arithmetic
from nanoseek.tasks.base import Problem, Reward, Solution, Task, split_of
from nanoseek.tasks.code import Code, load_humaneval
from nanoseek.tasks.countdown import Countdown
from nanoseek.tasks.format import (
    FORMAT_INSTRUCTIONS,
    Parsed,
    make_completion,
    parse_completion,
    parse_int,
)
from nanoseek.tasks.passkey import Passkey
from nanoseek.tasks.word_problems import WordProblems

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (Arithmetic, Countdown, WordProblems, Code, Passkey)
}


def get_task(name: str, **kwargs) -> Task:
    """A task by name; kwargs go to its constructor (accuracy_weight, format_weight, and
    task-specific ones)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = [
    "TASKS",
    "get_task",
    "Task",
    "Problem",
    "Solution",
    "Reward",
    "split_of",
    "Arithmetic",
    "Countdown",
    "WordProblems",
    "Code",
    "Passkey",
    "load_humaneval",
    "FORMAT_INSTRUCTIONS",
    "Parsed",
    "make_completion",
    "parse_completion",
    "parse_int",
]
