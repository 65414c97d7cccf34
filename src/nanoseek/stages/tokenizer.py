"""The tokenizer stage: a byte-level BPE trained on the corpus' train split ->
runs/NAME/tokenizer/."""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.data.corpus import iter_texts
from nanoseek.stages.common import run_stage
from nanoseek.tokenizer import Tokenizer, bytes_per_token
from nanoseek.train.dist import DistInfo


def tokenizer_stage(run: Path, preset: dict, info: DistInfo) -> dict:
    def work():
        vocab_size = preset["data"].get("vocab_size", 8192)
        tok = Tokenizer.train(iter_texts(run / "corpus", "train"), vocab_size)
        tok.save(run / "tokenizer")
        by_lang: dict[str, list[str]] = {}
        for line in (run / "corpus" / "val.jsonl").read_text("utf-8").splitlines():
            rec = json.loads(line)
            by_lang.setdefault(rec["lang"], []).append(rec["text"])
        return {"vocab_size": tok.vocab_size, "bytes_per_token": bytes_per_token(tok, by_lang)}

    return run_stage("tokenizer", run / "tokenizer", info, work)
