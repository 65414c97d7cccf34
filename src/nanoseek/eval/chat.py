"""The chat eval: does the chat model recall text it pretrained on but was never quizzed on in SFT,
and does it know who it is?

    openings   for every held-out Bible and 三国演义 chapter (data/conversations.py `held_out`:
               SFT never asks about them, pretraining read them), "How does <chapter> begin?",
               asked as SFT asks about the other chapters, greedy, through the Engine and the chat
               template. Each answer is graded
                 exact     the chapter's opening sentence is in the answer (both normalized: NFKC,
                           lower case, letters, digits and CJK characters only);
                 relevant  not exact, but about the chapter (`relevant`, below);
                 neither   anything else, word salad included.
    identity   every question about the model that SFT trains, both languages: is the answer the
               trained one (normalized), and does it name nanoseek?

Shares come with 95% Wilson intervals (eval.stats.wilson_interval), plus a few samples.

`relevant`, the stated criterion. An answer's content units are its distinct English content
words (3+ letters, not a function word) or its distinct pairs of adjacent Chinese characters, less
any unit of the question or of the answer's template ("<chapter> begins:", "第…回开头写道"), which
the model can copy without knowing the chapter. The answer is relevant when
  1. it has at least MIN_UNITS units (a few echoed words prove nothing),
  2. at least half of them occur in the chapter (mostly drawn from it), and
  3. the chapter contains a larger share of them than at least 90% of the source's other chapters
     do (specific to it: generic Bible or 三国演义 language, "the LORD said to Moses" or "曹操",
     occurs in many chapters and fails here).
Character pairs rather than single characters for Chinese: most single characters of any 三国演义
answer occur in every chapter.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from nanoseek.data.chat_tokens import completion_text, prompt_ids
from nanoseek.data.conversations import identity_questions, opening_questions
from nanoseek.eval.stats import wilson_interval

MIN_UNITS = 4
MIN_OWN_SHARE = 0.5
SPECIFICITY = 0.9  # the chapter must beat this share of the source's other chapters
MAX_NEW_TOKENS = 192  # a 240-character opening with its thought, or 120 Chinese characters
SAMPLES = 6
_EN_STOP = set(
    """the and that for with his her him they them their this these those from have has had
    was were are not but you your yours our ours who whom which what when where why how all any
    one two said unto shall will would into upon out over then than there here also because
    its it's she he we let may might can could should been being did does done very some such
    each every more most other only own same too just now""".split()
)
# words of SFT's answer and thought templates for these questions (the question's own are removed
# separately): "<head> begins: ...", "<head> is a chapter of the Bible. I recall its first
# sentence.", "第…回开头写道：...", "用户想知道第…回的开头，我回忆原文的第一句。"
_TEMPLATE_UNITS = {
    "en": {"begins", "chapter", "bible", "recall", "first", "sentence"},
    "zh": {
        "回开",
        "开头",
        "头写",
        "写道",
        "用户",
        "户想",
        "想知",
        "知道",
        "我回",
        "回忆",
        "忆原",
        "原文",
        "文的",
        "的第",
        "第一",
        "一句",
        "回的",
        "的开",
    },
}
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]+")


def normalize(text: str) -> str:
    """NFKC, lower case, and only letters, digits and CJK characters: punctuation, quotes and
    spaces do not decide a match."""
    return "".join(re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", text).lower()))


def units(text: str, lang: str) -> set:
    """Distinct content words (en) or pairs of adjacent CJK characters (zh)."""
    text = unicodedata.normalize("NFKC", text).lower()
    if lang == "zh":
        return {run[i : i + 2] for run in _CJK.findall(text) for i in range(len(run) - 1)}
    return {w for w in re.findall(r"[a-z]+", text) if len(w) >= 3 and w not in _EN_STOP}


def answer_units(answer: str, question: str, lang: str) -> set:
    """The answer's units that neither the question nor the answer template supplies."""
    return units(answer, lang) - units(question, lang) - _TEMPLATE_UNITS[lang]


def relevant(answer: str, question: str, chapter: set, others: Sequence[set], lang: str) -> dict:
    """The criterion of the module docstring. `chapter`, `others`: the units (`units`) of the
    question's chapter and of the source's other chapters.
    -> {"relevant", "units", "own_share", "beaten_share"}."""
    mine = answer_units(answer, question, lang)
    if not mine:
        return {"relevant": False, "units": 0, "own_share": 0.0, "beaten_share": 0.0}
    own = len(mine & chapter) / len(mine)
    shares = [len(mine & o) / len(mine) for o in others]
    beaten = sum(own > s for s in shares) / len(shares) if shares else 1.0
    return {
        "relevant": len(mine) >= MIN_UNITS and own >= MIN_OWN_SHARE and beaten >= SPECIFICITY,
        "units": len(mine),
        "own_share": round(own, 4),
        "beaten_share": round(beaten, 4),
    }


def answer_text(completion: str) -> str:
    """The part of a completion after its thought (all of it when the thought never closes)."""
    return completion.split("</think>", 1)[1].strip() if "</think>" in completion else completion


def chapter_units(texts: Iterable[str], lang: str) -> dict[str, set]:
    """{chapter text: its units}, computed once for grading many answers."""
    return {t: units(t, lang) for t in texts}


def grade_opening(question: dict, completion: str, chapters: dict[str, set]) -> dict:
    """One answer to an opening_questions() item -> {"grade": exact|relevant|neither, ...}.
    `chapters`: chapter_units of every chapter of the question's source (its own included)."""
    answer = answer_text(completion)
    if normalize(question["opening"]) in normalize(answer):
        return {"grade": "exact"}
    own = chapters.get(question["text"]) or units(question["text"], question["lang"])
    others = [u for t, u in chapters.items() if t != question["text"]]
    r = relevant(answer, question["question"], own, others, question["lang"])
    return {"grade": "relevant" if r["relevant"] else "neither", **r}


def share(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "share": round(k / n, 4) if n else 0.0, "wilson95": [lo, hi]}


def _generate(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    from nanoseek.engine import Engine, SamplingParams

    ids = [prompt_ids(tok, p) for p in prompts]
    context = model.config.max_position_embeddings
    budget = min(max_new_tokens, context - max(len(x) for x in ids))
    if budget < 1:
        raise ValueError(f"the chat eval's questions do not fit the model's context ({context})")
    engine = Engine(
        model, None, max_batch_size=64, max_num_batched_tokens=max(2048, context), decode="eager"
    )
    params = SamplingParams(max_tokens=budget, temperature=0.0, stop_token_ids=[tok.eos_id])
    return [completion_text(tok, o.token_ids) for o in engine.generate(ids, params)]


def chat_eval(
    model,
    tok,
    records: Iterable[dict],
    *,
    n_questions: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    samples: int = SAMPLES,
    seed: int = 0,
) -> dict:
    """Ask `model` the held-out opening questions about `records` (a corpus's {"text", "source"}
    records, e.g. the run's corpus/train.jsonl) and the identity questions; grade them.
    -> {"openings": {"n", "exact", "relevant", "exact_or_relevant", "neither", "by_source",
    "samples"}, "identity": {"n", "trained_answer", "names_itself", "by_lang", "samples"}}."""
    records = [r for r in records if r.get("source") in ("bible-web", "sanguo")]
    questions = opening_questions(records, n_questions, seed=seed)
    chapters = {
        source: chapter_units((r["text"] for r in records if r["source"] == source), lang)
        for source, lang in (("bible-web", "en"), ("sanguo", "zh"))
    }
    idents = identity_questions()
    completions = _generate(model, tok, [q["question"] for q in questions + idents], max_new_tokens)
    graded = [
        {**grade_opening(q, c, chapters[q["source"]]), "completion": c}
        for q, c in zip(questions, completions)
    ]
    openings = _tally(questions, graded)
    openings["samples"] = _samples(questions, graded, samples)
    id_rows = []
    for q, c in zip(idents, completions[len(questions) :]):
        answer = answer_text(c)
        id_rows.append(
            {
                "lang": q["lang"],
                "question": q["question"],
                "answer": answer,
                "trained": normalize(q["answer"]) == normalize(answer),
                "names_itself": "nanoseek" in normalize(answer),
            }
        )
    identity = {
        "n": len(id_rows),
        "trained_answer": share(sum(r["trained"] for r in id_rows), len(id_rows)),
        "names_itself": share(sum(r["names_itself"] for r in id_rows), len(id_rows)),
        "by_lang": {
            lang: share(sum(r["trained"] for r in rows), len(rows))
            for lang in ("en", "zh")
            if (rows := [r for r in id_rows if r["lang"] == lang])
        },
        "samples": [next(r for r in id_rows if r["lang"] == lang) for lang in ("en", "zh")],
    }
    return {"openings": openings, "identity": identity, "settings": {"seed": seed}}


def _tally(questions: list[dict], graded: list[dict]) -> dict:
    def count(rows, *grades):
        return sum(g["grade"] in grades for g in rows)

    n = len(graded)
    out = {
        "n": n,
        "exact": share(count(graded, "exact"), n),
        "relevant": share(count(graded, "relevant"), n),
        "exact_or_relevant": share(count(graded, "exact", "relevant"), n),
        "neither": share(count(graded, "neither"), n),
        "by_source": {},
    }
    for source in sorted({q["source"] for q in questions}):
        rows = [g for q, g in zip(questions, graded) if q["source"] == source]
        out["by_source"][source] = {
            "n": len(rows),
            "exact": share(count(rows, "exact"), len(rows)),
            "exact_or_relevant": share(count(rows, "exact", "relevant"), len(rows)),
        }
    return out


def _samples(questions: list[dict], graded: list[dict], k: int) -> list[dict]:
    """Up to k samples: the best graded first, alternating sources, so both show."""
    order = {"exact": 0, "relevant": 1, "neither": 2}
    rows = sorted(
        range(len(graded)), key=lambda i: (order[graded[i]["grade"]], questions[i]["source"], i)
    )
    picked: list[int] = []
    for source in sorted({q["source"] for q in questions}):
        picked += [i for i in rows if questions[i]["source"] == source][: max(1, k // 2)]
    return [
        {
            "source": questions[i]["source"],
            "chapter": questions[i]["chapter"],
            "question": questions[i]["question"],
            "opening": questions[i]["opening"],
            "answer": answer_text(graded[i]["completion"]),
            "grade": graded[i]["grade"],
        }
        for i in sorted(picked, key=rows.index)[:k]
    ]


CHAT_STAGES = ("sft", "grpo", "distill")  # the chat models of a run


def needs_chat_eval(result: dict, stage: str, settings: dict | bool) -> bool:
    """Whether the eval stage should (re)run chat_eval_checkpoint for `stage` (preset
    eval.chat: its keyword arguments, {} for the defaults; absent or false for none): a chat
    model without a chat result for these settings."""
    return (
        settings not in (False, None)
        and stage in CHAT_STAGES
        and (result.get("chat") is None or result.get("chat_settings") != settings)
    )


def chat_eval_checkpoint(
    ckpt_dir: str | Path, corpus_dir: str | Path | None = None, **kwargs
) -> dict:
    """chat_eval on a checkpoint, about the chapters of `corpus_dir`/train.jsonl (a run's corpus:
    what the model pretrained on), or without one about the default corpus's Bible and 三国演义
    chapters outside its validation split."""
    import torch

    from nanoseek.checkpoint import load_model
    from nanoseek.data.corpus import CorpusError, iter_records
    from nanoseek.tokenizer import load_tokenizer

    model = load_model(ckpt_dir, dtype=torch.float32)
    tok = load_tokenizer(ckpt_dir)
    note = None
    if corpus_dir is not None and (Path(corpus_dir) / "train.jsonl").is_file():
        records = list(iter_records(Path(corpus_dir) / "train.jsonl"))
    else:
        try:
            records = _default_records()
        except CorpusError as e:  # no run corpus and no corpus packages: identity only
            records = []
            note = f"no chapters to ask about: {str(e).splitlines()[0]}"
    result = chat_eval(model, tok, records, **kwargs)
    if note:
        result["openings"]["note"] = note
    return result


def _default_records() -> list[dict]:
    from nanoseek.data.corpus import _bible_chapters, _is_val, _sanguo_chapters, _sha, clean

    out = []
    for source, docs in (("bible-web", _bible_chapters()), ("sanguo", _sanguo_chapters())):
        for doc in docs:
            text = clean(doc)
            if not _is_val(_sha(text), 0.01):
                out.append({"source": source, "text": text})
    return out


# ----------------------------------------------------------------------------------------- markdown
def _cell(s: dict) -> str:
    lo, hi = s["wilson95"]
    return f"{100 * s['share']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={s['n']})"


def chat_markdown(results: dict[str, dict]) -> list[str]:
    """{stage: evaluate-result with a "chat" entry} -> report lines (nothing without one)."""
    rows = {stage: r["chat"] for stage, r in results.items() if r.get("chat")}
    if not rows:
        return []
    lines = [
        "#### Chat: openings of held-out chapters, and identity (greedy)",
        "",
        "Chapters SFT never asked about (Bible, 三国演义), asked how they begin. *exact*: the "
        "opening sentence; *relevant*: most of the answer's content words / character pairs come "
        "from that chapter, more than from 90% of the other chapters (eval/chat.py). 95% Wilson "
        "intervals.",
        "",
        "| model | questions | exact | exact or relevant | neither | identity: trained answer "
        "| names itself |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage, c in rows.items():
        o = c["openings"]
        i = c["identity"]
        lines.append(
            f"| {stage} | {o['n']} | {_cell(o['exact'])} | {_cell(o['exact_or_relevant'])} | "
            f"{_cell(o['neither'])} | {_cell(i['trained_answer'])} | {_cell(i['names_itself'])} |"
        )
    stage, last = list(rows.items())[-1]
    lines += ["", f"Samples ({stage}):", ""]
    for s in last["openings"]["samples"] + last["identity"]["samples"]:
        answer = " ".join(s["answer"].split())[:300]
        grade = s.get("grade") or ("trained answer" if s.get("trained") else "other answer")
        lines += [f"- **{s['question']}** — {grade}", f"  > {answer or '(empty)'}"]
        if "opening" in s:
            lines.append(f"  (opening: {s['opening']})")
    lines.append("")
    return lines
