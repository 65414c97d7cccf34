"""The eval stage: `evaluate` (eval/quality.py) on every finished checkpoint of a
run (pretrain, long_context, sft, sft_control, grpo, distill) into runs/NAME/eval/<stage>.json,
plus report.md, tables that compare them (with the paired changes of PAIRS)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nanoseek.eval.chat import chat_eval_checkpoint, needs_chat_eval
from nanoseek.eval.quality import evaluate, paired_gains, to_markdown
from nanoseek.io import atomic_write_text
from nanoseek.stages.common import stage_done, write_done
from nanoseek.train import dist

# in table order; the last evaluated one is the model handed on (reporting/model_card.py), so
# GRPO's control (sft_control) comes before GRPO
STAGES = ("pretrain", "long_context", "sft", "sft_control", "grpo", "distill")
# (before, after) stages whose task results are compared problem by problem
# (eval.quality.paired_gains): what GRPO adds, what more SFT for GRPO's time adds, and GRPO
# against that control
PAIRS = (("sft", "grpo"), ("sft", "sft_control"), ("sft_control", "grpo"))
# how the figures are drawn: a cached result of an older method is evaluated again (2: distinct
# problems, per-problem outcomes, intervals, passkey per language)
METHOD = 2


def fingerprint(ckpt: Path) -> str:
    """Changes whenever the checkpoint is rewritten (its files' names,
    sizes and modification times)."""
    files = sorted(p for p in ckpt.iterdir() if p.is_file())
    stamp = "".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files)
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def eval_stage(run: Path, preset: dict, info) -> dict:
    """Evaluate every finished checkpoint of the run (preset section "eval": keyword arguments of
    `evaluate`, plus "stages") into runs/NAME/eval/<stage>.json, and compare them in
    runs/NAME/eval/report.md. A stage's result is reused while its checkpoint is unchanged, so
    running the pipeline again only evaluates what is new: unlike the other stages it runs every
    time, its done.json is the latest comparison."""
    run, out = Path(run), Path(run) / "eval"
    settings = dict(preset.get("eval") or {})
    stages = settings.pop("stages", list(STAGES))
    chat = settings.pop("chat", False)  # eval/chat.py on the chat models: its settings, or false
    results, names = [], []
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stage in stages:
            ckpt = run / stage / "final"
            if not (ckpt / "config.json").is_file():
                continue
            cached, stamp = out / f"{stage}.json", fingerprint(ckpt)
            r = json.loads(cached.read_text("utf-8")) if cached.is_file() else {}
            if (
                r.get("fingerprint") != stamp
                or r.get("settings_requested") != settings
                or r.get("method") != METHOD
            ):
                print(f"[eval] {ckpt}", flush=True)
                r = {
                    **evaluate(ckpt, **settings),
                    "fingerprint": stamp,
                    "settings_requested": settings,
                    "method": METHOD,
                }
                atomic_write_text(cached, json.dumps(r, indent=2, ensure_ascii=False) + "\n")
            if needs_chat_eval(r, stage, chat):
                r.update(
                    chat=chat_eval_checkpoint(ckpt, run / "corpus", **chat), chat_settings=chat
                )
                atomic_write_text(cached, json.dumps(r, indent=2, ensure_ascii=False) + "\n")
            results.append(r)
            names.append(stage)
        if not results:
            raise FileNotFoundError(
                f"{run}: no finished checkpoint to evaluate (looked for {list(stages)})"
            )
        atomic_write_text(out / "report.md", to_markdown(results, names, PAIRS) + "\n")
        summary = {
            "stages": names,
            "report": str(out / "report.md"),
            "wall_s": round(sum(r.get("wall_s", 0.0) for r in results), 1),
            "pass@1": {
                n: {t: v.get("greedy", {}).get("pass@1") for t, v in r.get("tasks", {}).items()}
                for n, r in zip(names, results)
            },
            "bpb": {n: r.get("bpb") for n, r in zip(names, results)},
            "paired": {
                change: {
                    t: {k: d[k] for k in ("n", "gain", "interval95", "mcnemar_p")}
                    for t, d in gains.items()
                }
                for change, gains in paired_gains(dict(zip(names, results)), PAIRS).items()
            },
        }
        write_done(out, summary)
        print(
            f"[eval] done in {summary['wall_s']:.1f}s: "
            + ", ".join(
                f"{n} pass@1 " + " ".join(f"{t}={v}" for t, v in p.items())
                for n, p in summary["pass@1"].items()
            )
            + f"; tables in {out / 'report.md'}",
            flush=True,
        )
    dist.barrier(info)
    return stage_done(out)
