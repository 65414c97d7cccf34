"""Evaluation: bits per byte (bpb.py), task accuracy and pass@k (accuracy.py),
long-context passkey retrieval (passkey.py), and `evaluate` / `to_markdown`: all
of them for one checkpoint (quality.py)."""

from nanoseek.eval.accuracy import evaluate_task, pass_at_k
from nanoseek.eval.bpb import bits_per_byte, heldout_texts
from nanoseek.eval.passkey import passkey_sweep
from nanoseek.eval.quality import evaluate, to_markdown

__all__ = [
    "bits_per_byte",
    "evaluate",
    "evaluate_task",
    "heldout_texts",
    "pass_at_k",
    "passkey_sweep",
    "to_markdown",
]
