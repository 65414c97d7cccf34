"""Long-context passkey retrieval: a 5-digit key hidden at several depths in filler text of several
lengths, up to and beyond the context the model was trained for.

Lengths beyond the trained context are reached with YaRN at inference: the rope scaling factor grows
by length / context (the original pretraining length stays the same), which is how a YaRN model is
stretched further without training. `extended(model, length)` builds that model; the weights are
shared, nothing is copied.
"""

from __future__ import annotations

from collections.abc import Sequence

from nanoseek.data.chat_tokens import completion_text, prompt_ids
from nanoseek.engine import Engine, SamplingParams
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
    keys_per_depth: int = 2,
    trained_context: int | None = None,
    lang: str = "en",
    seed: int = 0,
) -> list[dict]:
    """Greedy retrieval accuracy per length. -> [{"length", "prompt_tokens", "beyond_trained",
    "yarn_factor", "accuracy", "by_depth"}]."""
    trained = trained_context or model.config.max_position_embeddings
    task, rows = Passkey(), []
    for length in lengths:
        m = extended(model, length)
        items = passkey_prompts(tok, length, depths, keys_per_depth, lang, seed)
        engine = Engine(
            m,
            None,
            max_batch_size=max(1, len(items)),
            max_model_len=length,
            max_num_batched_tokens=max(1024, length),
        )
        params = SamplingParams(
            max_tokens=ANSWER_TOKENS, temperature=0.0, stop_token_ids=[tok.eos_id]
        )
        outs = engine.generate([ids for _, ids in items], params)
        rewards = [
            task.grade(p, completion_text(tok, o.token_ids), think_prefilled=True)
            for (p, _), o in zip(items, outs)
        ]
        by_depth = {
            f"{d:g}": round(
                sum(r.correct for (p, _), r in zip(items, rewards) if p.metadata["depth"] == d)
                / keys_per_depth,
                4,
            )
            for d in depths
        }
        rows.append(
            {
                "length": length,
                "prompt_tokens": max(len(ids) for _, ids in items),
                "beyond_trained": length > trained,
                "yarn_factor": round(m.config.yarn_factor, 4),
                "accuracy": round(sum(r.correct for r in rewards) / len(rewards), 4),
                "by_depth": by_depth,
            }
        )
    return rows
