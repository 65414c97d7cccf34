"""Does GRPO raise held-out accuracy on a model this project trains on a CPU? The experiment, end to end.

    base:  nanoseek pretrain --preset smoke --out runs/grpo-base          (the smoke pretraining, ~2 min)
    sft:   python scripts/grpo_experiment.py sft  runs/grpo-base/pretrain/final runs/grpo-exp/sft --steps 300
    eval:  python scripts/grpo_experiment.py eval runs/grpo-exp/sft
    grpo:  python scripts/grpo_experiment.py grpo runs/grpo-exp/sft runs/grpo-exp/grpo --set max_time=1500 ...

SFT here is a minimal stand-in for the SFT stage: worked solutions of the tasks' train split, rendered exactly as
GRPO prompts them (chat template with the "<think>\\n" generation prompt, then the completion and EOS), loss on
the completion only, trained with the project's Trainer. The held-out figure is greedy accuracy on the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from nanoseek import load_model
from nanoseek.data.chat import prompt_ids
from nanoseek.engine import Engine
from nanoseek.eval.quality import task_accuracy
from nanoseek.model import IGNORE_INDEX
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.grpo_trainer import GRPOConfig, GRPOTrainer
from nanoseek.train.rollout import PromptStream, TaskSpec
from nanoseek.train.trainer import TrainConfig, Trainer, export_checkpoint


class WorkedSolutions:
    """Batches of (inputs, targets) from worked solutions: prompt tokens carry no loss; rows padded to seq_len."""

    def __init__(self, tok, specs, langs, batch_size: int, seq_len: int, seed: int = 1):
        self.tok, self.batch_size, self.seq_len = tok, batch_size, seq_len
        self.stream = PromptStream(specs, langs, seed=seed)

    def __iter__(self):
        return self

    def __next__(self):
        inputs = torch.full((self.batch_size, self.seq_len), self.tok.pad_id)
        targets = torch.full((self.batch_size, self.seq_len), IGNORE_INDEX)
        for i, p in enumerate(self.stream.next(self.batch_size)):
            prompt = prompt_ids(self.tok, p.prompt)
            completion = self.tok.encode(p.solution.completion(think_prefilled=True), allow_special=True)
            ids = (prompt + completion + [self.tok.eos_id])[: self.seq_len + 1]
            inputs[i, : len(ids) - 1] = torch.tensor(ids[:-1])
            targets[i, len(prompt) - 1 : len(ids) - 1] = torch.tensor(ids[len(prompt) :])
        return inputs, targets

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def cmd_sft(a) -> None:
    model, tok = load_model(a.base), load_tokenizer(a.base)
    specs = [TaskSpec.parse(t) for t in a.tasks]
    cfg = TrainConfig(out_dir=str(Path(a.out).with_name(Path(a.out).name + "-train")), max_steps=a.steps,
                      max_time=a.max_time, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, warmup_steps=10,
                      schedule="cosine", mtp_weight=0.0, save_every=100, log_every=10, seed=a.seed)
    result = Trainer(model, cfg, WorkedSolutions(tok, specs, a.langs, a.batch_size, a.seq_len, a.seed),
                     tokenizer=tok).fit()
    export_checkpoint(model, Path(a.out), tok)
    print(json.dumps({k: result[k] for k in ("steps", "lm_loss_avg", "wall_s")}))


def cmd_eval(a) -> None:
    model, tok = load_model(a.checkpoint), load_tokenizer(a.checkpoint)
    tasks = {s.name: [s.max_difficulty or s.difficulty] for s in map(TaskSpec.parse, a.tasks)}
    engine = Engine(model.eval(), None, max_batch_size=64)
    result = task_accuracy(engine, tok, tasks, a.n * len(a.langs), a.langs,
                           max_new_tokens=a.max_new_tokens)
    print(json.dumps(result))


def cmd_grpo(a) -> None:
    model, tok = load_model(a.init), load_tokenizer(a.init)
    fields = {"tasks": a.tasks, "langs": a.langs, "out_dir": a.out}
    for item in a.set:
        key, _, raw = item.partition("=")
        try:
            fields[key] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key] = raw
    result = GRPOTrainer(model, GRPOConfig(**fields), tok).fit()
    export_checkpoint(model, Path(a.out) / "final", tok)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--tasks", nargs="+", default=["arithmetic:2"])
        p.add_argument("--langs", nargs="+", default=["en", "zh"])
    p = sub.add_parser("sft")
    p.add_argument("base")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-time", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=112)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1)
    common(p)
    p.set_defaults(func=cmd_sft)
    p = sub.add_parser("eval")
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=96)
    common(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("grpo")
    p.add_argument("init")
    p.add_argument("out")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a GRPOConfig field")
    common(p)
    p.set_defaults(func=cmd_grpo)
    a = parser.parse_args(argv)
    a.func(a)


if __name__ == "__main__":
    sys.exit(main())
