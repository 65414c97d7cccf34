"""Bits per byte on held-out text: a tokenizer-independent measure of
how well a model predicts language.

    bpb = (Σ over predicted tokens of −ln p(token | context)) / (ln 2 × UTF-8 bytes of the text)

Each document is encoded as BOS + text; every token after BOS is predicted once. Documents longer
than the window are cut into consecutive windows, so a window's first tokens see less context than
they would in one long pass (the usual non-overlapping estimate; it slightly overstates bpb). A
model that gives every token probability 1/V scores tokens × log2(V) / bytes, which the tests check.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.data.corpus import build_corpus, default_sources, iter_records
from nanoseek.model.transformer import IGNORE_INDEX

LANGS = ("en", "zh", "code")


@torch.no_grad()
def bits_per_byte(
    model, tok, texts: Sequence[str], seq_len: int | None = None, batch_size: int = 8
) -> dict:
    """-> {"bpb", "nats", "tokens" (predicted), "bytes", "docs"} for a list of texts."""
    seq_len = seq_len or model.config.max_position_embeddings
    device = next(model.parameters()).device
    windows = []  # (inputs, targets) of up to seq_len tokens
    for ids in tok.encode_batch(list(texts), add_bos=True):
        for start in range(0, len(ids) - 1, seq_len):
            chunk = ids[start : start + seq_len + 1]
            windows.append((chunk[:-1], chunk[1:]))
    model.eval()
    nats, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        width = max(len(x) for x, _ in batch)
        inputs = torch.full((len(batch), width), tok.pad_id, dtype=torch.long)
        targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            inputs[i, : len(x)] = torch.tensor(x)
            targets[i, : len(y)] = torch.tensor(y)
        logits = model(inputs.to(device)).float()
        nats += F.cross_entropy(
            logits.flatten(0, 1),
            targets.to(device).flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += int((targets != IGNORE_INDEX).sum())
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "bpb": nats / (math.log(2) * max(n_bytes, 1)),
        "nats": nats,
        "tokens": count,
        "bytes": n_bytes,
        "docs": len(texts),
    }


def heldout_texts(
    corpus_dir: str | Path | None = None, max_bytes: int = 50_000, langs: Sequence[str] = LANGS
) -> dict[str, list[str]]:
    """Up to max_bytes of validation text per language, from a corpus directory's val.jsonl or,
    without one, from the default corpus built on the fly. The split is by content hash, so these
    documents are held out of every default-corpus build, whatever its size cap."""
    if corpus_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            # the held-out text is en/zh/code only: no need to generate the retrieval text
            sources = default_sources(code_max_bytes=4_000_000, retrieval_bytes=0)
            build_corpus(tmp, sources, max_bytes=12_000_000)
            return heldout_texts(tmp, max_bytes, langs)
    texts: dict[str, list[str]] = {lang: [] for lang in langs}
    left = {lang: max_bytes for lang in langs}
    for rec in iter_records(Path(corpus_dir) / "val.jsonl"):
        lang = rec.get("lang")
        if lang in left and left[lang] > 0:
            text = rec["text"].encode("utf-8")[: left[lang]].decode("utf-8", errors="ignore")
            texts[lang].append(text)
            left[lang] -= len(text.encode("utf-8"))
    return {lang: t for lang, t in texts.items() if t}
