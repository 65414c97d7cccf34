"""A small training run for the resume and torchrun tests: `python
tests/train_script.py OUT [--steps N] ...`.

Its data is a seeded stream of counting sequences; rank r of w takes rows r::w of each global batch,
so one process with the global batch and w processes with 1/w of it each see the same tokens.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nanoseek import Transformer  # noqa: E402
from nanoseek.train.dist import init_distributed, shutdown  # noqa: E402
from nanoseek.train.trainer import TrainConfig, Trainer  # noqa: E402

from helpers import tiny_config  # noqa: E402


class CountingLoader:
    """Each step's global batch comes from a generator seeded by the step; rank r
    of w at micro-step m of a takes rows (r·a + m)::(w·a), so every split of the
    same global batch sees the same rows."""

    def __init__(
        self,
        global_batch: int,
        seq_len: int,
        vocab: int,
        rank: int = 0,
        world: int = 1,
        accum: int = 1,
        seed: int = 0,
    ):
        self.global_batch = global_batch
        self.seq_len = seq_len
        self.vocab = vocab
        self.rank = rank
        self.world = world
        self.accum = accum
        self.seed = seed
        self.position = 0
        self.micro = 0

    def __iter__(self):
        return self

    def __next__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.position)
        start = torch.randint(0, self.vocab, (self.global_batch, 1), generator=gen)
        step = torch.randint(1, 4, (self.global_batch, 1), generator=gen)
        seq = (start + step * torch.arange(self.seq_len + 1)) % self.vocab
        seq = seq[self.rank * self.accum + self.micro :: self.world * self.accum]
        self.micro = (self.micro + 1) % self.accum
        self.position += self.micro == 0
        return seq[:, :-1], seq[:, 1:]

    def state_dict(self):
        return {"position": self.position, "micro": self.micro}

    def load_state_dict(self, state):
        self.position = state["position"]
        self.micro = state["micro"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--parallel", default="ddp")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument(
        "--val",
        action="store_true",
        help="validate on 3 batches (rank 0 takes 2 of them, rank 1 one)",
    )
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--step-delay", type=float, default=0.0, help="sleep per step (gives a killer time to act)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_nextn_predict_layers=1))
    per_rank = args.global_batch // info.world_size // args.grad_accum
    loader = CountingLoader(args.global_batch, 16, 128, info.rank, info.world_size, args.grad_accum)
    cfg = TrainConfig(
        out_dir=args.out,
        max_steps=args.steps,
        batch_size=per_rank,
        seq_len=16,
        grad_accum=args.grad_accum,
        save_every=args.save_every,
        log_every=args.log_every,
        eval_every=args.eval_every,
        warmup_steps=2,
        lr=3e-3,
        optimizer=args.optimizer,
        parallel=args.parallel,
        precision=args.precision,
        compile=args.compile,
        progress=False,
    )

    def val():  # uneven on purpose: FSDP ranks must still run forward together
        stream = CountingLoader(4, 16, 128, seed=99)
        batches = [next(stream) for _ in range(3)]
        return [b for i, b in enumerate(batches) if min(i // 2, info.world_size - 1) == info.rank]

    trainer = Trainer(model, cfg, loader, val_batches=val if args.val else None, dist_info=info)
    if args.step_delay:
        original = trainer.train_step

        def slow_step():
            import time

            time.sleep(args.step_delay)
            return original()

        trainer.train_step = slow_step
    trainer.fit()
    shutdown(info)


if __name__ == "__main__":
    main()
