#!/bin/bash
# ev.sh NAME [CKPT]: copy probe (d1, d2; 30 held-out problems each) and held-out bpb on m0's val split
name=$1; ckpt=${2:-/work/runs/recipe/$name/pretrain/final}
cd /work/wt/recipe
P="taskset -c 1 env OMP_NUM_THREADS=1 PYTHONPATH=src /work/main/.venv/bin/python"
for d in 1 2; do
  $P scripts/copy_probe.py $ckpt --difficulty $d --n 30 --show 3 > /work/runs/recipe/$name-copy-d$d.txt 2>&1
done
/work/runs/recipe/ns.sh eval $ckpt --tasks --no-passkey --corpus /work/runs/recipe/m0/corpus \
  --json /work/runs/recipe/$name-bpb.json > /work/runs/recipe/$name-eval.log 2>&1
