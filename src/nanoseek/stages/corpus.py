"""The corpus stage: bilingual text (the default sources, or the
user's files) -> runs/NAME/corpus/."""

from __future__ import annotations

from pathlib import Path

from nanoseek.data.corpus import build_corpus, default_sources, user_sources
from nanoseek.stages.common import run_stage
from nanoseek.train.dist import DistInfo


def corpus_stage(
    run: Path, preset: dict, info: DistInfo, text_paths: list[str] | None = None
) -> dict:
    data = preset["data"]

    def work():
        sources = (
            user_sources(text_paths)
            if text_paths
            else default_sources(
                retrieval_bytes=data.get("retrieval_bytes"),
                task_text=data.get("task_text"),
                source_max_bytes=data.get("source_max_bytes"),
            )
        )
        manifest = build_corpus(run / "corpus", sources, max_bytes=data.get("max_bytes"))
        totals = manifest.get("totals", {})
        return {
            "docs": totals.get("docs"),
            "bytes": totals.get("bytes"),
            "sources": len(manifest["sources"]),
        }

    return run_stage("corpus", run / "corpus", info, work)
