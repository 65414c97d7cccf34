"""The chat format as the server speaks it: requests -> prompt token ids,
generated text -> reasoning + answer.

- Prompts: messages go through the tokenizer's chat template, whose generation prompt already opens
  `<think>\\n` when thinking is on. An assistant message with `prefix: true` at the end (DeepSeek's
  chat prefix completion) is continued instead of answered. /v1/completions with a `suffix` is
  fill-in-the-middle with the FIM tokens.
- Reasoning: the engine decodes through `EngineTokenizer`, which keeps `<think>` and `</think>` in
  the text, and `ReasoningParser` splits that text at `</think>` while it streams.
- Token bytes: `TokenTable` knows each token's exact bytes (byte-level BPE), for logprobs and for
  JSON mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nanoseek import chat_template
from nanoseek.serve.tools import TOKEN_NAMES as TOOL_TOKEN_NAMES
from nanoseek.serve.tools import generation_prefix
from nanoseek.tokenizer import SPECIAL_TOKENS, tool_declaration

THINK = "<think>"
END_THINK = "</think>"


class FormatError(ValueError):
    """A request that cannot be turned into a prompt; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------------------------------------ prompts


def chat_prompt(
    tok, messages: Sequence[Mapping], thinking: bool, tools: Sequence[Mapping] | None = None
) -> tuple[list[int], bool]:
    """messages ({"role", "content", optional "reasoning_content", "prefix", "tool_calls",
    "tool_call_id"}) and tools (OpenAI-shaped) -> (prompt ids, whether generation starts inside a
    thought). Message contents are untrusted: special-token strings in them stay plain text.

    Reasoning of earlier assistant turns is dropped, as DeepSeek-R1 does: the answers carry the
    conversation. A final assistant message with prefix=True is continued: its reasoning_content (if
    given) reopens the thought, and its content, if any, follows the closed thought; no `<think>` is
    added for it otherwise. A checkpoint's own template whose text never reads `tools` (DeepSeek's
    released ones) gets the tool list as one more system message, in nanoseek's words.
    """
    if not messages:
        raise FormatError("messages must not be empty", "messages")
    *history, last = messages
    prefix = last["role"] == "assistant" and bool(last.get("prefix"))
    for i, m in enumerate(history):
        if m.get("prefix"):
            raise FormatError("only the last message may have prefix=true", f"messages.{i}.prefix")
    if last.get("prefix") and not prefix:
        raise FormatError(
            "prefix=true is for an assistant message", f"messages.{len(history)}.prefix"
        )
    if tok.chat_template is not None:
        for i, m in enumerate(messages):
            if isinstance(m.get("content"), list):
                raise FormatError(
                    "this model's own chat template cannot place images", f"messages.{i}.content"
                )
    turns, kwargs = with_tools(
        tok, [chat_turn(m) for m in (history if prefix else messages)], tools
    )
    think = thinking and not prefix
    if tok.chat_template is not None:  # the switch's other name (Qwen3's templates read it)
        kwargs["enable_thinking"] = think
    try:
        ids = tok.apply_chat_template(
            turns, add_generation_prompt=True, thinking=think, sanitize=True, **kwargs
        )
        if not prefix:
            return ids, _opens_thought(tok, ids)
    except chat_template.TemplateError as e:
        raise FormatError(f"this model's chat template: {e}", "messages") from None
    reasoning, content = last.get("reasoning_content"), last.get("content") or ""
    if reasoning is None:
        return ids + tok.encode(content), False
    ids.append(_special(tok, "think"))
    if not content:  # the thought goes on
        return ids + tok.encode("\n" + reasoning), True
    thought = tok.encode("\n" + reasoning + "\n")  # closed as the chat template closes it
    return ids + thought + [_special(tok, "end_think")] + tok.encode("\n" + content), False


def chat_request_prompt(
    tok,
    messages: Sequence[Mapping],
    thinking: bool,
    tools: Sequence[Mapping] | None = None,
    choice: str = "none",
    images=None,
    vision_config=None,
) -> tuple[list[int], bool, str]:
    """The ids a chat request runs (/v1/chat/completions, and /tokenize counts the same):
    chat_prompt, then what the tool_choice prefills (serve.tools.generation_prefix). A forced call
    (required, a named function) starts at once, without a thought, as DeepSeek-V3.1's calls do.
    images (an ImageInput, in prompt order; serve/images.py) expand each image part's `<image>`
    into the image's positions (data.images.expand_image_tokens, with vision_config).
    -> (ids, whether generation starts inside a thought, the prefilled text)."""
    forced = bool(tools) and choice not in ("auto", "none")
    ids, in_reasoning = chat_prompt(tok, messages, thinking and not forced, tools)
    if images is not None and images.grids:
        from nanoseek.data.images import ImageError, expand_image_tokens, image_id_of

        try:
            ids, _ = expand_image_tokens(ids, images.grids, image_id_of(tok), vision_config)
        except ImageError as e:
            raise FormatError(str(e), "messages") from None
    prefix = generation_prefix(tool_format(tok) or "raw", choice) if tools else ""
    if prefix:
        ids = ids + tok.encode(prefix, allow_special=True)
    return ids, in_reasoning, prefix


def with_tools(tok, turns: list[dict], tools: Sequence[Mapping] | None) -> tuple[list[dict], dict]:
    """Template turns and keyword arguments that declare the tools: as the template's `tools`
    variable, or, for a checkpoint's own template whose text never reads `tools` (DeepSeek's
    released ones), as one more system message in nanoseek's words."""
    kwargs = {}
    if tools:
        template = tok.chat_template
        if template is None or chat_template.reads_tools(template):
            kwargs["tools"] = list(tools)
        else:
            at = max((i + 1 for i, m in enumerate(turns) if m["role"] == "system"), default=0)
            turns = [
                *turns[:at],
                {"role": "system", "content": tool_declaration(tools)},
                *turns[at:],
            ]
    return turns, kwargs


def chat_turn(m: Mapping) -> dict:
    """A message as the template gets it: an assistant message of only tool calls keeps content
    None (DeepSeek-V3's template renders the calls only then)."""
    turn = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        turn["content"] = m.get("content") or None
        turn["tool_calls"] = m["tool_calls"]
    if m.get("tool_call_id") is not None:
        turn["tool_call_id"] = m["tool_call_id"]
    return turn


def _opens_thought(tok, ids: Sequence[int]) -> bool:
    """Whether the generation prompt ends in an open thought (`<think>`, maybe a newline)."""
    think = tok.special_ids.get("think")
    return think is not None and think in ids[-2:]


def tool_format(tok) -> str | None:
    """How this model writes tool calls ("raw", "fenced"), or None if it cannot: its tokenizer
    lacks the tool tokens, or its own template renders no calls."""
    if not all(name in tok.special_ids for name in TOOL_TOKEN_NAMES):
        return None
    return "raw" if tok.chat_template is None else chat_template.tool_format(tok.chat_template)


def completion_prompt(tok, prompt: str | Sequence[int], suffix: str | None) -> list[int]:
    """A /v1/completions prompt -> ids. Text starts with BOS, as documents do in training; token ids
    are taken as they are. With a suffix:
    <bos><｜fim▁begin｜>prompt<｜fim▁hole｜>suffix<｜fim▁end｜>, the middle follows."""
    if suffix is None:
        return list(prompt) if not isinstance(prompt, str) else tok.encode(prompt, add_bos=True)
    if not isinstance(prompt, str):
        raise FormatError("suffix needs a text prompt", "suffix")
    begin, hole, end = (_special(tok, n, "suffix") for n in ("fim_begin", "fim_hole", "fim_end"))
    bos = [] if tok.bos_id is None else [tok.bos_id]  # a checkpoint's own tokenizer may have none
    return [*bos, begin, *tok.encode(prompt), hole, *tok.encode(suffix), end]


def _special(tok, name: str, param: str | None = None) -> int:
    if name not in tok.special_ids:
        raise FormatError(f"this model's tokenizer has no {name} token", param)
    return tok.special_ids[name]


# ---------------------------------------------------------------------------------------- reasoning


class EngineTokenizer:
    """The tokenizer as the serving engine sees it: decode(skip_special_tokens=True) drops special
    tokens except <think>, </think> and the tool-call tokens, so that the streamed text still shows
    where the reasoning ends and where calls begin (serve/tools.py parses them)."""

    def __init__(self, tok):
        self.tok = tok
        kept = [("think", THINK), ("end_think", END_THINK)]
        kept += [(name, SPECIAL_TOKENS[name]) for name in TOOL_TOKEN_NAMES]
        self._tags = {i: s for name, s in kept if (i := tok.special_ids.get(name)) is not None}

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        if not skip_special_tokens:
            return self.tok.decode(ids)
        out, run = [], []
        for i in ids:
            if i in self._tags:
                out += [self.tok.decode(run, skip_special_tokens=True), self._tags[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.tok.decode(run, skip_special_tokens=True)


class ReasoningParser:
    """Splits generated text into (reasoning, content) at `</think>`, piece by piece as it streams.

    Started inside a thought (the prompt opened `<think>`), everything before `</think>` is
    reasoning; otherwise the text is content unless it opens with `<think>` itself. The newlines the
    chat format puts around the tags are dropped. Feeding the same text in any pieces gives the same
    result: text that may still become a tag, or newlines that may still precede `</think>`, wait
    for the next piece (or for finish()).
    """

    def __init__(self, in_reasoning: bool):
        self.state = "reasoning_start" if in_reasoning else "start"
        self.saw_reasoning = in_reasoning
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        return self._split(final=False)

    def finish(self) -> tuple[str, str]:
        return self._split(final=True)

    def _split(self, final: bool) -> tuple[str, str]:
        reasoning, content = "", ""
        while True:
            buf, state = self.buf, self.state
            if state == "start":
                head = buf.lstrip()
                if head.startswith(THINK):
                    self.buf = head[len(THINK) :]
                    self.state = "reasoning_start"
                    self.saw_reasoning = True
                elif THINK.startswith(head) and not final:
                    return reasoning, content  # could still be "<think>"
                else:
                    self.state = "content"
            elif state in ("reasoning_start", "content_start"):
                body = buf.lstrip("\n")
                if not body and not final:
                    return reasoning, content
                self.buf = body
                self.state = state.removesuffix("_start")
            elif state == "reasoning":
                end = buf.find(END_THINK)
                if end >= 0:
                    reasoning += buf[:end].rstrip("\n")
                    self.buf = buf[end + len(END_THINK) :]
                    self.state = "content_start"
                    continue
                keep = 0 if final else _pending_tail(buf)
                reasoning += buf[: len(buf) - keep]
                self.buf = buf[len(buf) - keep :]
                return reasoning, content
            else:
                content += buf
                self.buf = ""
                return reasoning, content


def _pending_tail(text: str) -> int:
    """Length of the tail that may still turn into newlines + `</think>`:
    trailing newlines and a tag prefix."""
    part = next(
        (
            k
            for k in range(min(len(END_THINK) - 1, len(text)), 0, -1)
            if END_THINK.startswith(text[-k:])
        ),
        0,
    )
    rest = text[: len(text) - part]
    return part + len(rest) - len(rest.rstrip("\n"))


def split_reasoning(text: str, in_reasoning: bool) -> tuple[str | None, str]:
    """The whole text at once -> (reasoning or None if there was no thought, content)."""
    parser = ReasoningParser(in_reasoning)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return (r1 + r2 if parser.saw_reasoning else None), c1 + c2


# -------------------------------------------------------------------------------------- token bytes


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE spells byte b as one printable character: printable Latin-1 bytes as
    themselves, the others as chr(256 + k) in byte order. -> character -> byte."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class TokenTable:
    """Exact bytes of every token (None for special tokens), and a display string for logprobs."""

    def __init__(self, tok):
        alphabet = _byte_alphabet()
        specials = set(tok.special_ids.values())
        self.size = tok.vocab_size
        self.bytes: list[bytes | None] = []
        self.names: list[str] = []
        for i in range(self.size):
            piece = tok.id_to_token(i) or ""
            self.names.append(piece)
            if i in specials:
                self.bytes.append(None)
            elif all(c in alphabet for c in piece):
                self.bytes.append(bytes(alphabet[c] for c in piece))
            else:  # not a byte-level token: its decoded text is the best we have
                self.bytes.append(tok.decode([i]).encode("utf-8"))

    def text(self, i: int) -> str:
        """What a token shows as: its text, a special token's name,
        "\\xe4"-style escapes for partial characters."""
        b = self.bytes[i]
        return self.names[i] if b is None else b.decode("utf-8", errors="backslashreplace")

    def raw(self, i: int) -> list[int]:
        b = self.bytes[i]
        return list(self.names[i].encode("utf-8") if b is None else b)
