"""llama.cpp as the speed anchor, timed the way `llama-bench` times it.

A ctypes loop over llama.cpp's own `llama_decode` (llama-cpp-python's low-level bindings, no
high-level `Llama` object and none of its per-token Python work): prefill is one batch of
`prompt_tokens` tokens into an empty cache; decode first fills the cache to `depth` tokens
(llama-bench's `-d`), then decodes `new_tokens` tokens one at a time, each the greedy choice of the
last step's logits (as `Engine.generate` with temperature 0 does). Context parameters are
llama-bench's defaults (n_batch 2048, n_ubatch 512, f16 KV cache, flash attention auto).

    python benchmarks/llama_cpp_anchor.py MODEL.gguf [--threads 2] [--prompt 256] [--new 128]
                                          [--depth 0] [--reps 3] [--sequences 1]

prints {"prefill_tok_s", "decode_tok_s", ...} as one JSON line; with --sequences N (> 1),
{"parallel_tok_s", "one_request_tok_s", ...}: N requests at once, each a prompt of --prompt tokens
and --new greedy tokens (all prompts prefilled in one batch, then one batch per step holding every
sequence's next token), against one request alone, as `Engine.generate` serves them.
benchmarks/engine.py imports `LlamaCppModel` to time llama.cpp beside nanoseek in the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np


def _quiet_logs(llama_cpp) -> None:
    @llama_cpp.llama_log_callback
    def ignore(level, text, user_data):
        pass

    _quiet_logs.callback = ignore  # keep the ctypes callback alive as long as the library
    llama_cpp.llama_log_set(ignore, ctypes.c_void_p())


class LlamaCppModel:
    """One GGUF model and context, with llama-bench's context defaults."""

    def __init__(self, path: str | Path, threads: int, n_ctx: int = 4096, sequences: int = 1):
        import llama_cpp

        self.lib = llama_cpp
        _quiet_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(path).encode(), llama_cpp.llama_model_default_params()
        )
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = 2048
        params.n_ubatch = 512
        params.n_threads = threads
        params.n_seq_max = sequences  # with llama-bench's kv_unified off: measured faster here
        params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.rng = random.Random(0)

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def _decode(self, tokens: list[int]) -> None:
        array = (self.lib.llama_token * len(tokens))(*tokens)
        batch = self.lib.llama_batch_get_one(array, len(tokens))
        if self.lib.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _random_tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.n_vocab) for _ in range(n)]

    def prefill_seconds(self, prompt_tokens: int) -> float:
        """Seconds to decode one batch of prompt_tokens random tokens into an empty cache."""
        self._clear()
        tokens = self._random_tokens(prompt_tokens)
        start = time.perf_counter()
        self._decode(tokens)
        self.lib.llama_synchronize(self.ctx)
        return time.perf_counter() - start

    def decode_seconds(self, new_tokens: int, depth: int = 0) -> float:
        """Seconds to decode new_tokens greedy tokens one by one after `depth` cached tokens."""
        self._clear()
        token = self._random_tokens(1)[0]
        if depth:
            self._decode(self._random_tokens(depth))
            token = self._greedy()
        start = time.perf_counter()
        for _ in range(new_tokens):
            self._decode([token])
            token = self._greedy()
        return time.perf_counter() - start

    def generate_seconds(self, sequences: int, prompt_tokens: int, new_tokens: int) -> float:
        """Seconds for `sequences` requests at once, as `Engine.generate` serves them: every
        prompt of prompt_tokens random tokens prefilled in one batch, then new_tokens steps of one
        batch holding each sequence's next token (greedy). The context must have been made with
        sequences >= this many."""
        self._clear()
        lib = self.lib
        batch = lib.llama_batch_init(sequences * prompt_tokens, 0, 1)
        try:

            def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits

            start = time.perf_counter()
            batch.n_tokens = sequences * prompt_tokens
            for seq in range(sequences):
                for pos, token in enumerate(self._random_tokens(prompt_tokens)):
                    put(seq * prompt_tokens + pos, token, pos, seq, pos == prompt_tokens - 1)
            for step in range(new_tokens):
                if lib.llama_decode(self.ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                logits = lib.llama_get_logits(self.ctx)  # the output rows, in batch order
                tokens = np.ctypeslib.as_array(logits, shape=(sequences, self.n_vocab)).argmax(1)
                batch.n_tokens = sequences
                for seq, token in enumerate(tokens.tolist()):
                    put(seq, token, prompt_tokens + step, seq, True)
            return time.perf_counter() - start
        finally:
            lib.llama_batch_free(batch)

    def _greedy(self) -> int:
        logits = self.lib.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())


def export_for_llama_cpp(model, out_dir: Path, types: tuple[str, ...] = ("f32",)) -> dict:
    """Save `model` with a byte-level BPE tokenizer of its vocabulary size (trained on the
    standard library's sources: llama.cpp needs one to load; the timings feed token ids) and export
    it to GGUF in each type. -> {type: path}."""
    from nanoseek import save_model
    from nanoseek.export.gguf import export_gguf
    from nanoseek.tokenizer import Tokenizer

    checkpoint = out_dir / "checkpoint"
    save_model(model, checkpoint)
    root = Path(argparse.__file__).parent
    texts = [p.read_text(errors="replace") for p in sorted(root.glob("*.py"))]
    Tokenizer.train(texts, model.config.vocab_size).save(checkpoint)
    return {t: export_gguf(checkpoint, out_dir / f"model-{t}.gguf", type=t) for t in types}


def measure(
    path: str | Path, threads: int, prompt: int, new: int, depth: int = 0, reps: int = 3
) -> dict:
    """Median tokens/s over reps, after one warm-up of each."""
    model = LlamaCppModel(path, threads, n_ctx=max(prompt, depth + new) + 16)
    try:
        model.prefill_seconds(prompt)
        model.decode_seconds(min(new, 8), depth)
        prefill = statistics.median(model.prefill_seconds(prompt) for _ in range(reps))
        decode = statistics.median(model.decode_seconds(new, depth) for _ in range(reps))
    finally:
        model.close()
    return {
        "prefill_tok_s": prompt / prefill,
        "decode_tok_s": new / decode,
        "threads": threads,
        "prompt": prompt,
        "new": new,
        "depth": depth,
    }


def measure_parallel(
    path: str | Path, threads: int, sequences: int, prompt: int, new: int, reps: int = 3
) -> dict:
    """`sequences` requests at once and one alone (`LlamaCppModel.generate_seconds`), median
    tokens/s (generated tokens over the whole time, prefill included) over reps after a warm-up."""
    model = LlamaCppModel(path, threads, n_ctx=sequences * (prompt + new + 16), sequences=sequences)
    try:
        row = {}
        for n, key in ((sequences, "parallel_tok_s"), (1, "one_request_tok_s")):
            model.generate_seconds(n, prompt, min(new, 8))
            seconds = statistics.median(model.generate_seconds(n, prompt, new) for _ in range(reps))
            row[key] = n * new / seconds
    finally:
        model.close()
    return row | {"threads": threads, "sequences": sequences, "prompt": prompt, "new": new}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a GGUF file (e.g. from `nanoseek export CKPT --gguf OUT`)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256, help="prefill batch, tokens")
    ap.add_argument("--new", type=int, default=128, help="decoded tokens")
    ap.add_argument("--depth", type=int, default=0, help="cached tokens before decoding")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--sequences",
        type=int,
        default=1,
        help="> 1: that many requests at once against one alone (prompt tokens each, then new "
        "tokens in steps of one batch) instead of the prefill and decode figures",
    )
    args = ap.parse_args()
    if args.sequences > 1:
        row = measure_parallel(
            args.model, args.threads, args.sequences, args.prompt, args.new, args.reps
        )
    else:
        row = measure(args.model, args.threads, args.prompt, args.new, args.depth, args.reps)
    print(json.dumps({"bench": "llama.cpp", "model": str(args.model), **row}))


if __name__ == "__main__":
    main()
