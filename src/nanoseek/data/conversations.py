"""The SFT mix that nanoseek makes itself: worked task solutions and small bilingual conversations.

    task_conversations(...)     train-split task problems with their worked solutions
                                (reasoning + <answer>)
    identity_conversations(n)   greetings and questions about the model, in English and Chinese
    tool_conversations(...)     train-split arithmetic and word problems solved with a calculator
                                tool the conversation declares (and greetings that need none)
    corpus_conversations(...)   simple factual Q&A read off the pretraining corpus: how a Bible
                                chapter begins, what a Wikipedia subject is, the title or the
                                opening of a 三国演义 chapter; never about a held-out chapter
    opening_questions(...)      the chat eval's questions: how each held-out Bible / 三国演义
                                chapter begins (`held_out`: a fixed share of chapters, chosen by a
                                hash of the chapter's heading, that SFT never asks about)

Everything is deterministic in its seed. Each answer is either templated or copied verbatim from the
corpus text, so the assistant never states something the data does not say. Every assistant turn has
a short reasoning, because the default generation prompt opens a think block and the model should
always know how to close it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import random
import re
from collections.abc import Iterable, Sequence

from nanoseek.data.chat_tokens import Messages, problem_messages, with_tools
from nanoseek.tasks import get_task


def task_conversations(
    tasks: dict[str, Sequence[int]],
    per_task: int,
    *,
    langs: Sequence[str] = ("en", "zh"),
    seed: int = 0,
    split: str = "train",
) -> list[Messages]:
    """`per_task` problems of each task (name -> difficulties), spread evenly
    over difficulties and languages."""
    return [
        problem_messages(p)
        for p in task_problems(tasks, per_task, langs=langs, seed=seed, split=split)
    ]


def task_problems(
    tasks: dict[str, Sequence[int]],
    per_task: int,
    *,
    langs: Sequence[str] = ("en", "zh"),
    seed: int = 0,
    split: str = "train",
):
    """The problems task_conversations solves."""
    out = []
    for name, difficulties in tasks.items():
        task = get_task(name)
        cells = [(d, lang) for d in difficulties for lang in langs]
        for k, (difficulty, lang) in enumerate(cells):
            n = per_task // len(cells) + (k < per_task % len(cells))
            if n:
                out += task.generate(n, seed=seed, difficulty=difficulty, split=split, lang=lang)
    return out


# ---------------------------------------------------------------------------------------- tool use
CALCULATOR = {  # short: JSON costs a small tokenizer many tokens, and SFT rows are 256 long
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Exact integer arithmetic: + - * // % ( )",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
TOOL_TASKS = ("arithmetic", "word_problems")  # the tasks whose answer is one expression's value
_TOOL_WORDS = {
    "en": {
        "call": "Exact arithmetic: I use the calculator.",
        "answer": "The calculator says {value}.",
    },
    "zh": {
        "call": "需要精确计算，我用计算器。",
        "answer": "计算器算出 {value}。",
    },
}
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def calculate(expression: str) -> int:
    """The calculator tool: an integer expression (+ - * // %, unary minus, parentheses) evaluated
    by Python, nothing else (ValueError otherwise)."""

    def value(node) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"the calculator takes integers, + - * // % and parentheses: {expression}")

    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ValueError(f"not an expression: {expression!r}") from None
    return value(tree.body)


def tool_conversations(
    tasks: dict[str, Sequence[int]],
    n: int,
    *,
    langs: Sequence[str] = ("en", "zh"),
    seed: int = 0,
) -> list[Messages]:
    """About `n` conversations in which CALCULATOR is declared (as the chat template declares
    tools) and the assistant uses it. Four in five come in pairs from one train-split problem of
    the TOOL_TASKS among `tasks` (name -> difficulties):
      1. the problem; the assistant thinks, then calls the calculator with the problem's expression;
      2. the same problem, the call as history (weight 0: clients send it back without its thought,
         which the server drops anyway), the tool's result (computed here by `calculate`, checked
         against the problem's answer); the assistant thinks and answers in the task's format.
    Each is what the server's prompt for that turn is, so the model learns the exact format. The
    fifth is a greeting with the calculator declared and no call: a tool is used when it helps."""
    chosen = {name: d for name, d in tasks.items() if name in TOOL_TASKS}
    if not chosen or n <= 0:
        return []
    greetings = n // 5
    per_task = -(-(n - greetings) // (2 * len(chosen)))
    out = []
    for problem in task_problems(chosen, per_task, langs=langs, seed=seed + 10_000):
        out += _tool_pair(problem)
    rng = random.Random(f"tool-greetings|{seed}")
    for i in range(greetings):
        t = _IDENTITY[langs[i % len(langs)]]
        greeting = _turn(rng.choice(t["greetings"]), t["think_greet"], rng.choice(t["greet"]))
        out.append(with_tools(greeting, [CALCULATOR]))
    return out


def _tool_pair(problem) -> list[Messages]:
    """The call, and the answer from the tool's result, for one problem (see tool_conversations)."""
    expression = problem.metadata["expression"]
    value = calculate(expression)
    if str(value) != problem.answer:
        raise ValueError(
            f"{problem.id}: {expression} = {value}, but the answer is {problem.answer}"
        )
    words = _TOOL_WORDS[problem.lang]
    digest = hashlib.sha256(problem.id.encode()).hexdigest()[:24]
    call = {
        "id": f"call_{digest}",
        "type": "function",
        "function": {
            "name": "calculator",
            "arguments": json.dumps({"expression": expression}, ensure_ascii=False),
        },
    }
    user = {"role": "user", "content": problem.prompt}
    calling = {
        "role": "assistant",
        "content": "",
        "reasoning_content": words["call"].format(expression=expression),
        "tool_calls": [call],
    }
    answering = [
        {"role": "assistant", "content": "", "tool_calls": [call], "weight": 0},
        {"role": "tool", "tool_call_id": call["id"], "content": str(value)},
        {
            "role": "assistant",
            "reasoning_content": words["answer"].format(expression=expression, value=value),
            "content": f"<answer>{value}</answer>",
        },
    ]
    return [with_tools([user, calling], [CALCULATOR]), with_tools([user, *answering], [CALCULATOR])]


# ----------------------------------------------------------------------------------------- identity
_IDENTITY = {
    "en": {
        "greetings": [
            "Hello!",
            "Hi!",
            "Hey there.",
            "Good morning!",
            "Hello, who are you?",
            "Hi, what's up?",
        ],
        "about": [
            "Who are you?",
            "What is your name?",
            "What are you?",
            "Who made you?",
            "Which model are you?",
            "Tell me about yourself.",
            "What can you do?",
            "Can you speak Chinese?",
        ],
        "thanks": ["Thank you!", "Thanks a lot.", "Great, thanks!"],
        "think_greet": "The user is greeting me. I should greet them back and offer to help.",
        "think_about": "The user asks about me. I am nanoseek, "
        "a small model; I should say so honestly.",
        "think_thanks": "The user is thanking me. A short, friendly reply is enough.",
        "greet": [
            "Hello! I'm nanoseek, a small language model. How can I help you?",
            "Hi! I'm nanoseek. What would you like to talk about?",
        ],
        "about_answer": "I'm nanoseek, a small DeepSeek-style language model "
        "(mixture of experts, multi-head latent attention) trained from scratch "
        "with the open nanoseek project. I can chat a little in English and Chinese "
        "and try simple arithmetic and puzzles, but I am tiny and often wrong.",
        "thanks_answer": ["You're welcome!", "Glad I could help."],
    },
    "zh": {
        "greetings": ["你好！", "您好。", "嗨！", "早上好！", "你好，你是谁？"],
        "about": [
            "你是谁？",
            "你叫什么名字？",
            "你是什么模型？",
            "谁创造了你？",
            "介绍一下你自己。",
            "你能做什么？",
            "你会说英文吗？",
        ],
        "thanks": ["谢谢！", "非常感谢。", "好的，谢谢你！"],
        "think_greet": "用户在向我打招呼。我应该回应问候，并表示愿意帮忙。",
        "think_about": "用户在问我是谁。我是 nanoseek，一个很小的模型，应该如实回答。",
        "think_thanks": "用户在道谢。简短友好地回复即可。",
        "greet": [
            "你好！我是 nanoseek，一个小型语言模型。有什么可以帮你的吗？",
            "你好！我是 nanoseek。想聊些什么？",
        ],
        "about_answer": "我是 nanoseek，一个 DeepSeek 风格的小型语言模型"
        "（混合专家、多头潜在注意力），由开源项目 nanoseek 从零训练而成。"
        "我能用中文和英文简单聊天，也会尝试简单的算术和谜题，但我很小，经常出错。",
        "thanks_answer": ["不客气！", "很高兴能帮到你。"],
    },
}


def identity_conversations(
    n: int, seed: int = 0, langs: Sequence[str] = ("en", "zh")
) -> list[Messages]:
    """Greetings, questions about the model and thanks; some conversations have two turns."""
    rng = random.Random(f"identity|{seed}")
    out = []
    for i in range(n):
        t = _IDENTITY[langs[i % len(langs)]]
        kind = rng.choice(["greet", "about", "about", "greet_then_about"])
        if kind == "greet":
            msgs = [_turn(rng.choice(t["greetings"]), t["think_greet"], rng.choice(t["greet"]))]
        elif kind == "about":
            msgs = [_turn(rng.choice(t["about"]), t["think_about"], t["about_answer"])]
        else:
            msgs = [
                _turn(rng.choice(t["greetings"]), t["think_greet"], rng.choice(t["greet"])),
                _turn(rng.choice(t["about"]), t["think_about"], t["about_answer"]),
                _turn(rng.choice(t["thanks"]), t["think_thanks"], rng.choice(t["thanks_answer"])),
            ]
        out.append([m for pair in msgs for m in pair])
    return out


def _turn(user: str, reasoning: str, answer: str) -> Messages:
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "reasoning_content": reasoning, "content": answer},
    ]


# --------------------------------------------------------------------------------------- corpus Q&A
_ZH_DIGITS = {c: i for i, c in enumerate("零一二三四五六七八九")}


def chinese_number(text: str) -> int | None:
    """'一百二十' -> 120 (numbers below 1000, as in chapter numbers); None if it is not one."""
    if not text or any(c not in _ZH_DIGITS and c not in "十百" for c in text):
        return None
    total, digit = 0, None
    for c in text:
        if c in _ZH_DIGITS:
            digit = _ZH_DIGITS[c]
        else:
            total += (1 if digit is None else digit) * (10 if c == "十" else 100)
            digit = None
    return total + (digit or 0)


def _first_sentence(text: str, max_chars: int = 240) -> str | None:
    """The first sentence of a text (up to . ! ? before a space, or 。！？), if it is a reasonable
    length and its quotation marks are balanced."""
    m = re.match(r"(.+?(?:[.!?][\"”’]?(?=\s|$)|[。！？][”」]?))", text.strip(), re.S)
    if not m:
        return None
    s = " ".join(m.group(1).split())
    balanced = s.count("“") == s.count("”") and s.count('"') % 2 == 0
    return s if 12 <= len(s) <= max_chars and balanced else None


BIBLE_HEADING = r"[1-3]? ?[A-Z][A-Za-z ]+ \d+"
# how SFT asks for a Bible chapter's opening; the chat eval asks the same way
BIBLE_OPENING_QUESTIONS = (
    "How does {head} begin?",
    "What is the first sentence of {head} in the Bible?",
    "Quote the opening of {head}.",
)
SANGUO_OPENING_QUESTION = "《三国演义》第{number}回是怎样开头的？"
SANGUO_HEADING = r"第([零一二三四五六七八九十百]+)回\s*(.+)"


def _bible_qa(text: str, rng: random.Random) -> Messages | None:
    head, _, body = text.partition("\n\n")
    first = _first_sentence(body)
    if not re.fullmatch(BIBLE_HEADING, head) or not first:
        return None
    q = rng.choice(BIBLE_OPENING_QUESTIONS).format(head=head)
    return _turn(
        q,
        f"{head} is a chapter of the Bible. I recall its first sentence.",
        f'{head} begins: "{first}"',
    )


def _wiki_qa(text: str, rng: random.Random) -> Messages | None:
    title, _, body = text.partition("\n\n")
    first = _first_sentence(body)
    if not first or len(title) > 60 or "\n" in title:
        return None
    q = rng.choice(
        [
            f"What is {title}?",
            f"Tell me briefly about {title}.",
            f"Give me one sentence on {title}.",
        ]
    )
    return _turn(q, f"The user asks about {title}. One sentence from what I know is enough.", first)


def _sanguo_qa(text: str, rng: random.Random) -> Messages | None:
    head, _, body = text.partition("\n\n")
    m = re.fullmatch(SANGUO_HEADING, head.strip())
    number = chinese_number(m.group(1)) if m else None
    if number is None:
        return None
    title = " ".join(m.group(2).split())
    kind = rng.choice(["title_zh", "title_en", "opening"])
    if kind == "title_zh":
        return _turn(
            f"《三国演义》第{m.group(1)}回的回目是什么？",
            f"用户问《三国演义》第{m.group(1)}回的回目，我回忆一下。",
            f"第{m.group(1)}回的回目是“{title}”。",
        )
    if kind == "title_en":
        return _turn(
            f"What is the title of chapter {number} of Romance of the Three Kingdoms?",
            f"Chapter {number} is 第{m.group(1)}回 in Chinese. I recall its title.",
            f"Chapter {number} (第{m.group(1)}回) is titled “{title}”.",
        )
    first = _first_sentence(body, max_chars=120)
    if not first:
        return None
    return _turn(
        SANGUO_OPENING_QUESTION.format(number=m.group(1)),
        f"用户想知道第{m.group(1)}回的开头，我回忆原文的第一句。",
        f"第{m.group(1)}回开头写道：“{first}”",
    )


_QA = {"bible-web": _bible_qa, "wikipedia-vital": _wiki_qa, "sanguo": _sanguo_qa}


def corpus_conversations(records: Iterable[dict], n: int, seed: int = 0) -> list[Messages]:
    """Up to `n` factual Q&A built from corpus records ({"text", "source"}, e.g. a run's
    corpus/train.jsonl), shared between the known sources (bible-web, wikipedia-vital, sanguo) as
    evenly as they allow. Held-out chapters (`held_out`) are left out: the chat eval asks about
    them."""
    rng = random.Random(f"corpus-qa|{seed}")
    by_source: dict[str, list[Messages]] = {}
    for rec in records:
        make = _QA.get(rec.get("source"))
        if make and held_out(rec["source"], rec["text"]):
            continue
        conv = make(rec["text"], rng) if make else None
        if conv:
            by_source.setdefault(rec["source"], []).append(conv)
    for convs in by_source.values():
        rng.shuffle(convs)
    out, pools = [], [by_source[s] for s in sorted(by_source)]
    while len(out) < n and any(pools):
        for pool in pools:
            if pool and len(out) < n:
                out.append(pool.pop())
    return out


# ------------------------------------------------------------------------ held-out chapters (eval)
# The share of each source's chapters that SFT never asks about: about 180 of the 1189 Bible
# chapters and 30 of the 120 三国演义 chapters. Not all have a usable opening sentence (see
# _first_sentence), and 1% of the corpus is validation text; what is left gives the chat eval
# well over 100 questions.
HELD_OUT_SHARE = {"bible-web": 0.15, "sanguo": 0.25}


def chapter_key(source: str, text: str) -> str | None:
    """A chapter's identity, its heading: 'Genesis 1', '第一百二十回'; None for other records."""
    head = text.partition("\n\n")[0].strip()
    if source == "bible-web" and re.fullmatch(BIBLE_HEADING, head):
        return head
    m = re.match(SANGUO_HEADING, head) if source == "sanguo" else None
    return f"第{m.group(1)}回" if m else None


def held_out(source: str, text: str) -> bool:
    """Whether a chapter is held out of the SFT Q&A: the first 32 bits of
    sha256('held-out|source|heading') below HELD_OUT_SHARE of 2**32. It depends on the chapter's
    identity only, so it is the same whatever the corpus build, its cap or the SFT seed."""
    key = chapter_key(source, text)
    share = HELD_OUT_SHARE.get(source)
    if key is None or share is None:
        return False
    digest = hashlib.sha256(f"held-out|{source}|{key}".encode()).hexdigest()
    return int(digest[:8], 16) < share * 2**32


def opening_questions(records: Iterable[dict], n: int | None = None, seed: int = 0) -> list[dict]:
    """The chat eval's questions: for each held-out chapter among `records` (e.g. a run's
    corpus/train.jsonl, the text the model pretrained on), how it begins, asked as SFT asks about
    the other chapters. Sources alternate; at most `n` (None: all). -> [{"source", "chapter",
    "lang", "question", "opening", "text"}]."""
    rng = random.Random(f"opening-questions|{seed}")
    by_source: dict[str, list[dict]] = {}
    for rec in records:
        source = rec.get("source")
        if source not in HELD_OUT_SHARE or not held_out(source, rec["text"]):
            continue
        key = chapter_key(source, rec["text"])
        body = rec["text"].partition("\n\n")[2]
        if source == "bible-web":
            opening = _first_sentence(body)
            question = rng.choice(BIBLE_OPENING_QUESTIONS).format(head=key)
        else:
            opening = _first_sentence(body, max_chars=120)
            question = SANGUO_OPENING_QUESTION.format(number=key[1:-1])
        if opening:
            by_source.setdefault(source, []).append(
                {
                    "source": source,
                    "chapter": key,
                    "lang": "en" if source == "bible-web" else "zh",
                    "question": question,
                    "opening": opening,
                    "text": rec["text"],
                }
            )
    out = []
    pools = [by_source[s] for s in sorted(by_source)]
    while any(pools) and (n is None or len(out) < n):
        for pool in pools:
            if pool and (n is None or len(out) < n):
                out.append(pool.pop(0))
    return out


def identity_questions(langs: Sequence[str] = ("en", "zh")) -> list[dict]:
    """Every question about the model that SFT trains, with the trained answer.
    -> [{"lang", "question", "answer"}]."""
    return [
        {"lang": lang, "question": q, "answer": _IDENTITY[lang]["about_answer"]}
        for lang in langs
        for q in _IDENTITY[lang]["about"]
    ]
