"""Token shards and the packed loader: exact contents, BOS alignment,
coverage, resume, ranks, errors."""

import json
import random
import re

import numpy as np
import pytest
import torch

from nanoseek.data.corpus import Source, build_corpus
from nanoseek.data.shards import PackedLoader, ShardError, read_meta, val_loader, write_shards
from nanoseek.tokenizer import Tokenizer

WORDS = "the quick brown fox jumps over a lazy dog river stone light 山 水 天下 英雄 12 345".split()


def documents() -> list[str]:
    """Marked documents of very different lengths: some far shorter, some far longer than a row."""
    rng = random.Random(0)
    return [
        f"<<doc {i}>> " + " ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 20, 60, 400])))
        for i in range(240)
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    build_corpus(root / "corpus", [Source("docs", "en", "CC0", "-", documents)], val_fraction=0.1)
    tok = Tokenizer.train(documents(), vocab_size=400)
    meta = write_shards(root / "corpus" / "train.jsonl", tok, root / "train", progress=False)
    write_shards(root / "corpus" / "val.jsonl", tok, root / "val", progress=False)
    return root, tok, meta


def corpus_texts(root, split):
    return [
        json.loads(line)["text"]
        for line in (root / "corpus" / f"{split}.jsonl").read_text().splitlines()
    ]


def stream(loader):
    """All target tokens the loader yields, in order, without BOS and padding."""
    out = []
    for x, y in loader:
        assert x.dtype == y.dtype == torch.int64
        out += [t for t in y.flatten().tolist() if t >= 0]
    return out


def test_shard_contents(setup):
    root, tok, meta = setup
    texts = corpus_texts(root, "train")
    expected = [i for t in texts for i in tok.encode(t, add_bos=True)]
    tokens = np.fromfile(root / "train" / meta["shards"][0]["file"], dtype=np.uint16)
    assert tokens.tolist() == expected
    assert (
        meta["dtype"] == "uint16" and meta["tokens"] == len(expected) and meta["docs"] == len(texts)
    )
    assert meta["bytes"] == sum(len(t.encode()) for t in texts) == meta["sources"]["docs"]["bytes"]
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["bos_id"] == tok.bos_id
    assert read_meta(root / "train") == meta
    assert sorted(p.name for p in (root / "train").iterdir()) == ["meta.json", "shard_00000.bin"]


def test_rewrite_only_when_inputs_change(setup, tmp_path):
    root, tok, meta = setup
    shard = root / "train" / "shard_00000.bin"
    before = shard.stat().st_mtime_ns
    assert (
        write_shards(root / "corpus" / "train.jsonl", tok, root / "train", progress=False) == meta
    )
    assert shard.stat().st_mtime_ns == before  # same corpus, same tokenizer: kept
    other = Tokenizer.train(documents()[:50], vocab_size=300)
    out = tmp_path / "copy"
    write_shards(root / "corpus" / "train.jsonl", tok, out, progress=False)
    rewritten = write_shards(root / "corpus" / "train.jsonl", other, out, progress=False)
    assert (
        rewritten["tokenizer_sha256"] == other.sha256
        and rewritten["vocab_size"] == other.vocab_size
    )


def test_many_shards_give_the_same_stream(setup, tmp_path):
    root, tok, meta = setup
    small = write_shards(
        root / "corpus" / "train.jsonl", tok, tmp_path, shard_tokens=5000, progress=False
    )
    assert len(small["shards"]) > 3 and small["tokens"] == meta["tokens"]
    assert all(s["tokens"] <= 5000 or s["docs"] == 1 for s in small["shards"])
    assert stream(val_loader(tmp_path, 4, 64)) == stream(val_loader(root / "train", 4, 64))


def test_uint32_for_big_vocabularies(tmp_path):
    class BigTokenizer:  # just what write_shards uses, with ids above 65535
        vocab_size = 100_000
        bos_id = 99_999
        sha256 = "x" * 64

        def encode_batch(self, texts, add_bos):
            return [[self.bos_id] + [70_000 + ord(c) for c in t] for t in texts]

    (tmp_path / "c.jsonl").write_text('{"text": "abc"}\n{"text": "de"}\n')
    meta = write_shards(tmp_path / "c.jsonl", BigTokenizer(), tmp_path / "s", progress=False)
    assert meta["dtype"] == "uint32"
    tokens = np.fromfile(tmp_path / "s" / "shard_00000.bin", dtype=np.uint32).tolist()
    assert tokens == [99_999, 70_097, 70_098, 70_099, 99_999, 70_100, 70_101]


def test_rows_are_full_and_start_with_bos(setup):
    root, tok, _ = setup
    loader = PackedLoader(root / "train", batch_size=8, seq_len=32, seed=3)
    for _ in range(50):
        x, y = next(loader)
        assert x.shape == y.shape == (8, 32)
        assert (x[:, 0] == tok.bos_id).all()
        assert torch.equal(x[:, 1:], y[:, :-1]) and (y >= 0).all()


def test_validation_pass_covers_every_token_once(setup):
    root, tok, meta = setup
    for batch_size, seq_len in ((3, 16), (8, 100), (2, 1000)):
        text_tokens = [i for t in corpus_texts(root, "val") for i in tok.encode(t)]
        got = [t for t in stream(val_loader(root / "val", batch_size, seq_len)) if t != tok.bos_id]
        assert got == text_tokens  # file order, nothing cropped or repeated
    batches = list(val_loader(root / "val", 4, 64))
    assert all(x.shape == (4, 64) and (y >= 0).all() for x, y in batches[:-1])
    # the end of the data is padded, with nothing to predict
    assert (batches[-1][1][-1] == -100).any()


def test_one_epoch_then_stop(setup):
    root, tok, meta = setup
    full = stream(PackedLoader(root / "train", 4, 50, epochs=1, seed=0, pad_last=True))
    text_tokens = [i for t in corpus_texts(root, "train") for i in tok.encode(t)]
    # shuffled, each token once
    assert sorted(t for t in full if t != tok.bos_id) == sorted(text_tokens)
    # drops the last incomplete batch
    cut = stream(PackedLoader(root / "train", 4, 50, epochs=1, seed=0))
    assert full[: len(cut)] == cut and 0 < len(full) - len(cut) < 4 * 50
    infinite = PackedLoader(root / "train", 4, 50, seed=0)
    for _ in range(3 * len(full) // (4 * 50)):
        next(infinite)
    assert infinite.state_dict()["epoch"] >= 2


def test_resume_is_exact(setup):
    root, _, meta = setup
    per_epoch = meta["tokens"] // (6 * 49)
    for n, m in ((5, 7), (0, 3), (per_epoch - 3, 10)):  # the last one crosses into the next epoch
        a = PackedLoader(root / "train", 6, 48, seed=11)
        for _ in range(n):
            next(a)
        state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint file
        expected = [next(a) for _ in range(m)]
        b = PackedLoader(root / "train", 6, 48, seed=11)
        b.load_state_dict(state)
        for (x1, y1), (x2, y2) in zip(expected, (next(b) for _ in range(m))):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert a.state_dict()["epoch"] >= 1
    with pytest.raises(ValueError, match="world_size"):
        PackedLoader(root / "train", 6, 48, seed=11, rank=0, world_size=2).load_state_dict(state)


def test_seed_changes_order(setup):
    root, _, _ = setup
    x1, _ = next(PackedLoader(root / "train", 4, 64, seed=1))
    x2, _ = next(PackedLoader(root / "train", 4, 64, seed=1))
    x3, _ = next(PackedLoader(root / "train", 4, 64, seed=2))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_ranks_read_disjoint_documents(setup):
    root, tok, meta = setup
    world = 3
    seen = []
    for rank in range(world):
        loader = PackedLoader(
            root / "train", 2, 40, rank=rank, world_size=world, seed=5, epochs=1, pad_last=True
        )
        text = tok.decode([t for t in stream(loader) if t != tok.bos_id])
        seen.append(set(re.findall(r"<<doc (\d+)>>", text)))
    assert all(seen) and not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert len(set.union(*seen)) == meta["docs"]
    r0 = next(PackedLoader(root / "train", 2, 40, rank=0, world_size=world, seed=5))[0]
    r1 = next(PackedLoader(root / "train", 2, 40, rank=1, world_size=world, seed=5))[0]
    assert not torch.equal(r0, r1)


def test_errors(setup, tmp_path):
    root, tok, _ = setup
    with pytest.raises(ShardError, match="no meta.json"):
        PackedLoader(tmp_path, 2, 8)
    with pytest.raises(ShardError, match="another tokenizer"):
        PackedLoader(root / "train", 2, 8, tokenizer_sha256="0" * 64)
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(root / "train", 2, 8, rank=2, world_size=2)
    with pytest.raises(ShardError, match="no such corpus file"):
        write_shards(tmp_path / "missing.jsonl", tok, tmp_path / "out")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(ShardError, match="bad.jsonl:2"):
        write_shards(tmp_path / "bad.jsonl", tok, tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # no meta.json, no partial shard
    (tmp_path / "good.jsonl").write_text('{"text": "hello there"}\n{"text": "general kenobi"}\n')
    meta = write_shards(tmp_path / "good.jsonl", tok, tmp_path / "out", progress=False)
    shard = tmp_path / "out" / meta["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ShardError, match="truncated"):
        PackedLoader(tmp_path / "out", 2, 8)
