"""The pipeline's commands: `nanoseek demo | data | tokenizer |
pretrain | speedrun | report | info`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_demo(args) -> int:
    from nanoseek.demo import run

    result = run(args.out, steps=args.steps, seed=args.seed)
    return 0 if result["continuation"] == result["expected"] else 1


def cmd_info(args) -> int:
    import torch

    from nanoseek.checkpoint import load_checkpoint
    from nanoseek.train.flops import active_matmul_params

    model = load_checkpoint(args.checkpoint).model
    cfg = model.config
    dtype_bytes = torch.finfo(model.embed_tokens.weight.dtype).bits // 8
    head_dims = cfg.qk_head_dim + cfg.v_head_dim
    mha = cfg.num_hidden_layers * cfg.num_attention_heads * head_dims * dtype_bytes
    info = {
        "parameters": model.num_parameters(),
        "active_parameters": model.num_parameters(active=True),
        "active_matmul_parameters": active_matmul_params(cfg),
        "layers": cfg.num_hidden_layers,
        "moe_layers": cfg.n_moe_layers,
        "experts": cfg.n_routed_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "mtp_modules": len(model.mtp),
        "dtype": str(model.embed_tokens.weight.dtype),
        "kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token(dtype_bytes),
        "expanded_mha_cache_bytes_per_token": mha,
        "context": cfg.max_position_embeddings,
    }
    print(json.dumps(info, indent=2))
    return 0


def _preset(args) -> dict:
    from nanoseek.presets import load_preset

    return load_preset(args.preset, args.set)


def cmd_data(args) -> int:
    from nanoseek.stages.corpus import corpus_stage
    from nanoseek.train.dist import DistInfo

    print(json.dumps(corpus_stage(Path(args.out), _preset(args), DistInfo(), args.text), indent=2))
    return 0


def cmd_tokenizer(args) -> int:
    from nanoseek.stages.corpus import corpus_stage
    from nanoseek.stages.tokenizer import tokenizer_stage
    from nanoseek.train.dist import DistInfo

    preset = _preset(args)
    run = Path(args.out)
    corpus_stage(run, preset, DistInfo(), args.text)
    print(json.dumps(tokenizer_stage(run, preset, DistInfo()), indent=2))
    return 0


def cmd_pretrain(args) -> int:
    from nanoseek.stages.speedrun import run_pretraining

    summaries = run_pretraining(
        args.out, _preset(args), text_paths=args.text, long_context=not args.no_long_context
    )
    print(json.dumps(summaries, indent=2))
    return 0


def cmd_speedrun(args) -> int:
    from nanoseek.stages.speedrun import run_speedrun

    summaries = run_speedrun(args.out, _preset(args), text_paths=args.text)
    if "report" in summaries:
        final = summaries["export"]["checkpoint"]
        print(
            f"\nreport card: {summaries['report']}\nmodel card:  {final}/README.md\n\n"
            f"chat with the result:\n"
            f"  nanoseek serve {final}     # OpenAI-compatible API + web chat\n"
            f"  nanoseek chat {final}      # in the terminal"
        )
    return 0


def cmd_vision(args) -> int:
    from nanoseek.presets import load_preset
    from nanoseek.reporting.report_card import write_report
    from nanoseek.stages.vision import vision_stage
    from nanoseek.train.dist import DistInfo

    run = Path(args.out)
    summary = vision_stage(run, load_preset(args.preset, args.set), DistInfo(), init=args.init)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
    if (run / "report.md").is_file():
        print(f"report card: {write_report(run)}")
    return 0


def cmd_report(args) -> int:
    from nanoseek.reporting.report_card import write_report

    print(write_report(args.run))
    return 0


def _run_args(p: argparse.ArgumentParser, default_preset: str = "cpu") -> None:
    from nanoseek.presets import available_presets

    presets = ", ".join(available_presets())
    p.add_argument(
        "--preset",
        default=default_preset,
        help=f"one of {presets}, or a .json file (default: {default_preset})",
    )
    p.add_argument("--out", default=None, help="run directory (default: runs/PRESET)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a preset field, e.g. --set pretrain.max_steps=100 (repeatable)",
    )
    p.add_argument(
        "--text",
        nargs="+",
        default=None,
        metavar="PATH",
        help="train on your own .txt/.md/.jsonl files or folders instead of the embedded corpus",
    )


def add_commands(sub) -> None:
    """Register the pipeline's commands."""
    p = sub.add_parser(
        "demo", help="train a tiny MoE+MLA+MTP model on a counting task, save, reload, generate"
    )
    p.add_argument(
        "--out", default="runs/demo", help="checkpoint directory to write (default: runs/demo)"
    )
    p.add_argument("--steps", type=int, default=80, help="training steps (default: 80)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "data", help="build the corpus: clean, deduplicate and split text into runs/NAME/corpus"
    )
    _run_args(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "tokenizer", help="train the byte-level BPE tokenizer on the corpus (builds it if needed)"
    )
    p.add_argument("action", choices=["train"])
    _run_args(p)
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser(
        "pretrain",
        help="corpus → tokenizer → shards → pretraining → long-context "
        "extension; resumes where it stopped; runs under torchrun",
    )
    _run_args(p)
    p.add_argument("--no-long-context", action="store_true", help="stop after pretraining")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "speedrun",
        help="the whole pipeline: corpus → tokenizer → shards → "
        "pretrain → long context → SFT → GRPO → eval → "
        "runs/NAME/final with a model card, then the report card "
        "(re-running resumes; every stage that finished is "
        "skipped)",
    )
    _run_args(p)
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser(
        "vision",
        help="add a vision stage to a run: a DeepSeek-VL2-style vision-language model on its "
        "post-trained checkpoint (adaptor alignment, joint SFT, held-out visual tasks)",
    )
    p.add_argument(
        "out", metavar="RUN", help="a run directory with sft/final (or grpo/final), e.g. runs/cpu"
    )
    p.add_argument(
        "--preset", default="vision", help="preset with a vision section (default: vision)"
    )
    p.add_argument("--init", default=None, help="start from this language checkpoint instead")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="vision.FIELD=VALUE",
        help="override a field of the preset's vision section (repeatable)",
    )
    p.set_defaults(func=cmd_vision)

    p = sub.add_parser(
        "report", help="(re)build runs/NAME/report.md, report.json and plots from a run directory"
    )
    p.add_argument("run", help="a run directory, e.g. runs/cpu")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "info",
        help="sizes of a checkpoint: parameters, active parameters, KV cache bytes per token",
    )
    p.add_argument("checkpoint", help="a Hugging Face DeepseekV3 directory")
    p.set_defaults(func=cmd_info)
