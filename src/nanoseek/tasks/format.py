"""The R1 answer format, and the strict parser that every grader shares.

A completion must look like

    <think>reasoning</think>
    <answer>final answer</answer>

The prompt may be prefilled with "<think>", in which case the completion starts with the reasoning
itself. `parse_completion` takes `think_prefilled=None` (accept both), True or False.

Rules (each one closes a reward hack seen in public GRPO runs, spec A.5):
  answer (decides whether the grader looks at the answer at all; `answer` is None otherwise)
    - only the LAST <answer>...</answer> block counts, and it must be the only one: a completion
      with more than one <answer> or </answer> tag gets nothing (several guesses; `</answer>`
      repeated hundreds of times);
    - the answer must not be empty (an empty tag must never match a ground truth);
    - nothing but whitespace may follow the final </answer> (no guesses or junk after the answer);
    - the answer block must come after the reasoning (an answer written inside <think> is not an
      answer);
    - the answer may be at most `max_answer_chars` long (a long list of guesses is not an answer).
  format (four checks, 0.25 each: a model gets a gradient toward the format before it is right)
    - think_tags: exactly one think block: one </think>, and one <think> at the very start (none if
      prefilled);
    - empty_think: the reasoning (up to the first </think>) is not empty: an empty think must not
      earn credit;
    - answer_block: a valid answer (see above) with nothing but whitespace between the first
      </think> and it;
    - clean_end: exactly one </answer>, and the completion ends there (whitespace aside).
Answer content (a single integer, one expression, one code block) is checked by each task, never by
substring.
"""

import re
import unicodedata
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

FORMAT_INSTRUCTIONS = {
    "en": "Think step by step inside <think> </think>, then "
    "give only the final answer inside <answer> </answer>.",
    "zh": "请先在 <think> </think> 中逐步思考，然后只在 <answer> </answer> 中给出最终答案。",
}


@dataclass(frozen=True)
class Parsed:
    think: str | None  # the reasoning: the text up to the first </think> (None if there is none)
    answer: str | None  # the stripped final answer, None if the rules above void it
    format: float  # 0..1, the mean of the four format checks
    violations: tuple[str, ...]  # names of the broken rules, for logs and tests


def make_completion(reasoning: str, answer: str, think_prefilled: bool = False) -> str:
    """The canonical completion text; the inverse of `parse_completion`."""
    head = "" if think_prefilled else THINK_OPEN
    return f"{head}{reasoning}{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def parse_completion(
    text: str, think_prefilled: bool | None = None, max_answer_chars: int = 200
) -> Parsed:
    s = text.lstrip()
    violations = []

    # Think block: with a prefilled prompt the completion opens with the reasoning itself.
    opened = s.startswith(THINK_OPEN)
    prefilled = not opened if think_prefilled is None else think_prefilled
    think_end = s.find(THINK_CLOSE)
    think = s[len(THINK_OPEN) if opened else 0 : think_end] if think_end >= 0 else None
    think_ok = (
        s.count(THINK_CLOSE) == 1
        and s.count(THINK_OPEN) == (0 if prefilled else 1)
        and opened != prefilled
    )
    if not think_ok:
        violations.append("think_tags")
    if not (think and think.strip()):
        violations.append("empty_think")

    # Answer block: the last one, and it has to be the only one.
    end = s.rfind(ANSWER_CLOSE)
    start = s.rfind(ANSWER_OPEN, 0, end) if end >= 0 else -1
    answer, clean_end = None, False
    if start < 0:
        violations.append("no_answer")
    else:
        inner, trailing = s[start + len(ANSWER_OPEN) : end].strip(), s[end + len(ANSWER_CLOSE) :]
        void = []
        if s.count(ANSWER_OPEN) != 1 or s.count(ANSWER_CLOSE) != 1:
            void.append("repeated_answer_tags")
        if not inner:
            void.append("empty_answer")
        if len(inner) > max_answer_chars:
            void.append("answer_too_long")
        if s.rfind(THINK_CLOSE) > start or s.rfind(THINK_OPEN) > start:
            void.append("answer_inside_think")
        if trailing.strip():
            void.append("trailing_text")
        if 0 <= think_end < start and s[think_end + len(THINK_CLOSE) : start].strip():
            violations.append("text_before_answer")  # costs format credit only
        violations += void
        answer = None if void else inner
        clean_end = s.count(ANSWER_CLOSE) == 1 and not trailing.strip()

    checks = (
        think_ok,
        "empty_think" not in violations,
        answer is not None and "text_before_answer" not in violations,
        clean_end,
    )
    return Parsed(
        think=think, answer=answer, format=sum(checks) / len(checks), violations=tuple(violations)
    )


_INT_PLAIN = re.compile(r"[+-]?\d+")
# 1,234,567 or 1 234 567, never mixed
_INT_GROUPED = re.compile(r"[+-]?\d{1,3}(?:([, ])\d{3})(?:\1\d{3})*")


def parse_int(text: str, units: tuple[str, ...] = ()) -> int | None:
    """One integer, or None. Accepts full-width digits, a Unicode minus, thousands separators in
    groups of three (commas or spaces), and one of the problem's units after the number ("12
    apples", "12个"); nothing else, so "12 or 13", "12, 13" and "about 12" are not integers."""
    s = unicodedata.normalize("NFKC", text).strip().replace("\u2212", "-")
    for unit in sorted(units, key=len, reverse=True):
        if unit and s.endswith(unit):
            s = s[: -len(unit)].strip()
            break
    if _INT_PLAIN.fullmatch(s) or _INT_GROUPED.fullmatch(s):
        return int(s.replace(",", "").replace(" ", ""))
    return None
