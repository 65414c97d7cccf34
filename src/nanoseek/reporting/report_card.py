"""The report card of a run: `runs/NAME/report.md` + `report.json` + PNG
plots, from the files the stages wrote.

It reads only what is on disk (done.json, metrics.jsonl, checkpoints), so it can be rebuilt at any
time with `nanoseek report runs/NAME`, and it shows every stage that has finished.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.io import atomic_write_text
from nanoseek.stages.common import TRAINED_STAGES, latest_checkpoint

# sft_control (GRPO's control) is evaluated, never the model handed on: not a TRAINED_STAGE
STAGES = (
    "corpus",
    "tokenizer",
    "shards",
    *TRAINED_STAGES,
    "sft_control",
    "vision",
    "eval",
    "export",
)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}


def _done(path: Path) -> dict | None:
    return _read_json(path / "done.json") or None


def eval_results(run: Path) -> dict[str, dict]:
    """{stage: the eval stage's result for that stage's checkpoint}, in pipeline order."""
    from nanoseek.stages.eval import STAGES as EVALUATED

    return {
        s: _read_json(run / "eval" / f"{s}.json")
        for s in EVALUATED
        if (run / "eval" / f"{s}.json").is_file()
    }


def stage_cost(s: dict, price_per_hour: float | None) -> float | None:
    """The trainer's estimate where there is one, else wall time at
    the run's price for one device."""
    if s.get("estimated_cost") is not None:
        return s["estimated_cost"]
    return None if price_per_hour is None else round(s.get("wall_s", 0) / 3600 * price_per_hour, 4)


def collect(run: Path) -> dict:
    """Every figure of the run, as one JSON-able dict."""
    preset = _read_json(run / "preset.json")
    data: dict = {
        "run": str(run),
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "price_per_hour": preset.get("price_per_hour"),
        "stages": {},
    }
    for stage in STAGES:
        done = _done(run / stage)
        if done is not None:
            data["stages"][stage] = done
    final = latest_checkpoint(run)
    if final is not None:
        cfg = ModelConfig.from_pretrained(final)
        pre = data["stages"].get("pretrain", {})
        mha = (
            cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 2
        )
        data["model"] = {
            "checkpoint": str(final),
            "params": pre.get("params"),
            "active_params": pre.get("active_params"),
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "routed_experts": cfg.n_routed_experts,
            "experts_per_token": cfg.num_experts_per_tok,
            "shared_experts": cfg.n_shared_experts,
            "mtp_modules": cfg.num_nextn_predict_layers,
            "context": cfg.max_position_embeddings,
            "kv_cache_bytes_per_token_bf16": cfg.kv_cache_bytes_per_token(2),
            "mha_cache_bytes_per_token_bf16": mha,
            "kv_cache_reduction_vs_mha": round(mha / cfg.kv_cache_bytes_per_token(2), 1),
        }
    return data


def plot_losses(run: Path, out: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    offset, plotted = 0, False
    for stage in TRAINED_STAGES:
        rows = [r for r in _read_jsonl(run / stage / "metrics.jsonl") if "lm_loss_avg" in r]
        if not rows:
            continue
        steps = [offset + r["step"] for r in rows]
        ax.plot(steps, [r["lm_loss_avg"] for r in rows], label=f"{stage} train")
        val = [(offset + r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o--", label=f"{stage} val")
        offset, plotted = steps[-1], True
    unigram = (_done(run / "pretrain") or {}).get("unigram_entropy")
    if unigram:
        ax.axhline(unigram, color="grey", linestyle=":", label=f"unigram entropy {unigram:.2f}")
    if not plotted:
        plt.close(fig)
        return None
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    return "loss.png"


def plot_expert_load(run: Path, out: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _read_jsonl(run / "pretrain" / "metrics.jsonl") if r.get("expert_load")]
    if not rows:
        return None
    load = torch.tensor(rows[-1]["expert_load"])
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * load.shape[0]))
    im = ax.imshow(load * load.shape[1], cmap="viridis", aspect="auto", vmin=0)
    ax.set(
        xlabel="expert",
        ylabel="MoE layer (last = MTP)",
        title=f"Expert load at step {rows[-1]['step']} (1.0 = even share)",
    )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "expert_load.png", dpi=110)
    plt.close(fig)
    return "expert_load.png"


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _stage_result(name: str, s: dict) -> str:
    if name == "corpus":
        return f"{_fmt(s.get('docs'))} docs, {_fmt(s.get('bytes'))} bytes"
    if name == "tokenizer":
        per_lang = ", ".join(f"{k} {v:.2f}" for k, v in (s.get("bytes_per_token") or {}).items())
        return f"vocab {s.get('vocab_size')}, bytes/token {per_lang}"
    if name == "shards":
        return f"{_fmt(s.get('tokens'))} train tokens"
    if name == "grpo":
        return (
            f"held-out accuracy {_pct(s.get('val_accuracy_before'))} → "
            f"{_pct(s.get('val_accuracy'))}, final reward {_fmt(s.get('reward'))}"
        )
    if name == "vision":
        sft = (
            f"{_pct(s.get('val_accuracy_sft'))} after SFT → "
            if s.get("grpo") and "val_accuracy_sft" in s
            else ""
        )
        return (
            f"held-out visual accuracy (mean over tasks) {_pct(s.get('val_accuracy_before'))} → "
            f"{sft}{_pct(s.get('val_accuracy'))}" + (" after GRPO" if sft else "")
        )
    if name == "eval":
        return f"{', '.join(s.get('stages', []))} evaluated"
    if name == "export":
        return (
            f"`{s.get('checkpoint')}` with model card, from {Path(s.get('source', '')).parent.name}"
        )
    if name == "sft":
        return f"loss {_fmt(s.get('final_loss'))}, held-out answer loss {_fmt(s.get('val_loss'))}"
    if name == "sft_control":
        budget = s.get("budget") or {}
        matched = (
            f"GRPO's {_fmt(budget.get('grpo_train_s'))} s of training"
            if budget.get("matched") == "grpo_time"
            else f"a fixed {budget.get('max_steps')} steps"
        )
        return (
            f"GRPO's control: the SFT continued {_fmt(s.get('steps'))} steps in "
            f"{_fmt(s.get('train_s'))} s ({matched}), held-out answer loss "
            f"{_fmt(s.get('val_loss'))}"
        )
    return f"loss {_fmt(s.get('final_loss'))}, val bpb {_fmt(s.get('val_bpb'))}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def render(
    data: dict,
    plots: list[str],
    evals: dict[str, dict] | None = None,
    samples: list[dict] | None = None,
) -> str:
    m, stages = data["machine"], data["stages"]
    gpu = f", {m['gpu']}" if m["gpu"] else ""
    lines = [
        f"# nanoseek report: {data['run']}",
        "",
        f"Generated {data['generated']} on {m['cpu']} "
        f"({m['cores']} cores{gpu}), torch {m['torch']}, Python {m['python']}.",
        "",
    ]
    lines += [
        "## Stages",
        "",
        "| stage | wall (s) | tokens | FLOPs | MFU | est. cost ($) | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in stages.items():
        lines.append(
            f"| {name} | {_fmt(s.get('wall_s'))} | {_fmt(s.get('tokens'))} | "
            f"{_fmt(s.get('flops'))} | {_fmt(s.get('mfu'))} | "
            f"{_fmt(stage_cost(s, data.get('price_per_hour')))} | {_stage_result(name, s)} |"
        )
    total = sum(s.get("wall_s", 0) for s in stages.values())
    costs = [
        c
        for c in (stage_cost(s, data.get("price_per_hour")) for s in stages.values())
        if c is not None
    ]
    price = data.get("price_per_hour")
    lines += [
        "",
        f"Total wall time: {total:.0f} s ({total / 60:.1f} min)"
        + (
            f", estimated cost ${sum(costs):.4f} at ${price}/device-hour"
            if price is not None
            else ""
        )
        + ". MFU is measured against a matmul peak taken at the start of each stage.",
        "",
    ]
    if "model" in data:
        md = data["model"]
        lines += [
            "## Model",
            "",
            f"- {_fmt(md['params'])} parameters, {_fmt(md['active_params'])} active "
            f"per token ({md['layers']} layers, d={md['hidden_size']}, "
            f"{md['routed_experts']} routed experts with top-{md['experts_per_token']} "
            f"+ {md['shared_experts']} shared, {md['mtp_modules']} MTP module)",
            f"- latent KV cache: {md['kv_cache_bytes_per_token_bf16']:,} bytes/token in bf16, "
            f"{md['kv_cache_reduction_vs_mha']}× less than an expanded multi-head cache "
            f"({md['mha_cache_bytes_per_token_bf16']:,} bytes/token)",
            f"- context {md['context']} tokens; checkpoint `{md['checkpoint']}`",
            "",
        ]
    pre = stages.get("pretrain")
    if pre and pre.get("unigram_entropy") and pre.get("val_loss"):
        lines += [
            f"Pretraining validation loss {pre['val_loss']:.3f} nats/token "
            f"vs the corpus' unigram entropy {pre['unigram_entropy']:.3f}.",
            "",
        ]
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    if evals:
        from nanoseek.eval.chat import chat_markdown
        from nanoseek.eval.quality import to_markdown
        from nanoseek.stages.eval import PAIRS

        lines += [
            "## Evaluation",
            "",
            "Held-out data only: the corpus' validation split and the tasks' test split. Each "
            "accuracy is over distinct problems with its 95% Wilson interval; the changes between "
            "stages pair the same problems (docs/post-training.md, how the figures are computed).",
            "",
            to_markdown(list(evals.values()), list(evals), PAIRS).replace("### ", "#### "),
            "",
            *chat_markdown(evals),
        ]
    if "vision" in stages:
        lines += vision_section(stages["vision"])
    if samples:
        lines += ["## Sample answers of the final model (greedy)", ""]
        for s in samples:
            verdict = (
                ""
                if "correct" not in s
                else (" — correct" if s["correct"] else f" — wrong (expected {s['expected']})")
            )
            lines += [
                f"**[{s['lang']}] {s['prompt']}**{verdict}",
                "",
                "```",
                f"<think>{s['reasoning']}</think>",
                s["answer"],
                "```",
                "",
            ]
    return "\n".join(lines)


def vision_section(v: dict) -> list[str]:
    """The vision stage: held-out visual-task accuracy before training, after joint SFT and after
    GRPO, with 95% Wilson intervals, chance, and GRPO's change with its paired interval; the GRPO
    reward curve; what vision cost the language model on text; then sample images with their
    questions and the model's answers."""
    grpo = v.get("grpo")
    lines = [
        "## Vision",
        "",
        f"A DeepSeek-VL2-style vision-language model on `{v.get('init')}` "
        f"(encoder {'trained' if v.get('train_encoder') else 'frozen'} in joint SFT"
        + (f", then {grpo['steps']} GRPO steps on the visual tasks" if grpo else "")
        + f"): `{v.get('checkpoint')}`. Held-out problems (split by problem key, rendered "
        "afresh), the same problems and pictures at every point, greedy through the engine; "
        "95% Wilson intervals"
        + (
            "; GRPO's change is paired (the same problems after SFT and after GRPO: Newcombe's "
            "interval, exact McNemar p)."
            if grpo
            else "."
        ),
        "",
    ]
    head = ["task", "problems (distinct)", "chance", "before", "after SFT"]
    if grpo:
        head += ["after GRPO", "GRPO − SFT [95% paired]"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in (v.get("tasks") or {}).items():
        a = r["after"]  # the final model: after GRPO when the stage ran it, else after SFT
        row = [
            name,
            f"{a['problems']} ({a.get('distinct_keys', '–')})",
            _pct(a["chance"]),
            _interval(r["before"]),
            _interval(r.get("sft", a)),
        ]
        if grpo:
            row += [_interval(a), _change(r.get("grpo_change"))]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if grpo:
        lines += [
            f"GRPO: {grpo['steps']} steps, mean reward {_fmt(grpo.get('reward_first'))} at the "
            f"first step, {_fmt(grpo.get('reward'))} at the last; "
            f"{_pct(grpo.get('zero_var_frac'))} of the groups had equal rewards (no signal).",
            "",
        ]
        if grpo.get("reward_plot"):
            lines += ["![vision GRPO reward](vision/grpo/reward_curve.png)", ""]
    lines += _text_cost_lines(v.get("text"), v.get("text_mix"))
    for s in v.get("samples") or []:
        verdict = "correct" if s["correct"] else f"wrong (expected {s['answer']})"
        completion = s["completion"].strip().replace("\n", " ")
        lines += [
            f"![{s['task']}](vision/{s['image']})",
            "",
            f"**{s['question'].removeprefix('<image>').strip()}** — {verdict}",
            "",
            "```",
            completion[:300],
            "```",
            "",
        ]
    return lines


def _text_cost_lines(t: dict | None, mix: dict | None = None) -> list[str]:
    """What vision costs text: the language model's bits per byte (before the stage, after joint
    SFT when a GRPO phase followed it, after the stage) and text-task accuracy on the starting
    checkpoint and on the vision model's language part; the text share joint SFT trained with."""
    if not t:
        return []
    lines = [
        "### What vision costs text",
        "",
        "The language model alone, before the vision stage (its starting checkpoint) and after it "
        "(the vision model's language part), on held-out text.",
        "",
    ]
    lines += _text_share_lines(mix)
    before = t.get("bpb_before") or {}
    sft = t.get("bpb_sft") or {}
    after = t.get("bpb_after") or {}
    langs = [lang for lang in before if lang in after]
    if langs:
        rows = [("before vision", before)]
        if all(lang in sft for lang in langs):
            rows.append(("after joint SFT", sft))
        rows.append(("after vision", after))
        lines += [
            "| bits per byte (lower is better) | " + " | ".join(langs) + " |",
            "|---" * (len(langs) + 1) + "|",
            *(
                "| " + label + " | " + " | ".join(f"{b[x]:.3f}" for x in langs) + " |"
                for label, b in rows
            ),
            "| change | " + " | ".join(f"{after[x] - before[x]:+.3f}" for x in langs) + " |",
            "",
            f"Held-out text: `{t.get('bpb_source')}`, up to {t.get('bpb_bytes')} bytes per "
            "language"
            + (
                "; “after joint SFT” is the language model before the GRPO phase, “after vision” "
                "the final one."
                if len(rows) == 3
                else "."
            ),
            "",
        ]
    else:
        lines += ["No held-out corpus was found for bits per byte.", ""]
    if t.get("tasks"):
        lines += [
            "| text task | problems | before vision | after vision | change [95% paired] |",
            "|---|---|---|---|---|",
        ]
        for name, r in t["tasks"].items():
            lines.append(
                f"| {name} | {r['after']['problems']} | {_interval(r['before'])} | "
                f"{_interval(r['after'])} | {_change(r.get('change'))} |"
            )
        lines.append("")
    return lines


def _text_share_lines(mix: dict | None) -> list[str]:
    """The sentence naming joint SFT's text share (the stage's `text_mix` summary)."""
    if not mix:
        return []
    share = mix.get("share") or 0.0
    if not share:
        return ["Joint SFT trained on image conversations only (text share 0%).", ""]
    tokens = mix.get("text_target_share")
    return [
        f"Joint SFT trained with a text share of {_pct(share)}: {_fmt(mix.get('text_per_epoch'))} "
        f"text-only conversations (from the text SFT's own mix, a pool of "
        f"{_fmt(mix.get('text_pool'))}) beside {_fmt(mix.get('image_per_epoch'))} image "
        "conversations per epoch"
        + (f", {_pct(tokens)} of the trained answer tokens." if tokens is not None else "."),
        "",
    ]


def _interval(r: dict) -> str:
    lo, hi = r["wilson95"]
    return f"{_pct(r['accuracy'])} [{_pct(lo)}, {_pct(hi)}]"


def _change(c: dict | None) -> str:
    """A paired change in points: +5.0 [-2.1, +12.0] (McNemar p 0.31)."""
    if not c:
        return "–"
    lo, hi = c["interval95"]
    return (
        f"{100 * c['gain']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}] "
        f"(+{c['gained']}/−{c['lost']}, p {c['mcnemar_p']:.2g})"
    )


def write_report(run: str | os.PathLike) -> Path:
    run = Path(run)
    data = collect(run)
    reward_plot = run / "grpo" / "reward_curve.png"
    plots = [
        p
        for p in (
            plot_losses(run, run),
            plot_expert_load(run, run),
            "grpo/reward_curve.png" if reward_plot.is_file() else None,
        )
        if p
    ]
    evals = eval_results(run)
    samples = (
        json.loads((run / "export" / "samples.json").read_text("utf-8"))
        if (run / "export" / "samples.json").is_file()
        else []
    )
    from nanoseek.eval.quality import paired_gains
    from nanoseek.stages.eval import PAIRS

    data.update(
        plots=plots,
        eval={
            s: {k: r.get(k) for k in ("bpb", "tasks", "passkey", "chat")} for s, r in evals.items()
        },
        paired=paired_gains(evals, PAIRS),
        samples=samples,
    )
    atomic_write_text(run / "report.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(run / "report.md", render(data, plots, evals, samples) + "\n")
    return run / "report.md"
