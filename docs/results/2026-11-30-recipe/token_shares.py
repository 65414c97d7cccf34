"""Tokens per source of a run's corpus train split, with the run's own tokenizer: the mixture as
the model reads it (the packed loader draws documents uniformly, so a source's share of the
tokens is its share of what pretraining sees).

    python docs/results/2026-11-30-recipe/token_shares.py runs/NAME [runs/OTHER ...]
"""

import json
import sys
from collections import Counter
from pathlib import Path

from nanoseek.data.corpus import iter_records
from nanoseek.tokenizer import load_tokenizer

for run in map(Path, sys.argv[1:]):
    tok = load_tokenizer(run / "tokenizer")
    tokens = Counter()
    for rec in iter_records(run / "corpus" / "train.jsonl"):
        tokens[rec["source"]] += len(tok.encode(rec["text"]))
    total = sum(tokens.values())
    shares = {k: round(v / total, 3) for k, v in tokens.items()}
    print(
        json.dumps(
            {"run": run.name, "train_tokens": total, "tokens": dict(tokens), "shares": shares}
        )
    )
