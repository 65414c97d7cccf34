"""How many steps until a model of a preset's shape learns to copy from its context (the skill
passkey retrieval needs), trained from scratch on nothing but copies?

Each training row is random segments of 4-15 tokens, each followed by itself again; the first
occurrence is noise, the second is predictable only by finding the first and reading what came
next (an induction head). Tokens are drawn from a pool of `--pool` ids (the ten digits first);
`copy-acc` is the share of second-occurrence tokens that the model's argmax gets right (chance:
1/pool). With `--then-shards DIR` the model then trains on a run's shards (e.g. retrieval text) and
`scripts/retrieval_probe.py`'s held-out facts are asked teacher-forced (every token of the value
must be the argmax), with the copy accuracy over the whole vocabulary at 256 tokens.

    python scripts/induction_probe.py --tokenizer runs/cpu/tokenizer [--pool 64] [--steps 400]
        [--seq 64] [--batch 64] [--minimal] [--then-shards runs/cpu/shards/train --then-steps 300]

--minimal swaps in a two-layer attention-only GPT-2-style model (learned positions, no MoE, no
MLA) of the same width, as a reference point for nanoseek's architecture.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from retrieval_probe import probes
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.data.retrieval import corpus_prose
from nanoseek.data.shards import PackedLoader
from nanoseek.model.transformer import Transformer
from nanoseek.presets import load_preset
from nanoseek.tokenizer import load_tokenizer


class MinimalGPT(nn.Module):
    """Attention-only, pre-norm, learned absolute positions: the textbook induction-head model."""

    def __init__(self, vocab: int, d: int, layers: int = 2, heads: int = 8, context: int = 1024):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        h = self.embed(ids) + self.pos(torch.arange(T))
        for norm, qkv, out in zip(self.norms, self.qkv, self.out):
            q, k, v = qkv(norm(h)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + out(a.transpose(1, 2).flatten(2))
        return self.head(self.norm(h))


def copy_batch(rows: int, seq: int, pool: torch.Tensor, gen: torch.Generator):
    """(inputs, targets, mask of targets that are second occurrences), each [rows, seq]."""
    ids, second = [], []
    for _ in range(rows):
        row, mask = [], []
        while len(row) < seq + 1:
            n = int(torch.randint(4, 16, (1,), generator=gen))
            seg = pool[torch.randint(0, len(pool), (n,), generator=gen)].tolist()
            row += seg + seg
            mask += [0] * n + [1] * n
        ids.append(row[: seq + 1])
        second.append(mask[: seq + 1])
    x = torch.tensor(ids)
    m = torch.tensor(second)
    return x[:, :-1], x[:, 1:], m[:, 1:]


def copy_accuracy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    return (((logits.argmax(-1) == targets).float() * mask).sum() / mask.sum()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a run's tokenizer directory")
    ap.add_argument("--preset", default="cpu", help="the model shape (default: cpu)")
    ap.add_argument("--pool", type=int, default=64, help="distinct tokens copied (default: 64)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--every", type=int, default=20, help="log every this many steps")
    ap.add_argument("--minimal", action="store_true", help="the attention-only reference model")
    ap.add_argument("--then-shards", type=Path, help="then train on these shards")
    ap.add_argument("--then-steps", type=int, default=300)
    args = ap.parse_args()

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    tok = load_tokenizer(args.tokenizer)
    shape = load_preset(args.preset)["model"]
    vocab = tok.vocab_size
    if args.minimal:
        model = MinimalGPT(vocab, shape["hidden_size"])
    else:  # forward(ids) -> logits, as MinimalGPT's
        model = Transformer(ModelConfig(**{**shape, "vocab_size": vocab}))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    digits = [tok.encode(str(d))[0] for d in range(10)]
    others = [i for i in range(300, vocab) if i not in digits]
    pool = torch.tensor(digits + random.Random(0).sample(others, max(0, args.pool - 10)))
    everything = torch.tensor(others)

    def train_step(x, y, step):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 20)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y, m = copy_batch(args.batch, args.seq, pool, gen)
        loss = train_step(x, y, step)
        if step % args.every == 0:
            with torch.no_grad():
                acc = copy_accuracy(model(x), y, m)
            print(
                f"copy step {step}: loss {loss:.3f}, copy-acc {acc:.3f} "
                f"(chance {1 / len(pool):.3f}), {time.perf_counter() - started:.0f} s",
                flush=True,
            )
    if args.then_shards is None:
        return

    prose = corpus_prose()
    items = [p for lang in ("en", "zh") for p in probes(tok, lang, 20, 250, prose[lang])]

    @torch.no_grad()
    def report(tag: str) -> None:
        model.eval()
        x, y, m = copy_batch(8, 256, everything, gen)
        acc = copy_accuracy(model(x), y, m)
        found = 0
        for p in items:
            value = tok.encode(" " + p["value"])  # the space is a token of its own before digits
            ids = torch.tensor([p["ids"] + value])
            found += model(ids)[0, len(p["ids"]) - 1 : -1].argmax(-1).tolist() == value
        model.train()
        print(f"{tag}: copy-acc over the vocabulary {acc:.3f}; facts found {found}/{len(items)}")

    report(f"after {args.steps} copy steps")
    loader = PackedLoader(args.then_shards, 16, 256, seed=0)
    for step in range(1, args.then_steps + 1):
        x, y = next(loader)
        loss = train_step(x, y, args.steps + step)
        if step % 100 == 0 or step == args.then_steps:
            report(f"shard step {step} (loss {loss:.3f})")


if __name__ == "__main__":
    main()
