#!/bin/bash
# SFT variant from run D's long_context/final, then passkey (50 trials x 4 lengths x en/zh) + arithmetic (200)
set -e
name=$1; shift
out=/work/runs/s18/sv/$name
cd /work/main
sets=()
for s in "$@"; do sets+=(--set "$s"); done
start=$(date +%s)
PYTHONPATH=src .venv/bin/python -m nanoseek.cli sft --preset cpu --out $out --init /work/runs/s17/cpu/long_context/final "${sets[@]}" > $out.sft.log 2>&1
mid=$(date +%s)
PYTHONPATH=src .venv/bin/python - $out <<'PY' > $out.eval.log 2>&1
import json, sys
from nanoseek.eval import evaluate
out = sys.argv[1]
r = evaluate(out + "/sft/final", tasks={"arithmetic": [1, 2]}, n_problems=200, max_new_tokens=128, bpb=False, passkey=True, passkey_trials=50)
json.dump(r, open(out + "/eval.json", "w"), indent=1)
print(r["tasks"]["arithmetic"]["greedy"]["pass@1"])
for p in r.get("passkey", []): print(p)
PY
end=$(date +%s)
echo "$name sft $((mid-start)) s eval $((end-mid)) s" >> /work/runs/s18/sv/times.txt
