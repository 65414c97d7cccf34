#!/bin/bash
# pt.sh NAME STEPS [extra nanoseek args...]: the sweep's pretraining, 16x256 rows, warm-up 20, wsd
name=$1; steps=$2; shift 2
cd /work/runs/recipe
/work/runs/recipe/ns.sh pretrain --preset cpu --out /work/runs/recipe/$name --no-long-context \
  --set pretrain.max_steps=$steps --set pretrain.warmup_steps=20 --set pretrain.max_time=900 \
  --set pretrain.eval_every=100000 --set pretrain.save_every=100000 --set pretrain.log_every=20 "$@" \
  > /work/runs/recipe/$name.log 2>&1
