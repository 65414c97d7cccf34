"""llama.cpp as the speed anchor, timed the way `llama-bench` times it.

A ctypes loop over llama.cpp's own `llama_decode` (llama-cpp-python's low-level bindings, no
high-level `Llama` object and none of its per-token Python work): prefill is one batch of
`prompt_tokens` tokens into an empty cache; decode first fills the cache to `depth` tokens
(llama-bench's `-d`), then decodes `new_tokens` tokens one at a time, each the greedy choice of the
last step's logits (as `Engine.generate` with temperature 0 does). Context parameters are
llama-bench's defaults (n_batch 2048, n_ubatch 512, f16 KV cache, flash attention auto).

    python benchmarks/llama_cpp_anchor.py MODEL.gguf [--threads 2] [--prompt 256] [--new 128]
                                          [--depth 0] [--reps 3]

prints {"prefill_tok_s", "decode_tok_s", ...} as one JSON line. benchmarks/engine.py imports
`LlamaCppModel` to time llama.cpp beside nanoseek in the same run.
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

    def __init__(self, path: str | Path, threads: int, n_ctx: int = 4096):
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a GGUF file (e.g. from `nanoseek export CKPT --gguf OUT`)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256, help="prefill batch, tokens")
    ap.add_argument("--new", type=int, default=128, help="decoded tokens")
    ap.add_argument("--depth", type=int, default=0, help="cached tokens before decoding")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    row = measure(args.model, args.threads, args.prompt, args.new, args.depth, args.reps)
    print(json.dumps({"bench": "llama.cpp", "model": str(args.model), **row}))


if __name__ == "__main__":
    main()
