"""The shards stage: the corpus tokenized once into runs/NAME/shards/{train,val}/."""

from __future__ import annotations

from pathlib import Path

from nanoseek.data.shards import write_shards
from nanoseek.stages.common import run_stage
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.dist import DistInfo


def shards_stage(run: Path, preset: dict, info: DistInfo) -> dict:
    def work():
        tok = load_tokenizer(run / "tokenizer")
        metas = {
            split: write_shards(run / "corpus" / f"{split}.jsonl", tok, run / "shards" / split)
            for split in ("train", "val")
        }
        return {
            "tokens": metas["train"]["tokens"],
            "val_tokens": metas["val"]["tokens"],
            "bytes": metas["train"]["bytes"],
        }

    return run_stage("shards", run / "shards", info, work)
