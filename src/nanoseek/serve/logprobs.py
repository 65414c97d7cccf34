"""Log-probabilities in the API's shapes: the chat `logprobs.content` list, the legacy completions
object (with echo: the prompt's tokens first), and vLLM's `prompt_logprobs`. The engine gives
(token id, logprob, top alternatives); `TokenTable` gives each token's text and bytes."""

from __future__ import annotations

import codecs

from nanoseek.serve import protocol
from nanoseek.serve.chat_format import TokenTable


def _finite(x: float) -> float:
    return max(x, -9999.0)  # JSON has no -inf


def chat_logprobs(t: TokenTable, lps) -> protocol.ChatLogprobs:
    return protocol.ChatLogprobs(
        content=[
            protocol.TokenLogprob(
                token=t.text(lp.token_id),
                logprob=_finite(lp.logprob),
                bytes=t.raw(lp.token_id),
                top_logprobs=[
                    protocol.TopLogprob(token=t.text(i), logprob=_finite(v), bytes=t.raw(i))
                    for i, v in lp.top
                ],
            )
            for lp in lps
        ]
    )


def vllm_prompt_logprobs(t: TokenTable, lps: list | None) -> protocol.PromptLogprobs | None:
    """The engine's prompt logprobs in vLLM's shape: per prompt token None (the first) or
    {token id: {logprob, rank, decoded_token}} for the prompt's token and its top
    alternatives."""
    if lps is None:
        return None
    out = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        entry = {
            str(lp.token_id): protocol.PromptLogprob(
                logprob=_finite(lp.logprob), rank=lp.rank, decoded_token=t.text(lp.token_id)
            )
        }
        for rank, (i, v) in enumerate(lp.top, 1):
            entry.setdefault(
                str(i),
                protocol.PromptLogprob(logprob=_finite(v), rank=rank, decoded_token=t.text(i)),
            )
        out.append(entry)
    return out


def echo_logprobs(t: TokenTable, ids: list[int], lps: list) -> protocol.CompletionLogprobs:
    """The prompt's tokens in the legacy completions shape, for echo: the first token has no
    logprob (null, and null top_logprobs), the others their logprob given the tokens before
    them. text_offset is each token's character offset in the echoed text (the prompt decoded
    without special tokens, which take no characters): a token that starts inside a character
    points at that character."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    offsets = []
    offset = 0
    for i in ids:
        offsets.append(offset)
        if t.bytes[i] is not None:
            offset += len(decoder.decode(t.bytes[i]))
    return protocol.CompletionLogprobs(
        tokens=[t.text(i) for i in ids],
        token_logprobs=[None if lp is None else _finite(lp.logprob) for lp in lps],
        top_logprobs=[
            None if lp is None else {t.text(i): _finite(v) for i, v in lp.top} for lp in lps
        ],
        text_offset=offsets,
    )


def choice_logprobs(
    t: TokenTable, echo: protocol.CompletionLogprobs | None, lps: list, offset: int
) -> protocol.CompletionLogprobs:
    """A completion's logprobs: the echoed prompt's (if any), then its own tokens'."""
    own = completion_logprobs(t, lps, offset)
    if echo is None:
        return own
    return protocol.CompletionLogprobs(
        tokens=echo.tokens + own.tokens,
        token_logprobs=echo.token_logprobs + own.token_logprobs,
        top_logprobs=echo.top_logprobs + own.top_logprobs,
        text_offset=echo.text_offset + own.text_offset,
    )


def completion_logprobs(t: TokenTable, lps, offset: int) -> protocol.CompletionLogprobs:
    tokens = [t.text(lp.token_id) for lp in lps]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    top = [{t.text(i): _finite(v) for i, v in lp.top} for lp in lps]
    return protocol.CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[_finite(lp.logprob) for lp in lps],
        top_logprobs=top,
        text_offset=offsets,
    )
