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
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from nanoseek.checkpoint import load_model
from nanoseek.engine import Engine
from nanoseek.eval.accuracy import evaluate_task
from nanoseek.eval.bpb import LANGS, bits_per_byte, heldout_texts
from nanoseek.eval.passkey import passkey_sweep
from nanoseek.eval.stats import paired_difference
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
    """n_problems *distinct* test-split problems of a task (distinct by `Problem.key`: a Chinese
    problem is its English twin translated, so each key is asked once, in one language, the
    languages alternating). They are spread evenly over the difficulties; a difficulty whose test
    split holds fewer distinct problems than its share gives them all and leaves the rest to the
    others. When the whole split holds fewer than n_problems, all of them are taken (never padded
    with repeats) and a warning says so. -> (task, problems, labels "lang/dN")."""
    task = get_task(name)
    difficulties = list(dict.fromkeys(difficulties))
    taken: set[str] = set()
    chosen: dict[int, list[dict]] = {d: [] for d in difficulties}  # {lang: problem} per key
    open_ = list(difficulties)  # those whose split may hold more
    while open_ and len(taken) < n_problems:
        short = n_problems - len(taken)
        this_round = list(open_)
        for k, d in enumerate(this_round):
            quota = short // len(this_round) + (k < short % len(this_round))
            if quota == 0:
                continue
            fresh, exhausted = _fresh_problems(task, d, quota, langs, seed, taken)
            chosen[d] += fresh
            taken.update(renderings[langs[0]].key for renderings in fresh)
            if exhausted:
                open_.remove(d)
    problems = []
    labels = []
    for d in difficulties:
        for group in chosen[d]:
            lang_index = len(problems) % len(langs)
            problems.append(group[langs[lang_index]])
            labels.append(f"{langs[lang_index]}/d{d}")
    if len(problems) < n_problems:
        warnings.warn(
            f"{name}: the test split of difficulties {difficulties} holds {len(problems)} distinct "
            f"problems, fewer than the {n_problems} asked; all {len(problems)} are evaluated",
            stacklevel=2,
        )
    return task, problems, labels


def _fresh_problems(
    task, difficulty: int, want: int, langs: Sequence[str], seed: int, taken: set[str]
) -> tuple[list[dict], bool]:
    """Up to `want` test-split problems of one difficulty whose keys are not in `taken`, each as
    {lang: rendering}, in the task's own drawing order; and whether the split has no more.
    `Task.generate` is the same sequence whatever n (a longer draw extends a shorter one) and
    repeats keys only once the split's keys run out, which is how exhaustion shows."""
    draw = want + len(taken)
    while True:
        by_lang = {
            lang: task.generate(draw, seed=seed, difficulty=difficulty, split="test", lang=lang)
            for lang in langs
        }
        keyed = {lang: {p.key: p for p in reversed(ps)} for lang, ps in by_lang.items()}
        order = list(dict.fromkeys(p.key for p in by_lang[langs[0]]))
        fresh = [{lang: keyed[lang][key] for lang in langs} for key in order if key not in taken]
        exhausted = len(order) < draw
        if len(fresh) >= want or exhausted:
            return fresh[:want], exhausted and len(fresh) <= want
        draw += want - len(fresh)


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
    """Held-out accuracy of each task ({name: [difficulty, ...]}) on n_problems distinct
    test-split problems (`task_problems`): the one way nanoseek measures it, for `evaluate` and for
    GRPO's in-run evaluation. -> {name: evaluate_task's result + "requested" and "distinct" (fewer
    than requested when the split holds fewer)}."""
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
        out[name] = {
            "difficulties": list(difficulties),
            "requested": n_problems,
            "distinct": len(problems),
            **result,
        }
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
    passkey_trials: int = 50,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """All quality figures of the checkpoint at ckpt_dir. tasks: names (default
    difficulties) or {name: [difficulty, ...]}; None = every task. corpus_dir: where
    val.jsonl is (default: the run's corpus next to the checkpoint, else the default corpus
    built on the fly). passkey_trials: keys per passkey length and language. progress: a progress
    bar per task."""
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
            "passkey_trials": passkey_trials if passkey else None,
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
        engine = Engine(model, None, max_batch_size=64, max_num_batched_tokens=2048, decode="eager")
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
            model, tok, lengths, trials=passkey_trials, langs=langs, seed=seed
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


def paired_gain(before: dict, after: dict) -> dict | None:
    """The change in one task's greedy pass@1 between two evaluations (task results of
    `task_accuracy`), on the problems both graded, paired by problem: eval.stats.paired_difference's
    dict (gain and its Newcombe 95% interval, McNemar p), or None when they share no problem."""
    first = before.get("outcomes") or {}
    second = after.get("outcomes") or {}
    common = [key for key in first if key in second]
    if not common:
        return None
    return paired_difference([first[k] for k in common], [second[k] for k in common])


# ----------------------------------------------------------------------------------------- markdown
def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _with_interval(x, interval) -> str:
    if x is None or not interval:
        return _pct(x)
    return f"{_pct(x)} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _problems_cell(t: dict) -> str:
    asked = t.get("requested")
    if asked is not None and t.get("distinct", asked) < asked:
        return f"{t['problems']} (split holds {t['distinct']} of {asked} asked)"
    return str(t["problems"])


def paired_gains(
    results: dict[str, dict], pairs: Sequence[tuple[str, str]]
) -> dict[str, dict[str, dict]]:
    """{"before -> after": {task: paired_gain}} for each (before, after) of `pairs` that `results`
    (evaluations by name) both hold."""
    out = {}
    for before, after in pairs:
        if before not in results or after not in results:
            continue
        first = results[before].get("tasks", {})
        second = results[after].get("tasks", {})
        gains = {task: paired_gain(first[task], second.get(task, {})) for task in first}
        gains = {task: d for task, d in gains.items() if d is not None}
        if gains:
            out[f"{before} -> {after}"] = gains
    return out


def paired_markdown(
    results: dict[str, dict], pairs: Sequence[tuple[str, str]], heading: str = "###"
) -> list[str]:
    """Per task, the change between two evaluated models on the same problems (`paired_gains`):
    "+x.x points [lo, hi]" and the McNemar p."""
    rows = []
    for change, gains in paired_gains(results, pairs).items():
        for task, d in gains.items():
            lo, hi = d["interval95"]
            rows.append(
                f"| {task} | {change.replace(' -> ', ' → ')} | {d['n']} | {_pct(d['before'])} | "
                f"{_pct(d['after'])} | {100 * d['gain']:+.1f} points [{100 * lo:+.1f}, "
                f"{100 * hi:+.1f}] | {d['gained']} / {d['lost']} | {d['mcnemar_p']:.3g} |"
            )
    if not rows:
        return []
    return [
        f"{heading} Paired changes on the same problems (greedy pass@1)",
        "",
        "Newcombe's 95% interval of the paired difference; exact McNemar p on the problems that "
        "changed (gained / lost).",
        "",
        "| task | change | problems | before | after | change [95% CI] | gained / lost "
        "| McNemar p |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def to_markdown(
    results: dict | list[dict],
    names: Sequence[str] | None = None,
    pairs: Sequence[tuple[str, str]] = (),
) -> str:
    """One result, or several side by side (e.g. stages of a run): bpb, task and passkey tables
    with 95% Wilson intervals, and the paired changes between the named `pairs` of them."""
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
        head = ["model", "task", "problems", "pass@1 (greedy) [95% CI]", "accuracy", "format"] + [
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
                    _problems_cell(t),
                    _with_interval(g.get("pass@1"), g.get("wilson95")),
                    _pct(g.get("accuracy")),
                    _pct(g.get("format")),
                ] + [_pct(s.get(k)) for k in ks]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines += [
            "Problems: distinct held-out problems (a Chinese rendering and its English twin count "
            "once); intervals: 95% Wilson.",
            "",
        ]
        lines += paired_markdown(dict(zip(names, results)), pairs)
    if any("passkey" in r for r in results):
        lines += [
            "### Passkey retrieval (greedy)",
            "",
            "| model | length | lang | prompt tokens | beyond context | YaRN factor | trials "
            "| accuracy [95% CI] |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n, r in zip(names, results):
            for row in r.get("passkey", []):
                beyond = "yes" if row["beyond_trained"] else "no"
                lines.append(
                    f"| {n} | {row['length']} | {row.get('lang', 'en')} | {row['prompt_tokens']}"
                    f" | {beyond} | {row['yarn_factor']:g} | {row.get('trials', '–')}"
                    f" | {_with_interval(row['accuracy'], row.get('wilson95'))} |"
                )
        lines.append("")
    return "\n".join(lines)
