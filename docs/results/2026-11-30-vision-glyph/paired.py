"""Paired changes between two vision-stage runs on the same held-out problems and pictures:
per task, after SFT and after GRPO, from the two runs' vision/outcomes.jsonl.

    PYTHONPATH=src python docs/results/2026-11-30-vision-glyph/paired.py NEW.jsonl OLD.jsonl"""

import json
import sys

from nanoseek.eval.stats import paired_difference, wilson_interval

new = sys.argv[1]
old = sys.argv[2]


def rows(p):
    return [json.loads(l) for l in open(p) if l.strip()]


a = {(r["task"], r["key"], r["lang"]): r for r in rows(old) if r["kind"] == "visual"}
b = {(r["task"], r["key"], r["lang"]): r for r in rows(new) if r["kind"] == "visual"}
out = {}
for task in sorted({k[0] for k in b}):
    keys = [k for k in b if k[0] == task and k in a]
    for when in ("sft", "grpo"):
        x = [a[k][when] for k in keys]
        y = [b[k][when] for k in keys]
        d = paired_difference(x, y)
        out[f"{task}/{when}"] = {
            "n": len(keys),
            "old": sum(x),
            "new": sum(y),
            "new_wilson": [round(v, 4) for v in wilson_interval(sum(y), len(y))],
            "gain": round(d["gain"], 4),
            "interval95": [round(v, 4) for v in d["interval95"]],
            "gained": d["gained"],
            "lost": d["lost"],
            "mcnemar_p": round(d["mcnemar_p"], 4),
        }
print(json.dumps(out, indent=1))
