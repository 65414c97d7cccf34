"""Token shards on disk, and a packed, BOS-aligned, resumable loader over them.

A shard directory (one per split) holds:
    shard_00000.bin ...  raw token ids (uint16 when the vocabulary fits, else uint32); each
                         document starts with BOS
    meta.json            dtype, vocab_size, bos_id, tokenizer and corpus sha256, tokens, docs,
                         bytes, per source counts, and the shard list. `bytes` is the UTF-8
                         size of the text, so
                         bits per byte = mean loss (nats/token) * tokens / (ln 2 * bytes).

Packing (PackedLoader): every row of T+1 tokens starts with BOS and is filled completely, with
documents in a seeded order. A document that does not fit in what is left of a row fills it, and its
tail carries over to the next row behind a fresh BOS. So nothing is cropped, nothing is padded, and
long documents are simply cut into row-sized pieces. BOS never occurs inside a document (encode()
never makes special ids from text), so the BOS positions are the document boundaries.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanoseek.io import atomic_file, atomic_write_text
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.tokenizer import Tokenizer

FORMAT = "nanoseek-shards-v1"


class ShardError(Exception):
    """Shards cannot be written or read; the message says why."""


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _ShardWriter:
    """Appends documents to shard_00000.bin, shard_00001.bin, ... (each an
    atomic_file entered on `files`, so they all appear when `files` closes, or none
    does); a shard closes at shard_tokens."""

    def __init__(self, out: Path, dtype, shard_tokens: int, files: ExitStack):
        self.out = out
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.files = files
        self.shards: list[dict] = []
        self._file = None

    def add(self, ids: list[int]) -> None:
        last = self.shards[-1] if self.shards else None
        if last is None or last["tokens"] and last["tokens"] + len(ids) > self.shard_tokens:
            self.close()
            self.shards.append(
                {"file": f"shard_{len(self.shards):05d}.bin", "tokens": 0, "docs": 0}
            )
            tmp = self.files.enter_context(atomic_file(self.out / self.shards[-1]["file"]))
            self._file = open(tmp, "wb")
        self._file.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.shards[-1]["tokens"] += len(ids)
        self.shards[-1]["docs"] += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _record_batches(corpus_file: Path, batch_docs: int, progress: bool) -> Iterator[list[dict]]:
    batch: list[dict] = []
    with (
        open(corpus_file, "rb") as f,
        tqdm(
            total=corpus_file.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=f"tokenizing {corpus_file.name}",
            disable=not progress,
        ) as bar,
    ):
        for n, line in enumerate(f, 1):
            bar.update(len(line))
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ShardError(
                    f"{corpus_file}:{n}: expected a JSON object with a string field 'text'"
                )
            batch.append(rec)
            if len(batch) == batch_docs:
                yield batch
                batch = []
    if batch:
        yield batch


def write_shards(
    corpus_file: str | os.PathLike,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = 1 << 28,
    batch_docs: int = 512,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Tokenize a corpus jsonl ({"text", "source", ...} per line) once into out_dir. Returns
    meta.json's content.

    Encoding runs in batches through `tokenizers`, which spreads them over the cores. A directory
    that already holds the same corpus tokenized by the same tokenizer is kept as it is unless
    force=True.
    """
    corpus_file, out = Path(corpus_file), Path(out_dir)
    if not corpus_file.is_file():
        raise ShardError(f"{corpus_file}: no such corpus file")
    corpus_sha = _file_sha256(corpus_file)
    meta_file = out / "meta.json"
    if meta_file.is_file() and not force:
        meta = json.loads(meta_file.read_text("utf-8"))
        if (meta.get("corpus_sha256"), meta.get("tokenizer_sha256")) == (
            corpus_sha,
            tokenizer.sha256,
        ):
            return meta
    out.mkdir(parents=True, exist_ok=True)
    meta_file.unlink(missing_ok=True)  # no meta.json = incomplete, until the new one is in place

    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    sources: dict[str, dict] = {}
    with ExitStack() as files:  # an error leaves no partial shard behind
        writer = _ShardWriter(out, dtype, shard_tokens, files)
        try:
            for batch in _record_batches(corpus_file, batch_docs, progress):
                encoded = tokenizer.encode_batch([r["text"] for r in batch], add_bos=True)
                for rec, ids in zip(batch, encoded):
                    writer.add(ids)
                    empty = {"docs": 0, "tokens": 0, "bytes": 0}
                    s = sources.setdefault(rec.get("source", "unknown"), empty)
                    s["docs"] += 1
                    s["tokens"] += len(ids)
                    s["bytes"] += len(rec["text"].encode("utf-8"))
        finally:
            writer.close()
        if not writer.shards:
            raise ShardError(f"{corpus_file}: no documents")

    names = {s["file"] for s in writer.shards}
    for stale in out.glob("shard_*.bin"):
        if stale.name not in names:
            stale.unlink()
    meta = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "tokenizer_sha256": tokenizer.sha256,
        "corpus_file": corpus_file.name,
        "corpus_sha256": corpus_sha,
        "tokens": sum(s["tokens"] for s in writer.shards),
        "docs": sum(s["docs"] for s in writer.shards),
        "bytes": sum(s["bytes"] for s in sources.values()),
        "sources": sources,
        "shards": writer.shards,
    }
    atomic_write_text(meta_file, json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(shard_dir: str | os.PathLike) -> dict:
    meta_file = Path(shard_dir) / "meta.json"
    if not meta_file.is_file():
        raise ShardError(
            f"{shard_dir}: no meta.json (shards missing or incomplete; run write_shards)"
        )
    meta = json.loads(meta_file.read_text("utf-8"))
    if meta.get("format") != FORMAT:
        raise ShardError(f"{meta_file}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class PackedLoader:
    """Yields (inputs[B,T], targets[B,T]) int64 tensors from a shard
    directory; see the module docstring.

    - rank/world_size: each epoch's document order is dealt out round-robin, so ranks read disjoint
      documents.
    - seed: the document order of epoch e is a permutation seeded by (seed, e); shuffle=False keeps
      file order.
    - epochs: None repeats forever; otherwise stop after that many passes (a last incomplete batch
      is dropped, or with pad_last=True padded: padded positions have target IGNORE_INDEX (-100),
      which every loss ignores).
    - state_dict()/load_state_dict(): the position in the stream; a restored loader yields the same
      batches.
    Ranks hold different amounts of text, so under DDP train for a fixed number of steps (infinite
    mode).
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        pad_last: bool = False,
        tokenizer_sha256: str | None = None,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(
                f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        meta = read_meta(shard_dir)
        if tokenizer_sha256 is not None and meta["tokenizer_sha256"] != tokenizer_sha256:
            raise ShardError(
                f"{shard_dir}: shards were written with another tokenizer; re-run write_shards"
            )
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epochs = epochs
        self.pad_last = pad_last
        self.bos = meta["bos_id"]
        self.meta = meta

        # Document index: shard number, start and length of every
        # document, found at the BOS positions.
        self._shards = []
        shard_of = []
        starts = []
        for k, s in enumerate(meta["shards"]):
            path = Path(shard_dir) / s["file"]
            if (
                not path.is_file()
                or path.stat().st_size != s["tokens"] * np.dtype(meta["dtype"]).itemsize
            ):
                raise ShardError(f"{path}: missing or truncated (expected {s['tokens']} tokens)")
            tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
            bos_at = np.flatnonzero(tokens == self.bos)
            if len(bos_at) != s["docs"] or (len(bos_at) and bos_at[0] != 0):
                raise ShardError(
                    f"{path}: {len(bos_at)} documents found, meta.json says {s['docs']}"
                )
            self._shards.append(tokens)
            shard_of.append(np.full(len(bos_at), k, dtype=np.int32))
            starts.append(bos_at)
        self._doc_shard = np.concatenate(shard_of)
        self._doc_start = np.concatenate(starts)
        ends = np.concatenate([np.append(b[1:], len(t)) for b, t in zip(starts, self._shards)])
        self._doc_len = ends - self._doc_start
        if len(self._doc_start) < world_size:
            raise ShardError(
                f"{shard_dir}: {len(self._doc_start)} documents cannot feed {world_size} ranks"
            )
        # the stream position: epoch, index in its order, tokens used
        self.epoch = self.pos = self.offset = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self._doc_start)
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._order_cache = (epoch, order[self.rank :: self.world_size])
        return self._order_cache[1]

    def _fill_row(self, row: np.ndarray) -> int:
        """Fill row from the stream; returns how many tokens it got (less
        than len(row) only at the end)."""
        n = 0
        while n < len(row) and (self.epochs is None or self.epoch < self.epochs):
            d = self._order(self.epoch)[self.pos]
            doc = self._shards[self._doc_shard[d]][
                self._doc_start[d] : self._doc_start[d] + self._doc_len[d]
            ]
            if self.offset > 0:  # the tail of a document cut at the end of the previous row
                row[n] = self.bos
                n += 1
            take = min(len(doc) - self.offset, len(row) - n)
            row[n : n + take] = doc[self.offset : self.offset + take]
            n += take
            self.offset += take
            if self.offset == len(doc):
                self.offset = 0
                self.pos += 1
                if self.pos == len(self._order(self.epoch)):
                    self.epoch += 1
                    self.pos = 0
        return n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, lengths = [], []
        for _ in range(self.batch_size):
            row = np.empty(self.seq_len + 1, dtype=np.int64)
            n = self._fill_row(row)
            if n < len(row):  # end of the stream
                if self.pad_last and n > 1:
                    row[n:] = self.bos
                    rows.append(row)
                    lengths.append(n)
                break
            rows.append(row)
            lengths.append(n)
        if not rows or (len(rows) < self.batch_size and not self.pad_last):
            raise StopIteration
        batch = torch.from_numpy(np.stack(rows))
        inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        for i, n in enumerate(lengths):
            targets[i, n - 1 :] = IGNORE_INDEX  # nothing to predict past the end of the data
        return inputs, targets

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "offset": self.offset,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "docs": len(self._doc_start),
            "tokenizer_sha256": self.meta["tokenizer_sha256"],
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "shuffle", "docs", "tokenizer_sha256"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state is for {key}={state[key]!r}, this loader has {mine[key]!r}"
                )
        self.epoch = state["epoch"]
        self.pos = state["pos"]
        self.offset = state["offset"]


def val_loader(
    shard_dir: str | os.PathLike,
    batch_size: int,
    seq_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> PackedLoader:
    """One pass over a split in file order, the last batch padded (target IGNORE_INDEX): every text
    token is a target once."""
    return PackedLoader(
        shard_dir,
        batch_size,
        seq_len,
        rank=rank,
        world_size=world_size,
        shuffle=False,
        epochs=1,
        pad_last=True,
    )
