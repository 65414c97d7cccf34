"""`evaluate(checkpoint)`: every quality figure of one model as a
dict, and `to_markdown` for people.

    bpb       bits per byte on held-out English, Chinese and code text
    tasks     held-out (test-split) problems of each verifiable task: greedy pass@1, accuracy,
              format, pass@k
    passkey   retrieval accuracy at several context lengths, up to and beyond the model's
              context (YaRN)

The eval stage (stages/eval.py) runs it on every finished checkpoint of a run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from nanoseek.checkpoint import load_model
from nanoseek.engine import Engine
from nanoseek.eval.accuracy import evaluate_task
from nanoseek.eval.bpb import LANGS, bits_per_byte, heldout_texts
from nanoseek.eval.passkey import passkey_sweep
from nanoseek.tasks import TASKS, get_task
from nanoseek.tokenizer import load_tokenizer

DEFAULT_TASKS = {
    "arithmetic": [1, 2],
    "countdown": [1],
    "word_problems": [1],
    "code": [1],
    "passkey": [1],
}


def task_problems(
    name: str, difficulties: Sequence[int], n_problems: int, langs: Sequence[str], seed: int = 0
):
    """n_problems test-split problems, spread over difficulties ×
    languages. -> (problems, labels)."""
    task = get_task(name)
    problems = []
    labels = []
    cells = [(d, lang) for d in difficulties for lang in langs]
    for k, (d, lang) in enumerate(cells):
        n = n_problems // len(cells) + (k < n_problems % len(cells))
        if n:
            batch = task.generate(n, seed=seed, difficulty=d, split="test", lang=lang)
            problems += batch
            labels += [f"{lang}/d{d}"] * len(batch)
    return task, problems, labels


def task_accuracy(
    engine: Engine,
    tok,
    tasks: dict[str, list[int]],
    n_problems: int,
    langs: Sequence[str],
    *,
    n_samples: int = 0,
    ks: Sequence[int] = (1, 5),
    temperature: float = 0.8,
    max_new_tokens: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict]:
    """Held-out accuracy of each task ({name: [difficulty, ...]}) on n_problems test-split problems:
    the one way nanoseek measures it, for `evaluate` and for GRPO's in-run evaluation.
    -> {name: evaluate_task's result}."""
    out = {}
    for name, difficulties in tasks.items():
        task, problems, labels = task_problems(name, difficulties, n_problems, langs, seed)
        result = evaluate_task(
            engine,
            tok,
            task,
            problems,
            labels=labels,
            n_samples=n_samples,
            ks=ks,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            progress=progress,
        )
        out[name] = {"difficulties": list(difficulties), **result}
    return out


def evaluate(
    ckpt_dir: str | Path,
    tasks: Sequence[str] | dict | None = None,
    n_problems: int = 50,
    *,
    langs: Sequence[str] = ("en", "zh"),
    n_samples: int = 0,
    ks: Sequence[int] = (1, 5),
    temperature: float = 0.8,
    max_new_tokens: int = 256,
    bpb: bool = True,
    bpb_bytes: int = 50_000,
    corpus_dir: str | Path | None = None,
    passkey: bool = True,
    passkey_lengths: Sequence[int] | None = None,
    passkey_keys: int = 2,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """All quality figures of the checkpoint at ckpt_dir. tasks: names (default
    difficulties) or {name: [difficulty, ...]}; None = every task. corpus_dir: where
    val.jsonl is (default: the run's corpus next to the checkpoint, else the default corpus
    built on the fly). progress: a progress bar per task."""
    ckpt_dir = Path(ckpt_dir)
    wanted = _task_spec(tasks)  # fail on a bad task name before any work
    started = time.perf_counter()
    model = load_model(ckpt_dir, device=device, dtype=torch.float32)
    tok = load_tokenizer(ckpt_dir)
    context = model.config.max_position_embeddings
    result: dict = {
        "checkpoint": str(ckpt_dir),
        "params": model.num_parameters(),
        "active_params": model.num_parameters(active=True),
        "context": context,
        "settings": {
            "n_problems": n_problems,
            "langs": list(langs),
            "n_samples": n_samples,
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
        },
    }
    if bpb:
        corpus_dir = corpus_dir or _run_corpus(ckpt_dir)
        texts = heldout_texts(corpus_dir, bpb_bytes)
        result["bpb"] = {
            lang: round(bits_per_byte(model, tok, t)["bpb"], 4) for lang, t in texts.items()
        }
        result["bpb_source"] = (
            str(corpus_dir) if corpus_dir else "default corpus (built for this evaluation)"
        )
    if wanted:
        engine = Engine(model, None, max_batch_size=64, max_num_batched_tokens=2048)
        result["tasks"] = task_accuracy(
            engine,
            tok,
            wanted,
            n_problems,
            langs,
            n_samples=n_samples,
            ks=ks,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            progress=progress,
        )
    if passkey:
        lengths = passkey_lengths or sorted(
            {max(128, context // 4), max(128, context // 2), context, 2 * context}
        )
        result["passkey"] = passkey_sweep(
            model, tok, lengths, keys_per_depth=passkey_keys, seed=seed
        )
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def _task_spec(tasks) -> dict[str, list[int]]:
    if tasks is None:
        return dict(DEFAULT_TASKS)
    spec = (
        dict(tasks)
        if isinstance(tasks, dict)
        else {name: DEFAULT_TASKS.get(name, [1]) for name in tasks}
    )
    unknown = sorted(set(spec) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    return spec


def _run_corpus(ckpt_dir: Path) -> Path | None:
    """runs/NAME/<stage>/final -> runs/NAME/corpus, when it is there."""
    for parent in list(ckpt_dir.resolve().parents)[:3]:
        if (parent / "corpus" / "val.jsonl").is_file():
            return parent / "corpus"
    return None


# ----------------------------------------------------------------------------------------- markdown
def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def to_markdown(results: dict | list[dict], names: Sequence[str] | None = None) -> str:
    """One result, or several side by side (e.g. stages of a run): bpb, task and passkey tables."""
    results = [results] if isinstance(results, dict) else list(results)
    names = list(
        names
        or [
            Path(r["checkpoint"]).parent.name
            if Path(r["checkpoint"]).name == "final"
            else Path(r["checkpoint"]).name
            for r in results
        ]
    )
    lines = []
    if any("bpb" in r for r in results):
        langs = [lang for lang in LANGS if any(lang in r.get("bpb", {}) for r in results)]
        lines += [
            "### Bits per byte on held-out text (lower is better)",
            "",
            "| model | " + " | ".join(langs) + " |",
            "|---" * (len(langs) + 1) + "|",
        ]
        lines += [
            f"| {n} | "
            + " | ".join(
                f"{r['bpb'][lang]:.3f}" if lang in r.get("bpb", {}) else "–" for lang in langs
            )
            + " |"
            for n, r in zip(names, results)
        ]
        lines.append("")
    if any("tasks" in r for r in results):
        ks = sorted(
            {
                k
                for r in results
                for t in r.get("tasks", {}).values()
                for k in t.get("sampled", {})
                if k.startswith("pass@")
            },
            key=lambda k: int(k[5:]),
        )
        head = ["model", "task", "problems", "pass@1 (greedy)", "accuracy", "format"] + [
            f"{k} (sampled)" for k in ks
        ]
        lines += [
            "### Held-out task accuracy",
            "",
            "| " + " | ".join(head) + " |",
            "|---" * len(head) + "|",
        ]
        for n, r in zip(names, results):
            for task, t in r.get("tasks", {}).items():
                g, s = t.get("greedy", {}), t.get("sampled", {})
                row = [
                    n,
                    task,
                    str(t["problems"]),
                    _pct(g.get("pass@1")),
                    _pct(g.get("accuracy")),
                    _pct(g.get("format")),
                ] + [_pct(s.get(k)) for k in ks]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if any("passkey" in r for r in results):
        lines += [
            "### Passkey retrieval (greedy)",
            "",
            "| model | length | prompt tokens | beyond context | YaRN factor | accuracy |",
            "|---|---|---|---|---|---|",
        ]
        for n, r in zip(names, results):
            for row in r.get("passkey", []):
                beyond = "yes" if row["beyond_trained"] else "no"
                lines.append(
                    f"| {n} | {row['length']} | {row['prompt_tokens']} | {beyond}"
                    f" | {row['yarn_factor']:g} | {_pct(row['accuracy'])} |"
                )
        lines.append("")
    return "\n".join(lines)
