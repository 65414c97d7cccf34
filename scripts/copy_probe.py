"""Can a base checkpoint copy numbers out of a question? The first thing
arithmetic needs, probed without SFT.

The pretraining corpus's generated task text writes a problem as

    Question: What is 8 + 4?
    Solution:
    8 + 4
    8+4=12, write 2 carry 1 ...

so a model that learned from it should continue "Question: What is A op B?\\nSolution:\\n" with "A
op B". This asks for that continuation (greedy) on held-out arithmetic problems and counts the exact
copies and the right answers, and (teacher-forced) the share of the copied line's tokens the model
predicts and their mean negative log-likelihood: a graded measure for bases that do not copy yet.

    python scripts/copy_probe.py runs/cpu/long_context/final [--difficulty 1] [--n 30]
"""

from __future__ import annotations

import argparse
import json

import torch

from nanoseek.checkpoint import load_model
from nanoseek.engine import Engine, SamplingParams
from nanoseek.tasks import FORMAT_INSTRUCTIONS, get_task
from nanoseek.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--difficulty", type=int, default=1)
    ap.add_argument("--n", type=int, default=30, help="held-out problems (default: 30)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--show", type=int, default=5, help="print this many continuations")
    args = ap.parse_args()

    model, tok = load_model(args.checkpoint, dtype=torch.float32), load_tokenizer(args.checkpoint)
    problems = get_task("arithmetic").generate(
        args.n, seed=0, difficulty=args.difficulty, split="test"
    )
    # "What is A op B?"
    questions = [p.prompt.removesuffix(FORMAT_INSTRUCTIONS["en"]).strip() for p in problems]
    prompts = [
        [tok.special_ids["bos"], *tok.encode(f"Question: {q}\nSolution:\n")] for q in questions
    ]
    outputs = Engine(model, tok).generate(
        prompts, SamplingParams(max_tokens=args.max_new_tokens, temperature=0)
    )
    # graded, teacher-forced: how well the model predicts the copied line "A op B" token by token
    # (a base that has not learned to copy yet still scores 0 above; this shows how close it is)
    lines = [q.removeprefix("What is ").removesuffix("?") + "\n" for q in questions]
    hits = total = 0
    nll = 0.0
    with torch.no_grad():
        for prompt, line in zip(prompts, lines):
            target = tok.encode(line)
            ids = torch.tensor([prompt + target])
            logits = model(ids).float()[0, len(prompt) - 1 : -1]
            tgt = torch.tensor(target)
            hits += int((logits.argmax(-1) == tgt).sum())
            nll += float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"))
            total += len(target)
    copied = answered = 0
    for i, (p, question, out) in enumerate(zip(problems, questions, outputs)):
        text = out.text
        copied += text.split("\n")[0].strip() == question.removeprefix("What is ").removesuffix("?")
        first_answer = next((line for line in text.split("\n") if line.startswith("Answer:")), None)
        answered += first_answer == f"Answer: {p.answer}"
        if i < args.show:
            print(f"{question!r} -> {text!r}")
    print(
        json.dumps(
            {
                "checkpoint": args.checkpoint,
                "difficulty": args.difficulty,
                "problems": len(problems),
                "copied_operands": copied,
                "right_answers": answered,
                "copy_token_accuracy": round(hits / total, 4),
                "copy_nll_per_token": round(nll / total, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
