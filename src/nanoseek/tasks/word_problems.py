"""Short templated word problems (shopping, ages, speed, sharing, ...) in
English and Chinese, integer answers.

Each template draws its numbers (and the intermediate values of the worked solution) into one dict,
which fills the question and the reasoning in either language. Difficulty scales the size of the
numbers. The person's name is a function of the numbers, so a problem's text depends only on its key
and its language.
"""

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from nanoseek.tasks.base import Problem, Task
from nanoseek.tasks.format import FORMAT_INSTRUCTIONS, parse_int

NAMES = {
    "en": ["Tom", "Anna", "Lucas", "Mia", "Omar", "Sara"],
    "zh": ["小明", "小红", "小刚", "小丽", "小华", "小芳"],
}


@dataclass(frozen=True)
class Template:
    name: str
    # (rng, top) -> numbers, intermediate values and "ans"
    draw: Callable[[random.Random, int], dict]
    question: dict[str, str]
    steps: dict[str, str]
    units: dict[str, tuple[str, ...]]  # accepted after the number in an answer


def _shopping(rng, top):
    n, p = rng.randint(2, 9), rng.randint(2, top)
    cost = n * p
    bill = (cost // 10 + 1 + rng.randint(0, 3)) * 10
    return dict(n=n, p=p, cost=cost, bill=bill, ans=bill - cost)


def _ages(rng, top):
    a = rng.randint(3, 12 + top // 10)
    k = rng.randint(2, 5)
    y = rng.randint(1, 20)
    return dict(a=a, k=k, y=y, old=a * k, ans=a * k + y)


def _speed(rng, top):
    v1 = rng.randint(3, 3 * top)
    t1 = rng.randint(1, 5)
    v2 = rng.randint(3, 3 * top)
    t2 = rng.randint(1, 5)
    return dict(v1=v1, t1=t1, v2=v2, t2=t2, d1=v1 * t1, d2=v2 * t2, ans=v1 * t1 + v2 * t2)


def _sharing(rng, top):
    k, q = rng.randint(2, 9), rng.randint(2, top)
    r = rng.randint(0, k - 1)
    return dict(total=k * q + r, k=k, r=r, ans=q)


def _fence(rng, top):
    l = rng.randint(2, top)
    w = rng.randint(1, l)
    return dict(l=l, w=w, s=l + w, ans=2 * (l + w))


def _savings(rng, top):
    s, wk = rng.randint(2, top), rng.randint(2, 12)
    c = rng.randint(1, s * wk - 1)
    return dict(s=s, wk=wk, c=c, saved=s * wk, ans=s * wk - c)


def _factory(rng, top):
    r = rng.randint(2, top)
    m = rng.randint(2, 6)
    h = rng.randint(2, 8)
    return dict(r=r, m=m, h=h, per=r * m, ans=r * m * h)


def _reading(rng, top):
    r = rng.randint(2, top)
    d = rng.randint(2, 9)
    left = rng.randint(1, 2 * top)
    return dict(r=r, d=d, read=r * d, p=r * d + left, ans=left)


TEMPLATES = [
    Template(
        "shopping",
        _shopping,
        {
            "en": "{name} buys {n} notebooks at {p} dollars each and pays with {bill} dollars. "
            "How much change does {name} get, in dollars?",
            "zh": "{name}买了{n}本笔记本，每本{p}元，付了{bill}元。应该找回多少元？",
        },
        {
            "en": "Cost: {n} × {p} = {cost}.\nChange: {bill} - {cost} = {ans}.",
            "zh": "花费：{n} × {p} = {cost}。\n找回：{bill} - {cost} = {ans}。",
        },
        {"en": ("dollars",), "zh": ("元",)},
    ),
    Template(
        "ages",
        _ages,
        {
            "en": "{name} is {a} years old. {name}'s grandfather is {k} times as old. "
            "How old will the grandfather be in {y} years?",
            "zh": "{name}今年{a}岁，爷爷的年龄是{name}的{k}倍。{y}年后爷爷多少岁？",
        },
        {
            "en": "Grandfather now: {a} × {k} = {old}.\nIn {y} years: {old} + {y} = {ans}.",
            "zh": "爷爷现在：{a} × {k} = {old}。\n{y}年后：{old} + {y} = {ans}。",
        },
        {"en": ("years old", "years"), "zh": ("岁",)},
    ),
    Template(
        "speed",
        _speed,
        {
            "en": "A car drives at {v1} km per hour for {t1} hours, "
            "then at {v2} km per hour for {t2} hours. "
            "How many kilometres does it drive in total?",
            "zh": "一辆汽车以每小时{v1}千米的速度行驶了{t1}小时，"
            "然后以每小时{v2}千米的速度行驶了{t2}小时。一共行驶了多少千米？",
        },
        {
            "en": "First part: {v1} × {t1} = {d1}.\n"
            "Second part: {v2} × {t2} = {d2}.\n"
            "Total: {d1} + {d2} = {ans}.",
            "zh": "第一段：{v1} × {t1} = {d1}。\n"
            "第二段：{v2} × {t2} = {d2}。\n"
            "一共：{d1} + {d2} = {ans}。",
        },
        {"en": ("km", "kilometres", "kilometers"), "zh": ("千米", "公里")},
    ),
    Template(
        "sharing",
        _sharing,
        {
            "en": "{total} candies are shared equally among {k} children, "
            "each getting as many as possible. How many candies does each child get?",
            "zh": "把{total}颗糖平均分给{k}个小朋友，每人尽量多分。每个小朋友分到几颗？",
        },
        {
            "en": "{total} ÷ {k} = {ans} remainder {r}.\nEach child gets {ans}.",
            "zh": "{total} ÷ {k} = {ans} 余 {r}。\n每人分到 {ans} 颗。",
        },
        {"en": ("candies",), "zh": ("颗",)},
    ),
    Template(
        "fence",
        _fence,
        {
            "en": "A rectangular garden is {l} metres long and {w} metres wide. "
            "A fence goes all the way around it. How many metres of fence are needed?",
            "zh": "一个长方形花园长{l}米，宽{w}米。沿花园四周围一圈篱笆，需要多少米篱笆？",
        },
        {
            "en": "Perimeter = 2 × ({l} + {w}) = 2 × {s} = {ans}.",
            "zh": "周长 = 2 × ({l} + {w}) = 2 × {s} = {ans}。",
        },
        {"en": ("metres", "meters", "m"), "zh": ("米",)},
    ),
    Template(
        "savings",
        _savings,
        {
            "en": "{name} saves {s} dollars every week for {wk} weeks, "
            "then spends {c} dollars on a gift. How many dollars are left?",
            "zh": "{name}每周存{s}元，存了{wk}周，然后花{c}元买了一份礼物。还剩多少元？",
        },
        {
            "en": "Saved: {s} × {wk} = {saved}.\nLeft: {saved} - {c} = {ans}.",
            "zh": "存了：{s} × {wk} = {saved}。\n还剩：{saved} - {c} = {ans}。",
        },
        {"en": ("dollars",), "zh": ("元",)},
    ),
    Template(
        "factory",
        _factory,
        {
            "en": "A machine makes {r} toys per hour. "
            "How many toys do {m} such machines make in {h} hours?",
            "zh": "一台机器每小时生产{r}个玩具。{m}台这样的机器{h}小时一共生产多少个玩具？",
        },
        {
            "en": "Per hour: {r} × {m} = {per}.\nIn {h} hours: {per} × {h} = {ans}.",
            "zh": "每小时：{r} × {m} = {per}。\n{h}小时：{per} × {h} = {ans}。",
        },
        {"en": ("toys",), "zh": ("个",)},
    ),
    Template(
        "reading",
        _reading,
        {
            "en": "A book has {p} pages. {name} reads {r} pages a day. "
            "How many pages are left after {d} days?",
            "zh": "一本书有{p}页，{name}每天读{r}页。{d}天后还剩多少页？",
        },
        {
            "en": "Read: {r} × {d} = {read}.\nLeft: {p} - {read} = {ans}.",
            "zh": "读了：{r} × {d} = {read}。\n还剩：{p} - {read} = {ans}。",
        },
        {"en": ("pages",), "zh": ("页",)},
    ),
]


# each template's answer as one arithmetic expression of its numbers (what a calculator tool is
# asked in the SFT's tool-use conversations, data/conversations.py)
EXPRESSIONS = {
    "shopping": "{bill} - {n} * {p}",
    "ages": "{a} * {k} + {y}",
    "speed": "{v1} * {t1} + {v2} * {t2}",
    "sharing": "{total} // {k}",
    "fence": "2 * ({l} + {w})",
    "savings": "{s} * {wk} - {c}",
    "factory": "{r} * {m} * {h}",
    "reading": "{p} - {r} * {d}",
}


class WordProblems(Task):
    name = "word_problems"
    max_answer_chars = 40

    def sample(self, rng: random.Random, difficulty: int, lang: str) -> Problem:
        template = rng.choice(TEMPLATES)
        values = template.draw(rng, 10 * 3 ** (difficulty - 1))
        key = f"{template.name}:{sorted(values.items())}"
        names = NAMES[lang]
        name = names[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(names)]
        question = template.question[lang].format(name=name, **values)
        return self.problem(
            key=key,
            lang=lang,
            prompt=f"{question} {FORMAT_INSTRUCTIONS[lang]}",
            answer=str(values["ans"]),
            reasoning=template.steps[lang].format(**values),
            template=template.name,
            units=template.units[lang],
            expression=EXPRESSIONS[template.name].format(**values),
        )

    def score(self, problem: Problem, answer: str) -> tuple[float, str | None]:
        value = parse_int(answer, problem.metadata["units"])
        if value is None:
            return 0.0, "not_an_integer"
        return (1.0, None) if value == int(problem.answer) else (0.0, "wrong")
