"""Post-training and evaluation commands: `nanoseek sft`, `nanoseek grpo`,
`nanoseek distill`, `nanoseek eval`.

cli/__init__.py calls `add_commands(subparsers)`; each command is a thin layer over stages/sft.py,
stages/grpo.py, train/distill.py and eval/. Preset sections "sft", "grpo", "distill" and "eval" can
be overridden with --set.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.presets import apply_override, load_preset
from nanoseek.presets import section as section_of


def _run_dir(args) -> Path:
    return Path(args.out or f"runs/{Path(args.preset).stem}")


# ------------------------------------------------------------------------------------- commands
def cmd_sft(args) -> int:
    from nanoseek.stages.sft import sft_stage
    from nanoseek.train.dist import init_distributed, shutdown
    from nanoseek.train.trainer import TrainConfig

    preset = load_preset(args.preset, args.set)
    section = preset["sft"] = section_of(preset, "sft")
    if args.data:
        section["chat_jsonl"] = list(section.get("chat_jsonl") or []) + args.data
    if args.only_data:
        if not args.data:
            raise ValueError("--only-data needs --data FILE.jsonl")
        section.update(problems_per_task=0, identity=0, corpus_qa=0)
    info = init_distributed(TrainConfig(device=section.get("device", "auto")).resolved_device)
    try:
        summary = sft_stage(_run_dir(args), preset, info, base=args.init)
    finally:
        shutdown(info)
    if info.is_main:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def cmd_eval(args) -> int:
    from nanoseek.eval import evaluate, to_markdown

    result = evaluate(
        args.checkpoint,
        tasks=args.tasks,
        n_problems=args.n_problems,
        langs=args.langs,
        n_samples=args.samples,
        ks=args.k,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        bpb=not args.no_bpb,
        corpus_dir=args.corpus,
        passkey=not args.no_passkey,
        passkey_lengths=args.passkey_lengths,
        passkey_trials=args.passkey_trials,
        seed=args.seed,
    )
    markdown = to_markdown(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", "utf-8")
    if args.markdown:
        Path(args.markdown).write_text(markdown + "\n", "utf-8")
    print(markdown)
    return 0


def cmd_distill(args) -> int:
    from nanoseek.train.distill import distill

    preset: dict = {}
    if args.preset:
        preset = load_preset(args.preset, args.set)
    else:  # no preset: --set still applies, to the distillation defaults
        for item in args.set:
            apply_override(preset, item)
    section = section_of(preset, "distill")
    if args.answer_only:
        section["targets"] = "answer_only"
    summary = distill(args.teacher, args.student, args.out, section, traces=args.traces)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def cmd_grpo(args) -> int:
    from nanoseek.stages.grpo import grpo_stage
    from nanoseek.train.dist import init_distributed, shutdown
    from nanoseek.train.grpo_trainer import GRPOConfig

    preset = load_preset(args.preset, args.set)
    preset["grpo"] = section_of(preset, "grpo")
    info = init_distributed(GRPOConfig(**preset["grpo"]).resolved_device)
    try:
        print(json.dumps(grpo_stage(_run_dir(args), preset, info, init=args.init), indent=2))
    finally:
        shutdown(info)
    return 0


def _add_grpo(subparsers) -> None:
    p = subparsers.add_parser(
        "grpo",
        help="R1-style RL (GRPO) with verifiable task rewards: runs/NAME/sft/final -> "
        "runs/NAME/grpo/final; resumes where it stopped; runs under torchrun",
    )
    p.add_argument(
        "--preset",
        default="cpu",
        help='a preset name or .json file; its "grpo" section (default: cpu)',
    )
    p.add_argument("--out", default=None, help="run directory (default: runs/PRESET)")
    p.add_argument(
        "--init",
        default=None,
        metavar="CKPT",
        help="start from this checkpoint instead of RUN/sft/final",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a preset field, e.g. --set grpo.group_size=16 "
        "--set grpo.tasks='[\"countdown:1\"]'",
    )
    p.set_defaults(func=cmd_grpo)


# ------------------------------------------------------------------------------------- parsers
def add_commands(subparsers) -> None:
    from nanoseek.presets import available_presets

    presets = ", ".join(available_presets())

    def run_args(p):
        p.add_argument(
            "--preset", default="cpu", help=f"one of {presets}, or a .json file (default: cpu)"
        )
        p.add_argument("--out", default=None, help="run directory (default: runs/PRESET)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.FIELD=VALUE",
            help="override a preset field, e.g. --set sft.max_steps=200 (repeatable)",
        )

    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning on chat data (worked task "
        "solutions, generated conversations, your JSONL) into "
        "runs/NAME/sft/final; resumes",
    )
    run_args(p)
    p.add_argument(
        "--init",
        default=None,
        metavar="CKPT",
        help="start from this checkpoint (default: the run's long_context/final, "
        "else pretrain/final)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        default=None,
        metavar="FILE.jsonl",
        help='your chat data: one {"messages": [{"role", "content", '
        '"reasoning_content"?}, ...]} per line',
    )
    p.add_argument(
        "--only-data", action="store_true", help="train on --data alone, without the built-in mix"
    )
    p.set_defaults(func=cmd_sft)

    _add_grpo(subparsers)

    p = subparsers.add_parser(
        "eval",
        help="bits per byte, held-out task accuracy (pass@1, pass@k) "
        "and passkey retrieval of a checkpoint, as a markdown "
        "table and JSON",
    )
    p.add_argument(
        "checkpoint", help="a nanoseek (HF DeepseekV3) checkpoint directory with its tokenizer"
    )
    p.add_argument(
        "--tasks", nargs="*", default=None, help="task names (default: all); none to skip tasks"
    )
    p.add_argument(
        "--n-problems",
        type=int,
        default=50,
        help="distinct held-out problems per task (default: 50; fewer when the split holds fewer)",
    )
    p.add_argument("--langs", nargs="+", default=["en", "zh"], choices=["en", "zh"])
    p.add_argument(
        "--samples",
        type=int,
        default=0,
        help="sampled completions per problem for pass@k (default: 0)",
    )
    p.add_argument(
        "--k", type=int, nargs="+", default=[1, 5], help="k values for pass@k (default: 1 5)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="sampling temperature for pass@k (default: 0.8)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--corpus",
        default=None,
        help="corpus directory with val.jsonl for bits per byte (default: the run's, "
        "else the default corpus built on the fly)",
    )
    p.add_argument("--no-bpb", action="store_true", help="skip bits per byte")
    p.add_argument("--no-passkey", action="store_true", help="skip the passkey sweep")
    p.add_argument(
        "--passkey-lengths",
        type=int,
        nargs="+",
        default=None,
        metavar="TOKENS",
        help="context lengths for the passkey sweep (default: context/4, /2, ×1, ×2)",
    )
    p.add_argument(
        "--passkey-trials",
        type=int,
        default=50,
        metavar="N",
        help="passkey keys per length and language (default: 50)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="write the full results as JSON")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the markdown tables")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "distill", help="R1-Distill: a teacher's verified reasoning traces → SFT of a student"
    )
    p.add_argument(
        "--teacher", default=None, metavar="CKPT", help="checkpoint that writes the traces"
    )
    p.add_argument(
        "--student", required=True, metavar="CKPT", help="checkpoint to fine-tune on them"
    )
    p.add_argument(
        "--out", required=True, help="output directory (traces.jsonl, checkpoints/, final/)"
    )
    p.add_argument(
        "--traces",
        default=None,
        metavar="FILE.jsonl",
        help="use these traces instead of generating",
    )
    p.add_argument(
        "--answer-only",
        action="store_true",
        help="control experiment: the same prompts with answer-only targets (no reasoning traces)",
    )
    p.add_argument(
        "--preset", default=None, help="preset whose 'distill' section to use (optional)"
    )
    p.add_argument("--set", action="append", default=[], metavar="distill.FIELD=VALUE")
    p.set_defaults(func=cmd_distill)
