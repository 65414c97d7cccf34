"""Structured output's cost per token: llguidance (serve/grammar.py) against the hand-written JSON
automaton of json_object mode (serve/logits.py), on tokenizers of several vocabulary sizes.

Each tokenizer is trained by nanoseek's Tokenizer.train on the standard library's sources (a corpus
every Python install has). For each: the time to build the token tables (once per server), to
compile a JSON schema (once per request), and the mean and worst time per decoding step of each
logits processor while it walks a JSON document token by token (the automaton from a cold mask
cache, as a server meets a new state). Prints JSON lines: {"bench", "ours", "anchor", "ratio",
"unit", "config", "cpu"}.

    python benchmarks/grammar_mask.py [--vocab 400 32768] [--docs 2000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time

import torch

from nanoseek.data.corpus import _stdlib_documents
from nanoseek.serve.chat_format import TokenTable
from nanoseek.serve.grammar import GrammarProcessor, GrammarVocab
from nanoseek.serve.logits import JsonObjectProcessor, JsonVocab
from nanoseek.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string"}},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
            "required": ["city"],
        },
        "note": {"type": "string"},
    },
    "required": ["name", "kind", "age"],
}
DOC = {
    "name": "Tom the cat",
    "kind": "cat",
    "age": 7,
    "tags": ["lazy", "orange", "indoor"],
    "home": {"city": "Paris", "zip": None},
    "note": "Sleeps most of the day; def main(): return sorted(items, key=len)",
}


def per_step(proc, ids: list[int], vocab_size: int) -> list[float]:
    logits = torch.zeros(vocab_size)
    times = []
    for k in range(len(ids) + 1):
        start = time.perf_counter()
        proc(ids[:k], logits)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[400, 32768])
    ap.add_argument("--docs", type=int, default=2000, help="stdlib files to train tokenizers on")
    args = ap.parse_args()
    torch.set_num_threads(1)
    docs = list(itertools.islice(_stdlib_documents(), args.docs))
    cpu = platform.processor() or platform.machine()
    for size in args.vocab:
        tok = Tokenizer.train(docs, vocab_size=size)
        config = {"vocab": tok.vocab_size}
        table = TokenTable(tok)  # both use it (and the server builds it anyway, for logprobs)
        start = time.perf_counter()
        grammar_vocab = GrammarVocab(table, tok)
        built = time.perf_counter() - start
        start = time.perf_counter()
        json_vocab = JsonVocab(table, tok.eos_id, tok.special_ids.get("end_think"))
        anchor_built = time.perf_counter() - start
        start = time.perf_counter()
        grammar = grammar_vocab.build("json_schema", SCHEMA)
        compiled = time.perf_counter() - start
        ids = tok.encode(json.dumps(DOC))
        ours = per_step(GrammarProcessor(grammar_vocab, grammar), ids, tok.vocab_size)
        anchor = per_step(JsonObjectProcessor(json_vocab, 10**6, False), ids, tok.vocab_size)
        rows = [
            ("grammar_token_tables", built, anchor_built, "s"),
            ("grammar_schema_compile", compiled, None, "s"),
            ("grammar_mask_mean", statistics.mean(ours), statistics.mean(anchor), "s/token"),
            ("grammar_mask_max", max(ours), max(anchor), "s/token"),
        ]
        for bench, value, ref, unit in rows:
            print(
                json.dumps(
                    {
                        "bench": bench,
                        "ours": round(value, 6),
                        "anchor": None if ref is None else round(ref, 6),
                        "ratio": None if ref is None else round(value / ref, 3),
                        "unit": unit,
                        "config": {**config, "tokens": len(ids)},
                        "cpu": cpu,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
