"""Can a base checkpoint find a fact in its context? Passkey retrieval's skill, probed without SFT,
in the pretraining retrieval text's own format.

Held-out retrieval documents (data/retrieval.py, with seeds that no corpus build uses) state facts
and later ask for them:

    Code D602 stands for 67291. ...prose...
    Q: Which value goes with code D602?
    A: Code D602 stands for 67291.

For every fact asked, the prompt is the document up to the value in its answer (the space before the
value left out, as the tokenizer joins it to the value), and the greedy continuation must start with
the value. Counts are by language and by the lag, in tokens, between the statement and the question.

    python scripts/retrieval_probe.py runs/cpu/long_context/final [--docs 30] [--tokens 250]
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from nanoseek.checkpoint import load_model
from nanoseek.data.retrieval import corpus_prose, retrieval_document
from nanoseek.engine import Engine, SamplingParams
from nanoseek.tokenizer import load_tokenizer

LAGS = ((0, 30), (30, 80), (80, 250), (250, 1024))


def probes(tok, lang: str, docs: int, tokens: int, prose) -> list[dict]:
    """(prompt ids, value, lag) for every fact asked in `docs` held-out documents."""
    out = []
    for i in range(docs):
        text, facts = retrieval_document(
            random.Random(f"retrieval-probe|{lang}|{i}"), lang, prose, tokens=tokens
        )
        for f in facts:
            asked = text.find(f"{f['question']}\n", f["stated_at"])
            value_at = text.find(f["value"], text.find(f["answer"], asked))
            if asked < 0 or value_at < 0:
                continue
            ids = [tok.bos_id, *tok.encode(text[:value_at].rstrip(" "))]
            lag = len(tok.encode(text[f["stated_at"] : asked]))
            out.append({"lang": lang, "ids": ids, "value": f["value"], "lag": lag})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--docs", type=int, default=30, help="documents per language (default: 30)")
    ap.add_argument("--tokens", type=int, default=250, help="document length (default: 250)")
    ap.add_argument("--show", type=int, default=5, help="print this many continuations")
    args = ap.parse_args()

    tok = load_tokenizer(args.checkpoint)
    model = load_model(args.checkpoint, dtype=torch.float32).eval()
    prose = corpus_prose()
    context = model.config.max_position_embeddings
    items = [
        p
        for lang in ("en", "zh")
        for p in probes(tok, lang, args.docs, args.tokens, prose[lang])
        if len(p["ids"]) + 16 <= context
    ]
    engine = Engine(model, None, max_model_len=context)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    for item, out in zip(items, engine.generate([p["ids"] for p in items], params)):
        item["got"] = tok.decode(out.token_ids)
        item["ok"] = item["got"].strip().startswith(item["value"])
    rows = []
    for lang in ("en", "zh"):
        for lo, hi in LAGS:
            at = [p for p in items if p["lang"] == lang and lo <= p["lag"] < hi]
            if at:
                ok = sum(p["ok"] for p in at)
                rows.append({"lang": lang, "lag": f"{lo}-{hi}", "found": ok, "asked": len(at)})
                print(f"{lang} lag {lo}-{hi} tokens: {ok}/{len(at)}")
    for p in items[: args.show]:
        print(f"  want {p['value']!r}, lag {p['lag']}: {p['got']!r}")
    print(json.dumps({"checkpoint": args.checkpoint, "rows": rows}))


if __name__ == "__main__":
    main()
