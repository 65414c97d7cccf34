"""Training: one loop for every stage, the optimizers, distributed
set-up, FLOPs and cost accounting."""
