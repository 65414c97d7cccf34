"""Task accuracy on held-out problems: greedy pass@1, and pass@k from n
sampled completions per problem.

Prompts are rendered with the chat template and its `<think>\\n` generation prompt
(data.chat_tokens.prompt_ids), the completions are generated in one batch by the engine, and the
task's own grader scores them (think prefilled).

pass@k is the unbiased estimator of Chen et al. (2021): with n samples of which c are correct,
    pass@k = 1 − C(n−c, k) / C(n, k) = 1 − Π_{i=n−c+1..n} (1 − k/i),
averaged over problems; the product form avoids huge binomials.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from nanoseek.data.chat_tokens import completion_text, prompt_ids
from nanoseek.engine import Engine, SamplingParams
from nanoseek.eval.stats import wilson_interval
from nanoseek.tasks import Problem, Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without
    replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def token_budget(tok, problem: Problem, max_new_tokens: int) -> int:
    """Room to generate: twice the reference completion, at least 32
    tokens, at most max_new_tokens."""
    ref = len(tok.encode(problem.solution.completion(think_prefilled=True), allow_special=True))
    return max(32, min(max_new_tokens, 2 * ref + 16))


def generate_completions(
    engine: Engine,
    tok,
    problems: Sequence[Problem],
    *,
    n: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    top_k: int | None = None,
    thinking: bool = True,
    progress: bool = False,
) -> tuple[list[list[str]], list[bool]]:
    """-> (completion texts per problem, whether the problem fitted the context). A problem whose
    prompt plus its token budget exceed the engine's context gets no completions (rather than a
    budget too short to answer)."""
    prompts = []
    params = []
    fits = []
    for i, p in enumerate(problems):
        ids = prompt_ids(tok, p.prompt, thinking=thinking)
        budget = token_budget(tok, p, max_new_tokens)
        fits.append(len(ids) + budget <= engine.max_model_len)
        if fits[-1]:
            prompts.append(ids)
            params.append(
                SamplingParams(
                    max_tokens=budget,
                    temperature=temperature,
                    top_k=top_k,
                    n=n,
                    seed=seed + i,
                    stop_token_ids=[tok.eos_id],
                )
            )
    outs = iter(engine.generate(prompts, params, use_tqdm=progress) if prompts else [])
    texts = [
        [completion_text(tok, c.token_ids) for c in next(outs).outputs] if ok else [] for ok in fits
    ]
    return texts, fits


def evaluate_task(
    engine: Engine,
    tok,
    task: Task,
    problems: Sequence[Problem],
    *,
    labels: Sequence[str] | None = None,
    n_samples: int = 0,
    ks: Sequence[int] = (1, 5),
    temperature: float = 0.8,
    max_new_tokens: int = 256,
    seed: int = 0,
    examples: int = 2,
    progress: bool = False,
) -> dict:
    """Greedy pass@1 with its 95% Wilson interval (plus mean partial-credit accuracy and format
    score), each problem's greedy outcome (`outcomes`), and with n_samples > 0 sampled pass@k.
    `labels` (e.g. "en/d1") break greedy pass@1 down by group. Scores are over the problems that
    fit the context; `skipped` counts the others."""
    labels = list(labels) if labels is not None else [p.lang for p in problems]
    texts, fits = generate_completions(
        engine, tok, problems, max_new_tokens=max_new_tokens, seed=seed, progress=progress
    )
    kept = [(p, t[0]) for p, t, ok in zip(problems, texts, fits) if ok]
    kept_labels = [label for label, ok in zip(labels, fits) if ok]
    result = {"problems": len(kept), "skipped": len(problems) - len(kept)}
    if not kept:
        return result
    rewards = task.grade_many([p for p, _ in kept], [t for _, t in kept], think_prefilled=True)
    result["greedy"] = {
        "pass@1": _mean(r.correct for r in rewards),
        "wilson95": _wilson([r.correct for r in rewards]),
        "accuracy": _mean(r.accuracy for r in rewards),
        "format": _mean(r.format for r in rewards),
    }
    groups = defaultdict(list)
    for label, r in zip(kept_labels, rewards):
        groups[label].append(r.correct)
    result["greedy"]["by_group"] = {
        g: {"pass@1": _mean(v), "wilson95": _wilson(v), "problems": len(v)}
        for g, v in sorted(groups.items())
    }
    # problem -> greedy pass@1, keyed by the language-independent part of its id (the digest of
    # its key): two checkpoints graded on the same problems pair up (eval.quality.paired_gain)
    result["outcomes"] = {
        p.id.rsplit("/", 1)[-1]: bool(r.correct) for (p, _), r in zip(kept, rewards)
    }
    result["examples"] = [
        {"prompt": p.prompt[:300], "completion": t[:500], "correct": r.correct}
        for (p, t), r in list(zip(kept, rewards))[:examples]
    ]
    if n_samples > 0:
        samples, _ = generate_completions(
            engine,
            tok,
            [p for p, _ in kept],
            n=n_samples,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed + 1_000_003,
            progress=progress,
        )
        flat_p = [p for p, s in zip([p for p, _ in kept], samples) for _ in s]
        flat_r = task.grade_many(flat_p, [t for s in samples for t in s], think_prefilled=True)
        correct, i = [], 0
        for s in samples:
            correct.append(sum(r.correct for r in flat_r[i : i + len(s)]))
            i += len(s)
        result["sampled"] = {
            "n": n_samples,
            "temperature": temperature,
            **{
                f"pass@{k}": _mean(pass_at_k(n_samples, c, k) for c in correct)
                for k in ks
                if k <= n_samples
            },
        }
    return result


def _wilson(correct: Sequence[bool]) -> list[float]:
    lo, hi = wilson_interval(sum(bool(c) for c in correct), len(correct))
    return [round(lo, 4), round(hi, 4)]


def _mean(values) -> float:
    values = list(values)
    return round(float(sum(values)) / len(values), 4) if values else 0.0
