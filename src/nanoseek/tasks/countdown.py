"""Countdown (TinyZero): combine the given numbers with + - × ÷ and parentheses to reach a target.

Each given number may be used at most once (TinyZero demands all of them; "at most" is the classic
game and keeps more puzzles solvable). The generator builds the target from a random expression over
all the numbers, so every puzzle is solvable and comes with one solution. Difficulty: 1 -> 3
numbers, 2 -> 4, 3 -> 5, ...

Answers are evaluated by a tiny evaluator over Python's `ast` with a whitelist (integer literals, +
- * /, parentheses), in exact rational arithmetic: no eval, no names, no calls, no powers, no unary
  minus.
"""

import ast
import random
from collections import Counter
from fractions import Fraction

from nanoseek.tasks.base import Problem, Task
from nanoseek.tasks.format import FORMAT_INSTRUCTIONS, parse_int

QUESTION = {
    "en": "Using the numbers {nums}, create an equation that equals {target}. "
    "You can use + - * / and parentheses, and each number at most once. "
    "Write just the expression as the answer, for example (1 + 2) / 3.",
    "zh": "用数字 {nums} 组成一个等于 {target} 的算式。"
    "可以使用 + - * / 和括号，每个数字最多用一次。答案只写算式，例如 (1 + 2) / 3。",
}
REASON = {"en": "Try combining the numbers step by step:", "zh": "逐步组合这些数字："}
BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
ALLOWED_CHARS = set("0123456789+-*/() ")
MAX_EXPR_CHARS = 100


class InvalidExpression(ValueError):
    pass


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """The exact value of an arithmetic expression and the integers
    it uses, or InvalidExpression."""
    expr = expr.replace("×", "*").replace("÷", "/").replace("−", "-")
    if len(expr) > MAX_EXPR_CHARS:
        raise InvalidExpression("too long")
    if not set(expr) <= ALLOWED_CHARS:
        raise InvalidExpression("characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise InvalidExpression("syntax") from e
    used = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise InvalidExpression("division by zero")
            return left / right
        # names, calls, attributes, **, //, unary minus: name the offending node (or its operator)
        raise InvalidExpression(f"not allowed: {type(getattr(node, 'op', node)).__name__}")

    return ev(tree.body), used


def _build(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction, list[str]]:
    """A random expression over all `numbers` with an integer value at
    every step; (text, value, steps)."""
    items = [(str(n), Fraction(n)) for n in numbers]
    steps = []
    while len(items) > 1:
        (ta, va), (tb, vb) = (
            items.pop(rng.randrange(len(items))),
            items.pop(rng.randrange(len(items))),
        )
        if va < vb:
            # larger first: no negative intermediate results
            (ta, va), (tb, vb) = (tb, vb), (ta, va)
        choices = ["+", "-", "*"] + (["/"] if vb != 0 and va % vb == 0 else [])
        op = rng.choice(choices)
        value = (
            va + vb if op == "+" else va - vb if op == "-" else va * vb if op == "*" else va / vb
        )
        steps.append(f"{va} {op} {vb} = {value}")
        items.append((f"({ta} {op} {tb})" if items else f"{ta} {op} {tb}", value))
    text, value = items[0]
    return text, value, steps


class Countdown(Task):
    name = "countdown"
    max_answer_chars = MAX_EXPR_CHARS

    def sample(self, rng: random.Random, difficulty: int, lang: str) -> Problem:
        count = difficulty + 2
        while True:
            numbers = [rng.randint(1, 99) for _ in range(count)]
            expr, value, steps = _build(rng, numbers)
            if value.denominator == 1 and 1 <= value <= 999:
                break
        target = int(value)
        nums = ", ".join(map(str, numbers))
        reasoning = "\n".join([REASON[lang], *steps, f"{expr} = {target}"])
        return self.problem(
            key=f"{sorted(numbers)}->{target}",
            lang=lang,
            prompt=f"{QUESTION[lang].format(nums=nums, target=target)} {FORMAT_INSTRUCTIONS[lang]}",
            answer=expr,
            reasoning=reasoning,
            numbers=numbers,
            target=target,
        )

    def score(self, problem: Problem, answer: str) -> tuple[float, str | None]:
        """1 for a valid expression hitting the target; 0.1 for a valid expression that misses
        (TinyZero's credit for a well-formed equation); 0 for anything that breaks the rules."""
        lhs, eq, rhs = answer.partition("=")
        # "expr = target" is accepted, nothing else
        if eq and parse_int(rhs) != problem.metadata["target"]:
            return 0.0, "bad_equation"
        try:
            value, used = evaluate(lhs.strip())
        except InvalidExpression as e:
            return 0.0, f"invalid_expression: {e}"
        if Counter(used) - Counter(problem.metadata["numbers"]):
            return 0.0, "numbers_not_given_or_reused"
        if value != problem.metadata["target"]:
            return 0.1, "wrong_value"
        return 1.0, None
