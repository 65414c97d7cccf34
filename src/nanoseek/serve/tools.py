"""Tool calls in DeepSeek-V3's tokens: checking a request's tools, what a forced call makes the
generation start with, and parsing calls out of generated text as it streams.

A call block in the raw form (nanoseek's own template and DeepSeek-V3.1):
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{JSON arguments}<｜tool▁call▁end｜>
    ...more calls...<｜tool▁calls▁end｜>
and in the fenced form (DeepSeek-V3 and R1), each call as
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{JSON}\\n```<｜tool▁call▁end｜>
with a newline between calls. `generation_prefix` says what a required or named tool_choice
prefills; `ToolParser` turns text back into content and calls. Arguments are passed through as the
model wrote them (never re-serialised). Constrained calls (strict functions, required and named
choices) are generated through serve/grammar.py's `tool_calls_grammar`, which writes the same forms
(docs/serving.md).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
OUTPUTS_END = "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
OUTPUT_END = "<｜tool▁output▁end｜>"
MARKERS = (
    CALLS_BEGIN,
    CALLS_END,
    CALL_BEGIN,
    CALL_END,
    SEP,
    OUTPUTS_BEGIN,
    OUTPUTS_END,
    OUTPUT_BEGIN,
    OUTPUT_END,
)
# the tokenizer's names for them (nanoseek.tokenizer.SPECIAL_TOKENS)
TOKEN_NAMES = (
    "tool_calls_begin",
    "tool_calls_end",
    "tool_call_begin",
    "tool_call_end",
    "tool_sep",
    "tool_outputs_begin",
    "tool_outputs_end",
    "tool_output_begin",
    "tool_output_end",
)
FENCE_OPEN = "```json"
FENCE_CLOSE = "```"
# OpenAI's and DeepSeek's rule for function names
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
FORMATS = ("raw", "fenced")


class ToolError(ValueError):
    """A request whose tools, tool_choice or tool messages cannot work; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------------------------------- requests


def check_request(tools: Sequence[Mapping], choice: str, messages: Sequence[Mapping]) -> None:
    """OpenAI-shaped tools ({"type", "function": {"name", "parameters", ...}}), the tool_choice
    ("none", "auto", "required" or a function's name) and the messages' tool calls and results:
    ToolError naming the first bad field."""
    names: set[str] = set()
    for i, tool in enumerate(tools):
        function = tool["function"]
        name = function["name"]
        if not NAME.fullmatch(name):
            raise ToolError(
                f"function names are 1 to 64 of a-z, A-Z, 0-9, _ and -; got {name[:80]!r}",
                f"tools.{i}.function.name",
            )
        if name in names:
            raise ToolError(f"two tools are named {name!r}", f"tools.{i}.function.name")
        names.add(name)
        if function.get("parameters") is not None:
            _check_schema(function["parameters"], f"tools.{i}.function.parameters")
    if choice == "required" and not tools:
        raise ToolError('tool_choice "required" needs tools', "tool_choice")
    if choice not in ("none", "auto", "required") and choice not in names:
        known = ", ".join(sorted(names)) or "none"
        raise ToolError(
            f"tool_choice names the function {choice!r}, which is not among the tools ({known})",
            "tool_choice.function.name",
        )
    _check_history(messages)


def _check_schema(schema: Mapping, param: str) -> None:
    """A function's parameters must be a valid JSON schema (the draft its $schema names, else
    2020-12) of an object."""
    import jsonschema

    if not isinstance(schema.get("$schema", ""), str):
        raise ToolError(f"{param}.$schema: must be a string (a draft's URI)", param)
    try:
        jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator).check_schema(
            schema
        )
    except jsonschema.SchemaError as e:
        where = "".join(f".{p}" for p in e.path)
        raise ToolError(f"{param}{where}: not a valid JSON schema: {e.message}", param) from None
    except RecursionError:
        raise ToolError(f"{param}: the schema is nested too deeply", param) from None
    kind = schema.get("type", "object")
    if kind != "object":
        raise ToolError(f"{param}: the arguments must be an object, not {kind!r}", param)


def _check_history(messages: Sequence[Mapping]) -> None:
    """Every tool message answers a call of the assistant message it follows (other tool messages
    may come between), once; tool_calls only on assistant messages."""
    open_calls: set[str] = set()
    for i, m in enumerate(messages):
        role = m["role"]
        if m.get("tool_calls") and role != "assistant":
            raise ToolError("only assistant messages carry tool_calls", f"messages.{i}.tool_calls")
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id is None:
                raise ToolError("a tool message needs tool_call_id", f"messages.{i}.tool_call_id")
            if call_id not in open_calls:
                raise ToolError(
                    f"tool_call_id {call_id[:80]!r} answers no call of the assistant message "
                    "before it (or one already answered)",
                    f"messages.{i}.tool_call_id",
                )
            open_calls.discard(call_id)
        elif role == "assistant":
            ids = [c["id"] for c in m.get("tool_calls") or []]
            if len(set(ids)) != len(ids):
                raise ToolError("two tool calls share an id", f"messages.{i}.tool_calls")
            open_calls = set(ids)
        else:
            open_calls = set()


# ----------------------------------------------------------------------------------- generation


def generation_prefix(fmt: str, choice: str) -> str:
    """What the generation must start with for a tool_choice: nothing for "auto" and "none";
    the opening of a call for "required" (the model picks the function); for a named function,
    the call up to where its arguments begin. The prefix is part of the prompt."""
    if choice in ("auto", "none"):
        return ""
    opening = CALLS_BEGIN + CALL_BEGIN
    if choice == "required":
        return opening
    return opening + call_head(fmt, choice)


def call_head(fmt: str, name: str) -> str:
    """A call's text after <｜tool▁call▁begin｜>, up to its arguments."""
    if fmt == "fenced":
        return f"function{SEP}{name}\n{FENCE_OPEN}\n"
    return name + SEP


class ToolCallRules:
    """A logits processor (engine hook) for the call tokens: with tool_choice "none" the model
    cannot open a call; with parallel_tool_calls false it cannot open a second one."""

    def __init__(self, special_ids: Mapping[str, int], allow_calls: bool, parallel: bool):
        self.calls_begin = special_ids["tool_calls_begin"]
        self.call_begin = special_ids["tool_call_begin"]
        self.call_end = special_ids["tool_call_end"]
        self.allow_calls = allow_calls
        self.parallel = parallel

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if not self.allow_calls:
            logits[self.calls_begin] = float("-inf")
        elif not self.parallel and self.call_end in output_ids:
            logits[self.call_begin] = float("-inf")
        return logits


# -------------------------------------------------------------------------------------- parsing


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class CallDelta:
    """A piece of a call as it streams: the first one of a call has its id and name."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class ToolParser:
    """Splits generated text into content and tool calls, piece by piece as it streams.

    fmt: "raw" or "fenced"; None when no call can be parsed (a request without tools): complete
    tool markers are then removed from the content. Text that may still become a marker (or the
    end of the arguments) waits for the next piece or finish(), so feeding the same text in any
    pieces gives the same content and calls. Content is the text before the calls; text after
    <｜tool▁calls▁end｜> is dropped. prefix: what the prompt prefilled (generation_prefix); it is
    parsed, not shown, and a named function's call opens with it.
    """

    fmt: str | None
    prefix: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    state: str = "content"
    buf: str = ""
    _pending: list[CallDelta] = field(default_factory=list)

    def __post_init__(self):
        if self.prefix:
            _, self._pending = self.feed(self.prefix)

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        self.buf += text
        return self._parse(final=False)

    def finish(self) -> tuple[str, list[CallDelta]]:
        return self._parse(final=True)

    def _parse(self, final: bool) -> tuple[str, list[CallDelta]]:
        content = ""
        deltas, self._pending = self._pending, []
        while True:
            buf = self.buf
            if self.state == "content":
                start = buf.find(CALLS_BEGIN) if self.fmt else -1
                if start >= 0:
                    content += _strip_markers(buf[:start])
                    self.buf = buf[start + len(CALLS_BEGIN) :]
                    self.state = "calls"
                    continue
                keep = 0 if final else _partial(buf, MARKERS)
                content += _strip_markers(buf[: len(buf) - keep])
                self.buf = buf[len(buf) - keep :]
                return content, deltas
            if self.state == "calls":
                body = buf.lstrip()
                for marker, state in ((CALL_BEGIN, "head"), (CALLS_END, "done")):
                    if body.startswith(marker):
                        self.buf = body[len(marker) :]
                        self.state = state
                        break
                else:
                    nxt = [i for i in (body.find(CALL_BEGIN), body.find(CALLS_END)) if i > 0]
                    if nxt:  # stray text inside the block: skipped
                        self.buf = body[min(nxt) :]
                        continue
                    keep = 0 if final else _partial(body, (CALL_BEGIN, CALLS_END))
                    self.buf = body[len(body) - keep :]
                    return content, deltas
                continue
            if self.state == "head":
                head = self._head(final)
                if head is None:
                    if final:
                        self.buf = ""  # a call cut off before its arguments: no call
                    return content, deltas
                call = ParsedCall(f"call_{uuid.uuid4().hex[:24]}", head)
                self.calls.append(call)
                deltas.append(CallDelta(len(self.calls) - 1, "", call.id, call.name))
                self.state = "args"
                continue
            if self.state == "args":
                end = buf.find(CALL_END)
                if end >= 0:
                    piece = buf[:end]
                    if self.fmt == "fenced":  # the closing fence is not arguments
                        piece = piece.removesuffix(FENCE_CLOSE).removesuffix("\n")
                    self._add_arguments(piece, deltas)
                    self.buf = buf[end + len(CALL_END) :]
                    self.state = "calls"
                    continue
                ends = (CALL_END,)
                if self.fmt == "fenced":
                    ends = ("\n" + FENCE_CLOSE + CALL_END, FENCE_CLOSE + CALL_END)
                keep = 0 if final else _partial(buf, ends)
                self._add_arguments(buf[: len(buf) - keep], deltas)
                self.buf = buf[len(buf) - keep :]
                return content, deltas
            self.buf = ""  # done: whatever follows the block is dropped
            return content, deltas

    def _head(self, final: bool) -> str | None:
        """The function name, once the head of the call is complete (None: not yet)."""
        buf = self.buf
        sep = buf.find(SEP)
        if sep < 0:
            return None
        if self.fmt != "fenced":
            self.buf = buf[sep + len(SEP) :]
            return buf[:sep].strip()
        fence = buf.find(FENCE_OPEN, sep)
        if fence < 0 or (fence + len(FENCE_OPEN) == len(buf) and not final):
            return None  # the name, or the newline after the fence, may still come
        name = buf[sep + len(SEP) : fence].strip()
        rest = buf[fence + len(FENCE_OPEN) :]
        self.buf = rest.removeprefix("\n")
        return name

    def _add_arguments(self, piece: str, deltas: list[CallDelta]) -> None:
        if not piece:
            return
        index = len(self.calls) - 1
        self.calls[index].arguments += piece
        if deltas and deltas[-1].index == index and deltas[-1].id is None:
            deltas[-1].arguments += piece
        else:
            deltas.append(CallDelta(index, piece))


def _partial(text: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of text that is the beginning of one of the markers."""
    for k in range(min(max(map(len, markers)) - 1, len(text)), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


_MARKER_RE = re.compile("|".join(map(re.escape, MARKERS)))


def _strip_markers(text: str) -> str:
    return _MARKER_RE.sub("", text)
