"""Shared pieces of the engine tests: tiny models, a reference decoder that recomputes everything, a stand-in
tokenizer."""

from __future__ import annotations

import pytest
import torch

from nanoseek import Transformer

from conftest import tiny_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Engine tests run single-threaded: their tensors are tiny, and on a busy 2-core machine OpenMP's two
    threads wait on each other for every op (tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny model with weights ten times the usual init scale: attention then shapes the output (at the
    default scale it is nearly uniform, and an attention bug can hide under the residual stream)."""
    torch.manual_seed(seed)
    return Transformer(tiny_config(**{"initializer_range": 0.2, **overrides})).eval()


# The engine computes the same logits in another order, so they differ from the reference's by float rounding
# (under 1e-5: test_latent_cache_decode_attention_equals_expanded_attention; other CPUs' kernels round
# differently again). A greedy choice that the tests compare must win by ten times more.
MIN_GREEDY_MARGIN = 1e-4


@torch.no_grad()
def reference_greedy(model: Transformer, prompt: list[int], n: int, stop_ids: set[int] = frozenset()) -> list[int]:
    """Greedy decoding the slow, obviously right way: model(ids) on the whole sequence for every token. Fails if
    a step is a near-tie, which rounding alone could flip on another CPU: pick another prompt or seed then."""
    ids = list(prompt)
    for step in range(n):
        top2 = model(torch.tensor([ids]))[0, -1].float().topk(2)
        margin = (top2.values[0] - top2.values[1]).item()
        assert margin >= MIN_GREEDY_MARGIN, f"near-tie at greedy step {step} of {prompt}: margin {margin:.2e}"
        ids.append(int(top2.indices[0]))
        if ids[-1] in stop_ids:
            break
    return ids[len(prompt):]


class ByteTokenizer:
    """A stand-in for the real tokenizer: token i < 256 is byte i, so multi-byte characters span tokens the way
    byte-level BPE splits them. 0 is BOS and 1 is EOS (special: they decode to nothing)."""

    bos_id, eos_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        specials = {self.bos_id, self.eos_id} if skip_special_tokens else set()
        return bytes(i for i in ids if i not in specials and i < 256).decode("utf-8", errors="replace")


class CharTokenizer:
    """One character per token: id t >= 2 is chr(t + 30); 0 is BOS and 1 is EOS. Fits a 128-token vocabulary."""

    bos_id, eos_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 30 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i + 30) for i in ids if i >= 2 or not skip_special_tokens)
