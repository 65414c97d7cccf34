"""Schema fuzzing at length: --cases request bodies drawn from a real `nanoseek serve`'s own
/openapi.json (valid ones, ones with wrong values in the schema's fields, and any JSON at all; the
strategies of tests/serve_fuzz.py), sent one by one to every POST route. The test suite runs 150 of
them; this runs thousands.

Reported as one JSON line {"bench": "serve_fuzz", "cases", "server_errors", "malformed_errors",
"statuses", "seconds", "config"}: server_errors counts 5xx answers, malformed_errors errors that are
no OpenAI error object. The exit status is 1 if either is not 0.

    python benchmarks/serve_fuzz.py [--cases 2000] [--seed N] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, seed, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' server process and fuzzing strategies

import serve_fuzz  # noqa: E402  (after the path is set)
from serve_helpers import ServerProcess, build_random_checkpoint  # noqa: E402

KEY = "fuzz-key"
MAX_TOKENS = 4  # a valid request generates at most this many tokens per completion


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument(
        "--seed",
        type=int,
        default=None,
        help="draw with this seed (default: hypothesis's fixed derandomized draw)",
    )
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="serve this checkpoint (default: a tiny random one built here)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanoseek-fuzz-") as tmp:
        checkpoint = args.checkpoint or build_random_checkpoint(Path(tmp) / "model")
        with ServerProcess(checkpoint, "--api-key", KEY, "--max-tokens", str(MAX_TOKENS)) as server:
            report = fuzz(server.wait_ready().url, args.cases, args.seed)
            if report["server_errors"]:
                print(server.log[-3000:], file=sys.stderr)
    print(json.dumps(report))
    return 1 if report["server_errors"] or report["malformed_errors"] else 0


def fuzz(url: str, cases: int, draw_seed: int | None) -> dict:
    doc = httpx.get(url + "/openapi.json").json()
    client = httpx.Client(timeout=120)
    statuses = collections.Counter()
    problems = []
    malformed = []  # the problems of answers under 500

    @settings(
        max_examples=cases,
        derandomize=draw_seed is None,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(serve_fuzz.requests(doc))
    def one(request):
        route, body = request
        status, found = serve_fuzz.send(
            client, url, route, body, {"Authorization": f"Bearer {KEY}"}
        )
        statuses[status] += 1
        problems.extend(found)
        if status < 500:
            malformed.extend(found)

    if draw_seed is not None:
        one = seed(draw_seed)(one)
    start = time.perf_counter()
    one()
    for problem in problems[:10]:
        print(problem, file=sys.stderr)
    return {
        "bench": "serve_fuzz",
        "cases": sum(statuses.values()),
        "server_errors": sum(n for s, n in statuses.items() if s >= 500),
        "malformed_errors": len(malformed),
        "statuses": {str(s): n for s, n in sorted(statuses.items())},
        "seconds": round(time.perf_counter() - start, 1),
        "config": {"seed": draw_seed, "max_tokens": MAX_TOKENS},
    }


if __name__ == "__main__":
    sys.exit(main())
