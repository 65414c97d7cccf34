"""Sampling: what a request asks for (SamplingParams) and how a batch of
logit rows becomes tokens (Sampler).

Every row is processed on its own, so a request's tokens do not depend on what else is in the batch:
    logits -> repetition / presence / frequency penalties -> the request's logits processors
           -> greedy argmax (temperature 0)
           or  / temperature -> top-k, top-p, min-p masks
               -> inverse-CDF draw with the request's own uniform
The uniforms come from a per-sequence `random.Random`: one float per token, no tensor op per row.
Logprobs are those of the raw model distribution (log_softmax of the logits before any processing).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens (None = all)
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    # OpenAI semantics, over generated tokens: -= p if the token appeared
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0  # -= f x (times the token appeared)
    # CTRL-style, over prompt + generated tokens: logit / r if > 0 else x r
    repetition_penalty: float = 1.0
    stop: Sequence[str] | str | None = None  # strings that end the text (not included in it)
    # tokens that end the generation (kept in token_ids)
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1  # completions per prompt; they share the prompt's prefill
    # None: no logprobs; k: the chosen token's logprob and the top-k alternatives
    logprobs: int | None = None
    # vLLM's prompt_logprobs: None, or k = every prompt token's logprob given the tokens before it
    # (the first has none) with the top-k alternatives. The whole prompt is then computed: a
    # prefix-cache hit would skip positions.
    prompt_logprobs: int | None = None
    # f(output_ids, logits[V]) -> logits[V], after the penalties: constrained decoding (JSON), logit
    # bias. The same callables serve all n completions, so they must keep no per-sequence state of
    # their own.
    logits_processors: Sequence[Callable[[Sequence[int], torch.Tensor], torch.Tensor]] = ()
    stop_list: tuple[str, ...] = field(init=False, repr=False)
    stop_ids: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self):
        def need(cond: bool, message: str):
            if not cond:
                raise ValueError(f"SamplingParams: {message}")

        need(
            _is_int(self.max_tokens) and self.max_tokens >= 0,
            f"max_tokens={self.max_tokens!r} must be an integer >= 0 (0: score the prompt only)",
        )
        need(_is_int(self.n) and self.n >= 1, f"n={self.n!r} must be an integer >= 1")
        need(
            _is_num(self.temperature) and self.temperature >= 0,
            f"temperature={self.temperature!r} must be a number >= 0 (0 means greedy)",
        )
        need(
            self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1),
            f"top_k={self.top_k!r} must be None (no limit) or an integer >= 1",
        )
        need(
            _is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p={self.top_p!r} must lie in (0, 1]"
        )
        need(
            _is_num(self.min_p) and 0 <= self.min_p <= 1, f"min_p={self.min_p!r} must lie in [0, 1]"
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(_is_num(value) and -2 <= value <= 2, f"{name}={value!r} must lie in [-2, 2]")
        need(
            _is_num(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty={self.repetition_penalty!r} must be > 0 (1 means none)",
        )
        need(
            self.seed is None or _is_int(self.seed),
            f"seed={self.seed!r} must be an integer or None",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(
                value is None or (_is_int(value) and value >= 0),
                f"{name}={value!r} must be None or an integer >= 0",
            )
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        need(
            all(isinstance(s, str) and s for s in stop),
            f"stop={self.stop!r} must be non-empty strings",
        )
        ids = list(self.stop_token_ids or ())
        need(
            all(_is_int(i) and i >= 0 for i in ids),
            f"stop_token_ids={self.stop_token_ids!r} must be ints >= 0",
        )
        need(
            all(callable(f) for f in self.logits_processors), "logits_processors must be callables"
        )
        self.stop_list = tuple(stop)
        self.stop_ids = frozenset(ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )

    @property
    def truncates(self) -> bool:
        return self.top_k is not None or self.top_p < 1 or self.min_p > 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN


def make_rng(seed: int | None, index: int) -> random.Random:
    """The uniform stream of completion `index` of a request. Completion 0 with seed s draws exactly
    what a request with n=1 and seed s draws; without a seed the stream is seeded from the OS."""
    if seed is None:
        return random.Random()
    return random.Random(seed if index == 0 else f"{seed}:{index}")


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model, and the top alternatives, best first.
    rank: 1 + the number of tokens more likely than the chosen one."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None


@dataclass
class Row:
    """One logit row to sample: whose it is and what it has seen (penalties read the history)."""

    params: SamplingParams
    rng: random.Random
    token_ids: Sequence[int]  # prompt, then generated tokens
    num_prompt: int
    extra: tuple[int, ...] = ()  # tokens assumed generated after token_ids (a speculative draft)

    @property
    def prompt_ids(self) -> Sequence[int]:
        return self.token_ids[: self.num_prompt]

    @property
    def output_ids(self) -> list[int]:
        return [*self.token_ids[self.num_prompt :], *self.extra]


class Sampler:
    """Turns logit rows [R, V] into tokens, one independent decision per row."""

    def apply_penalties(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        """Penalties, then logits processors; a new tensor when anything
        changes (logprobs read the raw one)."""
        if not any(r.params.has_penalties or r.params.logits_processors for r in rows):
            return logits
        logits = logits.clone()
        V = logits.shape[-1]
        for i, r in enumerate(rows):
            p = r.params
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(
                    list({*r.prompt_ids, *r.output_ids}), dtype=torch.long, device=logits.device
                )
                vals = logits[i, seen]
                logits[i, seen] = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
            output = r.output_ids
            if (p.presence_penalty or p.frequency_penalty) and output:
                counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=V)[:V]
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
            for f in p.logits_processors:
                logits[i] = f(output, logits[i])
        return logits

    def probabilities(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        """Penalised logits [R, V] of sampled (temperature > 0) rows -> the
        distribution each row draws from."""
        temps = torch.tensor([r.params.temperature for r in rows], device=logits.device).unsqueeze(
            1
        )
        logits = logits.float() / temps
        if any(r.params.truncates for r in rows):
            logits = self._truncate(logits, rows)
        return logits.softmax(dim=-1)

    def _truncate(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        V, dev = logits.shape[-1], logits.device
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        top_k = torch.tensor([min(r.params.top_k or V, V) for r in rows], device=dev).unsqueeze(1)
        top_p = torch.tensor([r.params.top_p for r in rows], device=dev).unsqueeze(1)
        min_p = torch.tensor([r.params.min_p for r in rows], device=dev).unsqueeze(1)
        rank = torch.arange(V, device=dev).unsqueeze(0)
        # probability of the tokens ranked above this one
        mass_before = probs.cumsum(dim=-1) - probs
        drop = (rank >= top_k) | (mass_before >= top_p) | (probs < min_p * probs[:, :1])
        drop[:, 0] = False  # the most likely token always survives
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)

    @staticmethod
    def draw(probs: torch.Tensor, uniforms: Sequence[float]) -> torch.Tensor:
        """Inverse-CDF sampling: row i takes the first token whose
        cumulative probability exceeds u_i."""
        cdf = probs.double().cumsum(dim=-1)
        u = torch.tensor(uniforms, dtype=cdf.dtype, device=cdf.device).unsqueeze(1) * cdf[:, -1:]
        idx = torch.searchsorted(cdf, u, right=True).squeeze(1)  # never a zero-probability token...
        V = probs.shape[-1]
        if not idx.numel() or int(idx.max()) < V:  # (the cdf is flat after the last nonzero one)
            return idx
        last = V - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
        # ...except past the end, when u x total rounds up to the total
        return torch.minimum(idx, last)

    def sample(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
        """logits [R, V] -> one token per row."""
        logits = self.apply_penalties(logits, rows)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        tokens = _argmax(logits) if len(sampled) < len(rows) else [0] * len(rows)
        if sampled:
            some = logits if len(sampled) == len(rows) else logits[sampled]
            probs = self.probabilities(some, [rows[i] for i in sampled])
            drawn = self.draw(probs, [rows[i].rng.random() for i in sampled])
            for i, t in zip(sampled, drawn.tolist()):
                tokens[i] = t
        return tokens

    @staticmethod
    def logprobs(
        logits: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]
    ) -> list[TokenLogprob]:
        """Raw-model logprobs of the chosen tokens [R] and the top-k alternatives of each row."""
        logp = logits.float().log_softmax(dim=-1)
        chosen = logp.gather(1, torch.tensor(tokens, device=logp.device).unsqueeze(1))
        ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()
        chosen = chosen.squeeze(1).tolist()
        kmax = max(ks, default=0)
        top_v, top_i = logp.topk(kmax, dim=-1) if kmax else (None, None)
        out = []
        for r, (tok, lp, k) in enumerate(zip(tokens, chosen, ks)):
            top = list(zip(top_i[r, :k].tolist(), top_v[r, :k].tolist())) if k else []
            out.append(TokenLogprob(tok, lp, top, ranks[r]))
        return out


def _argmax(logits: torch.Tensor) -> list[int]:
    """Each row's first largest logit (a NaN counts as largest), as torch.argmax gives it; through
    numpy for fp32 CPU rows, where torch's reduction costs ~10x more per call."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(dim=-1).tolist()
