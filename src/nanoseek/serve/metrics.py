"""Prometheus text exposition for /metrics, without a client library:
counters, gauges and histograms.

Series (all prefixed nanoseek_): requests_total{endpoint,status}, errors_total{type},
prompt_tokens_total, generation_tokens_total, prompt_cache_hit_tokens_total,
time_to_first_token_seconds, time_per_output_token_seconds, request_duration_seconds, and gauges for
running and queued requests, the sequences and tokens they hold, and the engine's latent cache
(usage, blocks, prefix hits) and MTP speculation (drafted, accepted, acceptance rate), which
serve/app.py samples from the engine's stats.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PREFIX = "nanoseek_"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip((*(repr(float(b)) for b in self.buckets), "+Inf"), self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return out + [f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]


class Metrics:
    """Everything /metrics reports that the server itself measures (the
    engine's figures come from its stats)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.errors: defaultdict[str, int] = defaultdict(int)
        self.tokens = dict(prompt=0, generation=0, prompt_cache_hit=0)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.tpot = Histogram(TOKEN_BUCKETS)
        self.duration = Histogram(LATENCY_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def count_error(self, error_type: str) -> None:
        with self._lock:
            self.errors[error_type] += 1

    def generation_done(
        self,
        prompt: int,
        cached: int,
        generated: int,
        ttft: float | None,
        duration: float,
        decode_time: float | None,
    ) -> None:
        with self._lock:
            self.tokens["prompt"] += prompt
            self.tokens["prompt_cache_hit"] += cached
            self.tokens["generation"] += generated
            if ttft is not None:
                self.ttft.observe(ttft)
            if decode_time is not None and generated > 1:
                self.tpot.observe(decode_time / (generated - 1))
            self.duration.observe(duration)

    def render(
        self,
        gauges: dict[str, tuple[str, float]],
        counters: dict[str, tuple[str, float]] | None = None,
    ) -> str:
        """gauges and counters kept elsewhere (the engine's): name -> (help,
        value), sampled now by the caller."""
        with self._lock:
            lines: list[str] = []

            def family(name, kind, help_text, samples):
                lines.extend(
                    [
                        f"# HELP {PREFIX}{name} {help_text}",
                        f"# TYPE {PREFIX}{name} {kind}",
                        *samples,
                    ]
                )

            family(
                "requests_total",
                "counter",
                "HTTP requests by endpoint and status code.",
                [
                    f'{PREFIX}requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())
                ],
            )
            family(
                "errors_total",
                "counter",
                "Error responses by OpenAI error type.",
                [f'{PREFIX}errors_total{{type="{t}"}} {n}' for t, n in sorted(self.errors.items())],
            )
            for key, help_text in (
                ("prompt", "Prompt tokens of finished generations."),
                ("generation", "Generated tokens."),
                ("prompt_cache_hit", "Prompt tokens served from the prefix cache."),
            ):
                family(
                    f"{key}_tokens_total",
                    "counter",
                    help_text,
                    [f"{PREFIX}{key}_tokens_total {self.tokens[key]}"],
                )
            for name, hist, help_text in (
                (
                    "time_to_first_token_seconds",
                    self.ttft,
                    "From request arrival to the first generated token.",
                ),
                (
                    "time_per_output_token_seconds",
                    self.tpot,
                    "Mean time between tokens after the first.",
                ),
                (
                    "request_duration_seconds",
                    self.duration,
                    "From request arrival to the last token.",
                ),
            ):
                family(name, "histogram", help_text, hist.lines(PREFIX + name))
            for kind, series in (("gauge", gauges), ("counter", counters or {})):
                for name, (help_text, value) in series.items():
                    family(name, kind, help_text, [f"{PREFIX}{name} {_num(value)}"])
            return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
