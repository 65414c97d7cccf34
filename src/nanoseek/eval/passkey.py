"""Long-context passkey retrieval: a 5-digit key hidden at several depths in filler text of several
lengths, up to and beyond the context the model was trained for, in each language; every length ×
language gets its number of trials and a 95% Wilson interval.

Lengths beyond the trained context are reached with YaRN at inference: the rope scaling factor grows
by length / context (the original pretraining length stays the same), which is how a YaRN model is
stretched further without training. `extended(model, length)` builds that model; the weights are
shared, nothing is copied.
"""

from __future__ import annotations

from collections.abc import Sequence

from nanoseek.data.chat_tokens import completion_text, prompt_ids
from nanoseek.engine import Engine, SamplingParams
from nanoseek.eval.stats import wilson_interval
from nanoseek.model import Transformer
from nanoseek.tasks import Passkey

# "The text says: the pass key is 12345.</think><answer>12345</answer>" with room to spare
ANSWER_TOKENS = 48


def extended(model: Transformer, length: int) -> Transformer:
    """`model` with a context of at least `length` tokens: itself if it is long enough, else a
    YaRN-stretched copy that shares its weights."""
    cfg = model.config
    context = cfg.max_position_embeddings
    if length <= context:
        return model
    rs = dict(
        cfg.rope_scaling
        or {
            "type": "yarn",
            "factor": 1.0,
            "original_max_position_embeddings": context,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    rs["factor"] = float(rs["factor"]) * length / context
    new = Transformer(cfg.replace(max_position_embeddings=length, rope_scaling=rs))
    state = {k: v for k, v in model.state_dict().items() if k not in ("rope_cos", "rope_sin")}
    new.load_state_dict(state, strict=False, assign=True)
    return new.to(next(model.parameters()).device).eval()


def passkey_prompts(
    tok, length: int, depths: Sequence[float], keys_per_depth: int, lang: str = "en", seed: int = 0
) -> list[tuple]:
    """Problems whose rendered prompt plus the answer budget is at most `length` tokens (as close as
    whole filler sentences allow). -> [(problem, prompt ids)]."""
    task, out = Passkey(), []
    probe = task.make(4000, 0.5, lang=lang)
    chars_per_token = len(probe.prompt) / len(prompt_ids(tok, probe.prompt))
    for depth in depths:
        for j in range(keys_per_depth):
            chars = int((length - ANSWER_TOKENS) * chars_per_token)
            while True:
                p = task.make(chars, depth, lang=lang, seed=seed * 1000 + j)
                ids = prompt_ids(tok, p.prompt)
                if len(ids) + ANSWER_TOKENS <= length or chars < 50:
                    break
                chars = int(chars * 0.95)
            out.append((p, ids))
    return out


def passkey_sweep(
    model: Transformer,
    tok,
    lengths: Sequence[int],
    *,
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    trials: int = 50,
    langs: Sequence[str] = ("en",),
    trained_context: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Greedy retrieval accuracy per length and language, over `trials` keys each (spread evenly
    over the depths), with its 95% Wilson interval. -> [{"length", "lang", "prompt_tokens",
    "beyond_trained", "yarn_factor", "trials", "accuracy", "wilson95", "by_depth", "outcomes"}]
    (outcomes: each trial's result, in a fixed order, so two checkpoints pair up)."""
    if trials < 1:
        raise ValueError(f"passkey trials={trials}: must be >= 1")
    trained = trained_context or model.config.max_position_embeddings
    task, rows = Passkey(), []
    per_depth = [trials // len(depths) + (j < trials % len(depths)) for j in range(len(depths))]
    for length in lengths:
        m = extended(model, length)
        items = {
            lang: [
                item
                for depth, keys in zip(depths, per_depth)
                if keys
                for item in passkey_prompts(tok, length, [depth], keys, lang, seed)
            ]
            for lang in langs
        }
        flat = [item for lang in langs for item in items[lang]]
        engine = Engine(
            m,
            None,
            max_batch_size=min(64, len(flat)),
            max_model_len=length,
            max_num_batched_tokens=max(1024, length),
            decode="eager",
        )
        params = SamplingParams(
            max_tokens=ANSWER_TOKENS, temperature=0.0, stop_token_ids=[tok.eos_id]
        )
        outs = iter(engine.generate([ids for _, ids in flat], params))
        for lang in langs:
            graded = [
                (p, task.grade(p, completion_text(tok, next(outs).token_ids), think_prefilled=True))
                for p, _ in items[lang]
            ]
            correct = [r.correct for _, r in graded]
            lo, hi = wilson_interval(sum(correct), len(correct))
            by_depth = {}
            for d in depths:
                at = [r.correct for p, r in graded if p.metadata["depth"] == d]
                if at:
                    by_depth[f"{d:g}"] = round(sum(at) / len(at), 4)
            rows.append(
                {
                    "length": length,
                    "lang": lang,
                    "prompt_tokens": max(len(ids) for _, ids in items[lang]),
                    "beyond_trained": length > trained,
                    "yarn_factor": round(m.config.yarn_factor, 4),
                    "trials": len(correct),
                    "accuracy": round(sum(correct) / len(correct), 4),
                    "wilson95": [round(lo, 4), round(hi, 4)],
                    "by_depth": by_depth,
                    "outcomes": [bool(c) for c in correct],
                }
            )
    return rows
