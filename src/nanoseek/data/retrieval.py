"""Generated retrieval/copy text for pretraining: facts stated, other text, the facts asked for.

A document is a stream, in English or Chinese. Facts about made-up people, things and codes (a
phone number, where an item was left, what a code stands for, a birthday, a room) are stated in
small groups, so that several are alive at once; between them runs ordinary prose from the corpus
itself; and each fact is asked for, and answered, once it is `lag` tokens old. Lags are drawn
log-uniformly (LAG_TOKENS), documents are 64 to 2000 tokens long before their last questions
(DOC_TOKENS), so the same text teaches copying at 256 tokens (pretraining), at 1024 (the
long-context stage) and beyond.

Why a stream rather than one fact, filler, one question: the packed loader cuts long documents into
rows of the training length (data/shards.py), and the long-context stage reads the same shards as
pretraining, only in longer rows. A row cut out of a stream still holds every question whose fact
it also holds, so a long document is not wasted at 256 tokens, and at 1024 the longer lags count.

Why corpus prose between the facts rather than generated filler: the model still learns language
from it (it is the text it pretrains on anyway); it is never the same twice, so the model cannot
learn to skip a pattern; and it shares nothing with the passkey eval's repetitive filler. Only
documents that no build puts in the validation split are quoted (`corpus_prose`), so held-out bits
per byte stay held out.

Hard rule: nothing here shares wording with tasks/passkey.py (its intro, filler, needle, question
and reasoning): no word 4-gram, and for Chinese no 4-character sequence. `passkey_ngrams` lists
them; prose sentences and whole documents that contain one are dropped, and the tests check.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

# Documents are this many tokens long before their last questions, log-uniformly; with the
# questions still due at the end, about 30% are longer than 1024 tokens.
DOC_TOKENS = (64, 2000)
# Characters per token of each language's text in the default corpus's 8192 tokenizer (measured on
# the cpu report: en 3.6 bytes/token; zh 2.9 bytes/token at 3 bytes per character, with ASCII
# digits and punctuation in between); used only to size documents and lags.
CHARS_PER_TOKEN = {"en": 3.6, "zh": 1.1}
# A fact is asked for this many tokens after it was stated, log-uniformly, up to the document's
# planned length: about 70% of lags fit a 256-token row, and most of the rest a
# 1024-token row; a longer lag cannot be learnt from rows of 1024 but shows the model more text.
LAG_TOKENS = (4, 1536)
PROSE_TOKENS = (10, 400)  # one stretch of prose between facts
# The default budget: about 1 M tokens (digits and names tokenize finely: ~2.8 bytes a token), next
# to the 7.6 M tokens of the other default sources (the 2026-11-22 cpu run), so ≈11% of what
# pretraining reads. Presets set data.retrieval_bytes.
RETRIEVAL_BYTES = 2_800_000
SEED = 0

# --------------------------------------------------------------------------------------- vocabulary
_EN_FIRST = (
    "Mara Tobias Lena Oskar Priya Hugo Nadia Felix Ines Rafael Greta Milo Sofia Dmitri Alma Jonah "
    "Yara Emil Clara Anton Leila Victor Noor Bruno Hana Silas Freya Omar Petra Caleb Zara Ivo "
    "Beatrix Kenji Ruth Marcel Dalia Otto Selma Tariq"
).split()
_EN_LAST = (
    "Quill Harrow Lindqvist Abara Fenwick Moreau Castillo Brandt Okafor Whitlock Novak Devereux "
    "Sato Kowalski Ferreira Haldane Marsh Iqbal Rasmussen Tolle Carvalho Beaumont Nakamura Voss "
    "Ellery Mendel Arkwright Solberg Pryce Gallo Thorne Duval Keane Lisowski Farrow Ortega Baines "
    "Aldridge Whitcombe Strand"
).split()
_EN_ITEMS = (
    "umbrella|red notebook|spare key|brass compass|violin case|blue scarf|camera|map of the coast|"
    "silver watch|toolbox|lantern|chess set|green kettle|telescope|wool blanket|letter|passport|"
    "paintbrush|tin of biscuits|hiking boots|radio|jar of honey|hammer|sketchbook"
).split("|")
_EN_PLACES = (
    "attic|garden shed|blue cupboard|car boot|kitchen drawer|library|cellar|back porch|office safe|"
    "bakery|train station|boathouse|hallway closet|greenhouse|old barn|post office|workshop|"
    "laundry room|music room|school gym|pantry|garage|lighthouse|museum cloakroom"
).split("|")
_EN_MONTHS = (
    "January February March April May June July August September October November December"
).split()
_ZH_SURNAMES = "赵钱孙李周吴郑王冯陈褚卫蒋沈韩杨朱秦尤许何吕施张孔曹严华金魏陶姜"
_ZH_GIVEN = "明华伟芳娜静丽强磊军洋勇艳杰涛超秀英霞平刚桂兰文辉鹏飞宇欣悦琳晨阳帆"
_ZH_ITEMS = (
    "雨伞|红色笔记本|备用钥匙|铜罗盘|小提琴盒|蓝围巾|照相机|海岸地图|银手表|工具箱|灯笼|象棋|"
    "绿水壶|望远镜|羊毛毯|信封|护照|画笔|饼干罐|登山鞋|收音机|蜂蜜罐|锤子|素描本"
).split("|")
_ZH_PLACES = (
    "阁楼|花园小屋|蓝色橱柜|汽车后备箱|厨房抽屉|图书馆|地下室|后门廊|办公室保险柜|面包店|火车站|"
    "船坞|走廊壁橱|温室|旧谷仓|邮局|工作间|洗衣房|音乐室|学校体育馆|食品储藏室|车库|灯塔|博物馆衣帽间"
).split("|")
_CODE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
# Numbers that belong to someone or to a place: the same question ("what is the X?") in dozens of
# wordings, so that answering it means finding the statement about X, not recalling a template
_EN_NUMBERS = (
    "locker combination|ticket number|order number|account number|door code|parcel number|"
    "serial number|membership number|table number|seat number|licence number|invoice number|"
    "booking reference|gate number|alarm code|safe combination|badge number|case number|"
    "file number|tracking number|flight number|claim number|permit number|library card number|"
    "access code|lottery number|bus route|shelf number|batch number|meter reading"
).split("|")
_ZH_NUMBERS = (
    "储物柜号码|车票号码|订单号|银行账号|门禁码|包裹单号|序列号|会员卡号|桌号|座位号|驾照号码|"
    "发票号|预订编号|登机口号|报警器代码|保险箱组合|工牌号|案件编号|档案编号|快递单号|航班号|"
    "理赔编号|许可证号|借书证号|彩票号码|公交线路|货架编号|批次号|电表读数|车牌尾号"
).split("|")

# Each kind of fact: statements, questions, answers ({who}/{item}/{code} name it, {value} is what
# must be copied). Every question names its subject, so several facts can be alive at once.
_KINDS = {
    "en": {
        "phone": (
            [
                "{who}'s phone number is {value}.",
                "You can call {who} on {value}.",
                "The telephone number of {who} is {value}.",
            ],
            ["What is {who}'s phone number?", "Which number should I dial for {who}?"],
            ["{value}", "{who}'s phone number is {value}."],
        ),
        "place": (
            ["{who} left the {item} in the {value}.", "The {item} of {who} is in the {value}."],
            ["Where did {who} leave the {item}?", "Where is the {item} of {who}?"],
            ["In the {value}.", "The {item} is in the {value}."],
        ),
        "code": (
            ["Code {code} stands for {value}.", "The code word {code} means {value}."],
            ["What does code {code} stand for?", "Which value goes with code {code}?"],
            ["{value}", "Code {code} stands for {value}."],
        ),
        "birthday": (
            ["{who} was born on {value}.", "The birthday of {who} falls on {value}."],
            ["When was {who} born?", "On which date was {who} born?"],
            ["On {value}.", "{who} was born on {value}."],
        ),
        "room": (
            ["{who} sleeps in room {value}.", "Room {value} belongs to {who}."],
            ["Which room does {who} sleep in?", "In what room does {who} stay?"],
            ["Room {value}.", "{who} sleeps in room {value}."],
        ),
        "number": (
            [
                "The {thing} is {value}.",
                "{value} is the {thing}.",
                "Note that the {thing} is {value}.",
            ],
            ["What is the {thing}?", "Which number is the {thing}?", "Tell me the {thing}."],
            ["{value}", "The {thing} is {value}."],
        ),
    },
    "zh": {
        "phone": (
            ["{who}的电话号码为{value}。", "拨打{value}可以找到{who}。"],
            ["{who}的电话号码为多少？", "要找{who}，该拨哪个号码？"],
            ["{value}。", "{who}的电话号码为{value}。"],
        ),
        "place": (
            ["{who}把{item}放在了{value}。", "{who}的{item}在{value}里。"],
            ["{who}把{item}放在了哪里？", "{who}的{item}在哪里？"],
            ["在{value}。", "{item}在{value}。"],
        ),
        "code": (
            ["暗号{code}代表{value}。", "暗号{code}对应的数值为{value}。"],
            ["暗号{code}代表什么数？", "暗号{code}对应的数值为几？"],
            ["{value}。", "暗号{code}代表{value}。"],
        ),
        "birthday": (
            ["{who}生于{value}。", "{who}的生日在{value}。"],
            ["{who}生于哪一天？", "{who}的生日在哪天？"],
            ["{value}。", "{who}生于{value}。"],
        ),
        "room": (
            ["{who}住在{value}号房间。", "{value}号房间归{who}住。"],
            ["{who}住在几号房间？", "哪个房间归{who}住？"],
            ["{value}号房间。", "{who}住在{value}号房间。"],
        ),
        "number": (
            ["{thing}为{value}。", "{value}正是{thing}。", "请注意，{thing}为{value}。"],
            ["{thing}是什么？", "哪个数字是{thing}？", "请告诉我{thing}。"],
            ["{value}。", "{thing}为{value}。"],
        ),
    },
}
# How often each kind is drawn, relative to the others (1 if not listed)
KIND_WEIGHTS = {"number": 3}
_EN_SHORT_NOUNS = ("number", "code", "figure", "combination", "reference", "digits", "count")
_ZH_SHORT_NOUNS = ("号码", "编号", "代码", "数字", "口令", "暗码", "序号")
_HEADINGS = {
    "en": ["Notes", "Things to remember", "Records", "Notebook", "Memo", "Facts and questions"],
    "zh": ["备忘录", "记事本", "笔记", "要记下的事", "记录"],
}
_QA = {
    "en": [("Question: ", "Answer: "), ("Q: ", "A: ")],
    "zh": [("问：", "答："), ("问题：", "答案：")],
}
_JOIN = {"en": " ", "zh": ""}


# ------------------------------------------------------------------------------------ passkey guard
@functools.lru_cache(maxsize=1)
def passkey_ngrams() -> dict[str, frozenset]:
    """The word 4-grams (English) and 4-character sequences (Chinese) of every string in
    tasks/passkey.py's TEXT, read piecewise around its {key} placeholders. Nothing this module
    writes may contain one. -> {"en": {("the", "pass", "key", "is"), ...}, "zh": {"通行密码", ...}}
    """
    from nanoseek.tasks.passkey import TEXT

    en: set = set()
    zh: set = set()
    for template in TEXT["en"].values():
        for piece in template.split("{key}"):
            en |= word_ngrams(piece)
    for template in TEXT["zh"].values():
        for piece in template.split("{key}"):
            zh |= char_ngrams(piece)
    return {"en": frozenset(en), "zh": frozenset(zh)}


def word_ngrams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def char_ngrams(text: str, n: int = 4) -> set[str]:
    """Every n-character window of the text, and of its CJK characters alone (so that a
    punctuation mark in between does not hide a shared sequence)."""
    out = set()
    for s in (text, "".join(_CJK.findall(text))):
        s = s.replace("\n", "")
        out |= {s[i : i + n] for i in range(len(s) - n + 1)}
    return out


_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def shares_passkey_wording(text: str, grams: dict[str, frozenset] | None = None) -> bool:
    grams = grams or passkey_ngrams()
    return bool(word_ngrams(text) & grams["en"]) or bool(char_ngrams(text) & grams["zh"])


# ------------------------------------------------------------------------------------------- prose
def sentences(text: str) -> list[str]:
    """A document's text cut into sentences (English . ! ? before a space, Chinese 。！？)."""
    text = " ".join(text.split()) if not _CJK.search(text) else re.sub(r"\s+", "", text)
    parts = re.split(r"(?<=[.!?])\s+|(?<=[。！？])(?![”」])|(?<=[。！？][”」])", text)
    return [p.strip() for p in parts if p.strip()]


class ProsePool(Sequence):
    """Documents as lists of sentences (the title line dropped), each cut when first used: a
    build quotes a small part of the 13 MB of default prose. Sentences that share passkey
    wording are skipped when a passage is cut (`_passage`)."""

    def __init__(self, documents: Iterable[str]):
        self.docs = [d for d in documents if d.strip()]
        self._cut: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        if i not in self._cut:
            head, _, body = self.docs[i].partition("\n\n")
            self._cut[i] = sentences(body or head) or [head.strip()]
        return self._cut[i]

    def __add__(self, other: ProsePool) -> ProsePool:
        return ProsePool(self.docs + other.docs)


def prose_pool(documents: Iterable[str]) -> ProsePool:
    """A ProsePool of these documents."""
    return ProsePool(documents)


def corpus_prose(val_margin: float = 0.05) -> dict[str, ProsePool]:
    """English (Bible chapters, Wikipedia leads) and Chinese (三国演义 chapters) prose from the
    default corpus's packages, without any document whose content hash could put it in a
    validation split of up to `val_margin` (the default build holds out 1%; see corpus._is_val)."""
    from nanoseek.data.corpus import (
        _bible_chapters,
        _is_val,
        _sanguo_chapters,
        _sha,
        _wiki_articles,
        clean,
    )

    def train_only(docs: Iterable[str]) -> Iterator[str]:
        for doc in docs:
            text = clean(doc)
            if not _is_val(_sha(text), val_margin):
                yield text

    en = prose_pool(train_only(_bible_chapters())) + prose_pool(train_only(_wiki_articles()))
    return {"en": en, "zh": prose_pool(train_only(_sanguo_chapters()))}


def _passage(pool: Sequence[Sequence[str]], chars: int, rng: random.Random, lang: str) -> str:
    """Consecutive sentences of a prose document from a random start, about `chars` long; at the
    end of a document it goes on with another one. A sentence that shares passkey wording is
    left out."""
    grams = passkey_ngrams()
    out = []
    size = 0
    doc = rng.choice(pool)
    i = rng.randrange(len(doc))
    for _ in range(10_000):  # a pool of nothing but passkey wording must not loop forever
        if size >= chars:
            break
        if i == len(doc):
            doc = rng.choice(pool)
            i = 0
        if not shares_passkey_wording(doc[i], grams):
            out.append(doc[i])
            size += len(doc[i]) + 1
        i += 1
    return _JOIN[lang].join(out)


# ------------------------------------------------------------------------------------------- facts
def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(max(lo, hi))))


class _Subjects:
    """Made-up people, items and codes, never used twice in one document."""

    def __init__(self, rng: random.Random, lang: str, prose: Sequence[Sequence[str]] = ()):
        self.rng = rng
        self.lang = lang
        self.prose = prose
        self.used: set[str] = set()

    def _fresh(self, make: Callable[[], str]) -> str:
        for _ in range(1000):
            s = make()
            if s not in self.used:
                self.used.add(s)
                return s
        raise RuntimeError("ran out of fresh subjects")  # a document holds far fewer facts

    def person(self) -> str:
        r = self.rng
        if self.lang == "en":
            return self._fresh(lambda: f"{r.choice(_EN_FIRST)} {r.choice(_EN_LAST)}")
        return self._fresh(
            lambda: r.choice(_ZH_SURNAMES) + "".join(r.choices(_ZH_GIVEN, k=r.choice((1, 2))))
        )

    def code(self) -> str:
        r = self.rng
        return self._fresh(lambda: r.choice(_CODE_LETTERS) + str(r.randint(100, 999)))

    def item(self) -> str:
        return self.rng.choice(_EN_ITEMS if self.lang == "en" else _ZH_ITEMS)

    def thing(self) -> str:
        """A number's name, unique in the document: whose it is, what place it is for, or a word
        of the prose before a short noun ("the harvest code"), a name the model has never seen
        named, which its answer can only copy from the question."""
        r = self.rng
        en = self.lang == "en"
        if self.prose and r.random() < 0.4:
            nouns = _EN_SHORT_NOUNS if en else _ZH_SHORT_NOUNS
            return self._fresh(lambda: f"{self._prose_word()}{' ' * en}{r.choice(nouns)}")
        if en:
            number = r.choice(_EN_NUMBERS)
            return self._fresh(
                lambda: (
                    f"{number} for the {r.choice(_EN_PLACES)}"
                    if r.random() < 0.5
                    else f"{number} of {r.choice(_EN_FIRST)} {r.choice(_EN_LAST)}"
                )
            )
        number = r.choice(_ZH_NUMBERS)
        return self._fresh(
            lambda: (
                f"{r.choice(_ZH_PLACES)}的{number}"
                if r.random() < 0.5
                else f"{self.person()}的{number}"
            )
        )

    def _prose_word(self) -> str:
        """An English word of four letters or more, or two Chinese characters, from the prose."""
        r = self.rng
        for _ in range(100):
            sentence = r.choice(r.choice(self.prose))
            if self.lang == "en":
                words = [w.lower() for w in re.findall(r"[A-Za-z]{4,12}", sentence)]
            else:
                words = [m[:2] for m in re.findall(r"[\u4e00-\u9fff]{2,}", sentence)]
            if words:
                return r.choice(words)
        return "spare" if self.lang == "en" else "备用"


def _value(kind: str, rng: random.Random, lang: str) -> str:
    if kind in ("phone", "code", "number"):
        digits = rng.choice((3, 4, 5, 5, 5, 6))  # mostly five digits, as a key usually is
        return str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    if kind == "place":
        return rng.choice(_EN_PLACES if lang == "en" else _ZH_PLACES)
    if kind == "room":
        return str(rng.randint(1, 999))
    year = rng.randint(1900, 2024)
    month = rng.randint(1, 12)
    day = rng.randint(1, 28)
    return f"{_EN_MONTHS[month - 1]} {day}, {year}" if lang == "en" else f"{year}年{month}月{day}日"


def _fact(rng: random.Random, lang: str, subjects: _Subjects) -> dict:
    kinds = list(_KINDS[lang])
    kind = rng.choices(kinds, weights=[KIND_WEIGHTS.get(k, 1) for k in kinds])[0]
    names = {"value": _value(kind, rng, lang)}
    if kind == "number":
        names["thing"] = subjects.thing()
    else:
        names["who"] = subjects.person()
    if kind == "code":
        names["code"] = subjects.code()
    if kind == "place":
        names["item"] = subjects.item()
    stated, asked, answered = _KINDS[lang][kind]
    return {
        "statement": rng.choice(stated).format(**names),
        "question": rng.choice(asked).format(**names),
        "answer": rng.choice(answered).format(**names),
        "value": names["value"],
    }


def retrieval_document(
    rng: random.Random, lang: str, prose: Sequence[Sequence[str]], tokens: int | None = None
) -> tuple[str, list[dict]]:
    """One document of about `tokens` tokens (default: drawn from DOC_TOKENS) ->
    (text, the facts with the character offsets where each was stated and asked)."""
    cpt = CHARS_PER_TOKEN[lang]
    length = int(cpt * (tokens or _log_uniform(rng, *DOC_TOKENS)))
    lag_cap = max(length, 64 * cpt)  # a short document stays short: its lags stay short
    ask, answer = rng.choice(_QA[lang])
    subjects = _Subjects(rng, lang, prose)
    parts = [rng.choice(_HEADINGS[lang]) + "\n"]
    pos = len(parts[0])
    pending: list[dict] = []  # stated, not yet asked; each with its "due" offset
    facts = []

    def emit(text: str) -> None:  # one block, on its own lines
        nonlocal pos
        parts.append(text + "\n")
        pos += len(text) + 1

    while pos < length or pending or not facts:
        # due, or so nearly due that not even a sentence of prose fits before it
        due = sorted((f for f in pending if f["due"] <= pos + 8 * cpt), key=lambda f: f["due"])
        if due:
            for f in due:
                pending.remove(f)
                f["asked_at"] = pos + len(ask)  # where its question starts
                emit(f"{ask}{f['question']}\n{answer}{f['answer']}")
            continue
        if (pos < length and rng.random() < 0.4) or not (facts or pos < length):
            group = [_fact(rng, lang, subjects) for _ in range(rng.choice((1, 2, 2, 3)))]
            start = pos
            emit(_JOIN[lang].join(f["statement"] for f in group))
            for f in group:
                f["stated_at"] = start  # where its statement starts
                start += len(f["statement"]) + len(_JOIN[lang])
                lag = _log_uniform(rng, LAG_TOKENS[0] * cpt, min(LAG_TOKENS[1] * cpt, lag_cap))
                f["due"] = pos + int(lag)
                pending.append(f)
                facts.append(f)
            continue
        gap = _log_uniform(rng, PROSE_TOKENS[0] * cpt, PROSE_TOKENS[1] * cpt)
        # no prose past the planned length, or the next question's due point, but a sentence
        gap = min([gap, *(f["due"] - pos for f in pending), *([length - pos] * (pos < length))])
        emit(_passage(prose, int(gap), rng, lang))
    return "".join(parts).strip() + "\n", facts


def retrieval_documents(
    max_bytes: int = RETRIEVAL_BYTES,
    prose: dict[str, Sequence[Sequence[str]]] | None = None,
    *,
    seed: int = SEED,
    langs: Sequence[str] = ("en", "zh"),
) -> Iterator[str]:
    """Documents in alternating languages until `max_bytes` of UTF-8 text; deterministic in
    `seed` and the prose (default: corpus_prose())."""
    prose = corpus_prose() if prose is None else prose
    grams = passkey_ngrams()
    used = 0
    i = 0
    while used < max_bytes:
        lang = langs[i % len(langs)]
        text, _ = retrieval_document(random.Random(f"retrieval|{seed}|{i}"), lang, prose[lang])
        i += 1
        if shares_passkey_wording(text, grams):  # a 4-gram across a seam of prose: drop it
            continue
        used += len(text.encode("utf-8"))
        yield text


# ------------------------------------------------------------------------------------ conversations
# SFT's retrieval questions: a short passage with facts inside prose, then one fact asked for in
# the chat format, answered by quoting the statement (reasoning) and giving the value (<answer>).
# This is what the passkey eval asks of a chat model, in other words: pretraining's streams teach
# copying from far back, these teach answering a question about the text in the R1 format.
# the passage's length in tokens, log-uniformly (default); with the 4096 tokenizer about a third of
# these conversations are longer than 256 tokens (names and digits tokenize finely)
CONVERSATION_TOKENS = (40, 180)


def retrieval_conversation(
    rng: random.Random, lang: str, prose: Sequence[Sequence[str]], tokens: int
) -> tuple[str, dict]:
    """One passage of about `tokens` tokens with one to three facts at random depths ->
    (the user's prompt, the fact that it asks for)."""
    from nanoseek.tasks.format import FORMAT_INSTRUCTIONS

    cpt = CHARS_PER_TOKEN[lang]
    subjects = _Subjects(rng, lang, prose)
    facts = [_fact(rng, lang, subjects) for _ in range(rng.choice((1, 1, 2, 3)))]
    prose_chars = max(0, int(tokens * cpt) - sum(len(f["statement"]) for f in facts))
    cuts = sorted(rng.random() for _ in facts)
    shares = [b - a for a, b in zip([0.0, *cuts], [*cuts, 1.0])]
    parts = []
    for i, share in enumerate(shares):
        if int(share * prose_chars) > 0:
            parts.append(_passage(prose, int(share * prose_chars), rng, lang))
        if i < len(facts):
            parts.append(facts[i]["statement"])
    asked = rng.choice(facts)
    text = _JOIN[lang].join(p for p in parts if p)
    prompt = (
        f"{rng.choice(_HEADINGS[lang])}\n{text}\n{asked['question']} {FORMAT_INSTRUCTIONS[lang]}"
    )
    return prompt, asked


def retrieval_conversations(
    n: int,
    prose: dict[str, Sequence[Sequence[str]]] | None = None,
    *,
    seed: int = SEED,
    langs: Sequence[str] = ("en", "zh"),
    tokens: tuple[int, int] = CONVERSATION_TOKENS,
) -> list[list[dict]]:
    """`n` SFT conversations (alternating languages), each a passage of `tokens` tokens (a range,
    drawn log-uniformly) with facts and one question about it: reasoning quotes the fact's
    statement, the answer is its value. Deterministic in `seed` and the prose (default:
    corpus_prose()); none shares wording with the passkey eval."""
    if n <= 0:
        return []
    low, high = tokens
    if not 0 < low <= high:
        raise ValueError(f"retrieval passage lengths must be 0 < low <= high, got {tokens!r}")
    prose = corpus_prose() if prose is None else prose
    grams = passkey_ngrams()
    out = []
    i = 0
    while len(out) < n:
        lang = langs[i % len(langs)]
        rng = random.Random(f"retrieval-chat|{seed}|{i}")
        i += 1
        prompt, fact = retrieval_conversation(
            rng, lang, prose[lang], round(_log_uniform(rng, low, high))
        )
        if shares_passkey_wording(prompt, grams):
            continue
        out.append(
            [
                {"role": "user", "content": prompt},
                {
                    "role": "assistant",
                    "reasoning_content": fact["statement"],
                    "content": f"<answer>{fact['value']}</answer>",
                },
            ]
        )
    return out
