"""Multi-digit addition, subtraction and multiplication, with short column-wise worked solutions.

Difficulty = number of digits of the operands (the second multiplication operand has at most half as
many, so the worked solution stays a handful of lines). Partial credit: a wrong answer of the right
sign and length earns up to 0.5 for the digits that are right, counted from the units column, which
is the order in which a model that learns column arithmetic gets them right.
"""

import random

from nanoseek.tasks.base import Problem, Task
from nanoseek.tasks.format import FORMAT_INSTRUCTIONS, parse_int

OPS = ("+", "-", "*")
SYMBOL = {"+": "+", "-": "-", "*": "×"}
QUESTION = {"en": "What is {a} {op} {b}?", "zh": "计算 {a} {op} {b} 等于多少？"}
WORDS = {  # the few words the column-wise steps need
    "en": {
        "write": "write",
        "carry": "carry",
        "borrow": "borrow",
        "swap": "{b} > {a}, so {a} - {b} = -({b} - {a})",
    },
    "zh": {
        "write": "写",
        "carry": "进",
        "borrow": "借",
        "swap": "{b} > {a}，所以 {a} - {b} = -({b} - {a})",
    },
}


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]  # units first


def add_steps(a: int, b: int, w: dict) -> list[str]:
    da = _digits(a)
    db = _digits(b)
    carry = 0
    lines = []
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        terms = f"{x}+{y}" + (f"+{carry}" if carry else "")
        lines.append(
            f"{terms}={s}, {w['write']} {s % 10}" + (f" {w['carry']} 1" if s >= 10 else "")
        )
        carry = s // 10
    if carry:
        lines.append(f"{w['write']} 1")
    return lines


def sub_steps(a: int, b: int, w: dict) -> list[str]:
    """a - b for a >= b, column by column with borrows."""
    da = _digits(a)
    db = _digits(b)
    borrow = 0
    lines = []
    for i in range(len(da)):
        x, y = da[i] - borrow, (db[i] if i < len(db) else 0)
        borrow = int(x < y)
        top = x + 10 * borrow
        lines.append(f"{top}-{y}={top - y}" + (f" ({w['borrow']} 1)" if borrow else ""))
    return lines


def mul_steps(a: int, b: int, w: dict) -> list[str]:
    """One partial product per digit of b, then their sum."""
    lines, partials = [], []
    for i, d in enumerate(_digits(b)):
        p = a * d * 10**i
        partials.append(p)
        lines.append(f"{a}×{d * 10**i}={p}")
    if len(partials) > 1:
        lines.append(" + ".join(map(str, partials)) + f" = {sum(partials)}")
    return lines


def solve(a: int, op: str, b: int, lang: str) -> tuple[int, str]:
    w = WORDS[lang]
    if op == "+":
        return a + b, "\n".join(add_steps(a, b, w))
    if op == "-":
        if a >= b:
            return a - b, "\n".join(sub_steps(a, b, w))
        return a - b, "\n".join([w["swap"].format(a=a, b=b)] + sub_steps(b, a, w))
    return a * b, "\n".join(mul_steps(a, b, w))


class Arithmetic(Task):
    name = "arithmetic"
    max_answer_chars = 40

    def __init__(self, partial_credit: bool = True, **weights):
        super().__init__(**weights)
        self.partial_credit = partial_credit

    def sample(self, rng: random.Random, difficulty: int, lang: str) -> Problem:
        op = rng.choice(OPS)
        # mostly full length, sometimes one digit shorter
        n_a = rng.randint(max(1, difficulty - 1), difficulty)
        n_b = max(1, (difficulty + 1) // 2) if op == "*" else rng.randint(1, difficulty)
        a, b = (
            rng.randint(10 ** (n_a - 1) if n_a > 1 else 0, 10**n_a - 1),
            rng.randint(0, 10**n_b - 1),
        )
        answer, steps = solve(a, op, b, lang)
        question = QUESTION[lang].format(a=a, op=SYMBOL[op], b=b)
        reasoning = f"{a} {SYMBOL[op]} {b}\n{steps}\n= {answer}"
        return self.problem(
            key=f"{a}{op}{b}",
            lang=lang,
            prompt=f"{question} {FORMAT_INSTRUCTIONS[lang]}",
            answer=str(answer),
            reasoning=reasoning,
            a=a,
            b=b,
            op=op,
            expression=f"{a} {op} {b}",
        )

    def score(self, problem: Problem, answer: str) -> tuple[float, str | None]:
        value, truth = parse_int(answer), int(problem.answer)
        if value is None:
            return 0.0, "not_an_integer"
        if value == truth:
            return 1.0, None
        if (
            not self.partial_credit
            or (value < 0) != (truth < 0)
            or len(str(abs(value))) != len(str(abs(truth)))
        ):
            return 0.0, "wrong"
        right = sum(x == y for x, y in zip(_digits(abs(value)), _digits(abs(truth))))
        return 0.5 * right / len(str(abs(truth))), "wrong"
