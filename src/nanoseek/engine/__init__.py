"""Inference: latent KV cache (cache.py), sampling (sampling.py), continuous batching
(scheduler.py), the packed forward (runner.py), MTP speculative decoding (speculative.py), int8
weights (quant.py), the API (engine.py)."""

from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams, TokenLogprob
from nanoseek.engine.sequence import CompletionOutput, RequestOutput, StepEvent

__all__ = [
    "CompletionOutput",
    "Engine",
    "RequestOutput",
    "SamplingParams",
    "StepEvent",
    "TokenLogprob",
]
