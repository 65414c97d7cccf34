"""Per-request state: a Request holds n Sequences (its completions); what callers get back is a
RequestOutput, built up in place, and a StepEvent per completion per step.

A Sequence's tokens are `token_ids` (prompt, then generated). `num_computed` of them have their
latents in the cache; while decoding that is all but the last sampled token. Text comes from a
TextStream: incremental detokenization that holds back text which may still turn into a stop string.
A prompt with images carries PromptImages: the image embeddings that replace its `<image>`
positions at prefill, and each image's span and content hash (the prefix cache's key).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanoseek.engine.sampling import SamplingParams, TokenLogprob

WAITING = "waiting"
RUNNING = "running"
FINISHED = "finished"


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None  # None without a tokenizer
    finish_reason: str | None = None  # "stop", "length" or "cancelled"; None while running
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    # prompt tokens served from the prefix cache (the first completion's admission)
    cached_tokens: int = 0
    prompt: str | None = None
    finished: bool = False
    # with SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing
    # precedes it); filled as prefill chunks compute, complete once the first token is sampled
    prompt_logprobs: list[TokenLogprob | None] | None = None

    # the first completion, for the common n == 1 case
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass
class PromptImages:
    """A prompt's images, encoded once when the request is added."""

    embeds: torch.Tensor  # [image positions, d]: the vision tower's output, in placeholder order
    index: torch.Tensor  # [prompt length] long: row of embeds for an image position, else -1
    spans: tuple[tuple[int, int, bytes], ...]  # per image: (first position, end, content hash)


@dataclass
class StepEvent:
    """What one completion gained in one step."""

    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]  # new tokens
    text: str | None  # new text (None without a tokenizer)
    logprobs: list[TokenLogprob] | None
    finished: bool  # this completion is done
    finish_reason: str | None
    output: RequestOutput  # the whole request so far; output.finished once every completion is done


class TextStream:
    """Incremental detokenization with stop strings.

    Decoding a window of a few tokens before the new ones keeps byte-level merges and multi-byte
    characters right; text that ends in an incomplete character ("\\ufffd") waits for the next
    token. `text` is the completion's text so far, cut before a stop string once one appears;
    `take()` returns what may be shown: everything not yet shown except a tail that is still the
    beginning of some stop string.
    """

    CONTEXT = 4  # prompt tokens decoded along with the first output tokens

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...]):
        self.tok = tokenizer
        self.stop = stop
        self.ids = list(prompt_ids[-self.CONTEXT :])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.shown = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> bool:
        """Add a generated token. -> True when a stop string has appeared
        (text is then cut before it)."""
        if self.stopped:
            return True
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        before = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return self._find_stop(before)

    def _find_stop(self, before: int) -> bool:
        if not self.stop:
            return False
        start = max(0, before - max(map(len, self.stop)) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def finish(self) -> None:
        """No more tokens: keep the bytes of an incomplete character as they decode."""
        if not self.stopped and self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            before = len(self.text)
            self.text += self._decode(self.ids[self.prefix_offset :])[len(prefix) :]
            self.read_offset = len(self.ids)
            self._find_stop(before)

    def take(self, final: bool = False) -> str:
        end = len(self.text)
        if not final and self.stop:
            for n in range(min(max(map(len, self.stop)) - 1, end - self.shown), 0, -1):
                tail = self.text[end - n :]
                if any(s.startswith(tail) for s in self.stop):
                    end -= n
                    break
        out = self.text[self.shown : end]
        self.shown = end
        return out


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        prompt: str | None,
        callback: Callable[[StepEvent], None] | None,
        group: str | None = None,
        images: PromptImages | None = None,
    ):
        self.request_id = request_id
        self.images = images
        self.params = params
        self.callback = callback
        self.group = request_id if group is None else group  # the batch is shared by group
        self.output = RequestOutput(
            request_id,
            list(prompt_ids),
            [
                CompletionOutput(i, logprobs=None if params.logprobs is None else [])
                for i in range(params.n)
            ],
            prompt=prompt,
        )
        if params.prompt_logprobs is not None:
            self.output.prompt_logprobs = [None] * len(prompt_ids)
        self.prompt_logprobs_done = params.prompt_logprobs is None
        self.sequences: list[Sequence] = []


class Sequence:
    def __init__(
        self,
        request: Request,
        index: int,
        token_ids: list[int],
        rng: random.Random,
        detok: TextStream | None,
    ):
        self.request = request
        self.index = index
        self.token_ids = list(token_ids)
        self.num_prompt = len(self.request.output.prompt_token_ids)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.status = WAITING
        self.in_decode = False  # prefill done: one uncomputed token at the end
        self.rng = rng
        self.detok = detok
        self.draft: int | None = None  # MTP's guess for the token after the last one
        self.pending_forks = 0  # siblings to fork off once the prompt is computed (n > 1)
        self.admitted = False

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def images(self) -> PromptImages | None:
        return self.request.images

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Its prefill must compute every prompt position (no prefix-cache hits) and record each
        one's logprob: the request asked for prompt logprobs, and they are not complete yet."""
        return self.index == 0 and not self.request.prompt_logprobs_done

    @property
    def completion(self) -> CompletionOutput:
        return self.request.output.outputs[self.index]
