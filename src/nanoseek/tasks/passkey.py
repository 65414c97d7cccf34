"""Passkey retrieval: a number hidden at a chosen depth in repetitive
filler text; graded by exact match.

`Passkey().make(length, depth)` builds one prompt of about `length` characters (within one filler
sentence) with the key at `depth` (0 = start, 1 = end of the filler); evaluation sweeps both.
`generate` draws depths at random and takes the length from the difficulty: 500 characters at
difficulty 1, times 4 per level. Characters, not tokens, so the task does not depend on a tokenizer:
divide by the tokenizer's characters per token to convert.
"""

import random
import unicodedata

from nanoseek.tasks.base import Problem, Task
from nanoseek.tasks.format import FORMAT_INSTRUCTIONS

TEXT = {
    "en": {
        "intro": "There is an important piece of information hidden "
        "inside a lot of irrelevant text. Find it and remember it.\n",
        "filler": "The river flows past the old mill. Birds sing in the morning. "
        "The road goes on and on. A cat sleeps by the window. Clouds drift over the hills. ",
        "needle": "The pass key is {key}. Remember it. {key} is the pass key. ",
        "question": "\nWhat is the pass key?",
        "reasoning": "The text says: the pass key is {key}.",
    },
    "zh": {
        "intro": "下面的大量无关文字中藏着一条重要信息，请找到并记住它。\n",
        "filler": "河水流过老磨坊。鸟儿在清晨歌唱。道路一直向前延伸。"
        "一只猫在窗边睡觉。云朵飘过山丘。",
        "needle": "通行密码是{key}。记住它。{key}就是通行密码。",
        "question": "\n通行密码是多少？",
        "reasoning": "文中写道：通行密码是{key}。",
    },
}


def _filler(text: dict, n_chars: int) -> str:
    """Whole filler sentences, about n_chars long."""
    sentences = [
        s for s in text["filler"].replace("。", "。\0").replace(". ", ". \0").split("\0") if s
    ]
    out = []
    size = 0
    i = 0
    while size < n_chars:
        out.append(sentences[i % len(sentences)])
        size += len(out[-1])
        i += 1
    return "".join(out)


class Passkey(Task):
    name = "passkey"
    max_answer_chars = 20

    def make(
        self, length: int, depth: float, key: str | None = None, lang: str = "en", seed: int = 0
    ) -> Problem:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        key = key or str(random.Random(f"passkey|{seed}|{length}|{depth}").randint(10000, 99999))
        t = TEXT[lang]
        instructions = " " + FORMAT_INSTRUCTIONS[lang]
        needle = t["needle"].format(key=key)
        budget = max(
            0, length - len(t["intro"]) - len(needle) - len(t["question"]) - len(instructions)
        )
        before = _filler(t, round(budget * depth)) if depth > 0 else ""
        after = _filler(t, budget - len(before)) if budget > len(before) else ""
        prompt = t["intro"] + before + needle + after + t["question"] + instructions
        return self.problem(
            key=f"{key}@{depth:.4f}/{length}",
            lang=lang,
            prompt=prompt,
            answer=key,
            reasoning=t["reasoning"].format(key=key),
            length=len(prompt),
            depth=depth,
        )

    def sample(self, rng: random.Random, difficulty: int, lang: str) -> Problem:
        return self.make(
            500 * 4 ** (difficulty - 1),
            round(rng.random(), 4),
            str(rng.randint(10000, 99999)),
            lang,
        )

    def score(self, problem: Problem, answer: str) -> tuple[float, str | None]:
        ok = unicodedata.normalize("NFKC", answer).strip() == problem.answer
        return (1.0, None) if ok else (0.0, "wrong")
