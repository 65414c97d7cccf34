"""The report stage: the run's report card (reporting/report_card.py), rewritten from what every
stage left on disk each time the pipeline runs, so it always shows the stages finished so far."""

from __future__ import annotations

from pathlib import Path

from nanoseek.reporting.report_card import write_report


def report_stage(run: Path) -> str:
    """runs/NAME/report.md (and report.json, plots) -> its path. Rank 0
    only: it reads files, trains nothing."""
    return str(write_report(run))
