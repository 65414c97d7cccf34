"""Anthropic Messages API request shapes (pydantic), for POST /v1/messages: what the client may
send, checked field by field (a 400 names the field); serve/anthropic.py translates a checked
request onto the chat path."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from nanoseek.serve.protocol import MAX_STOP, ProtocolError, _Strict


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # accepted, ignored (no prompt-cache pricing)
    citations: list[Any] | None = None  # accepted, ignored


class ImageBlock(_Strict):
    """An image: `source` {"type": "base64", "media_type", "data"} in a user message (served by a
    vision-language checkpoint, as the chat path's image_url parts); a "url" source is refused."""

    type: Literal["image"]
    source: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] = ""
    is_error: bool = False
    cache_control: dict[str, Any] | None = None


class ThinkingBlock(_Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None  # this server signs nothing and checks nothing


class RedactedThinkingBlock(_Strict):
    """Parsed so that the refusal can name it (nanoseek never redacts a thought)."""

    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @property
    def blocks(self) -> list:
        if isinstance(self.content, str):
            return [TextBlock(type="text", text=self.content)]
        return self.content


class Tool(_Strict):
    type: Literal["custom"] | None = None  # server tools (web search, ...) are not offered
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None  # passed on as the function's `strict`
    cache_control: dict[str, Any] | None = None


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(_Strict):
    # "adaptive": thinking on, no cap (the model decides); "display" is accepted, ignored
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)
    display: Literal["summarized", "omitted"] | None = None

    @property
    def on(self) -> bool:
        return self.type != "disabled"


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    """Structured outputs (format: the response_format json_schema of the chat path); effort is
    accepted and ignored."""

    format: OutputFormat | None = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


class Metadata(_Strict):
    user_id: str | None = None


class MessagesRequest(_Strict):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)  # DeepSeek's range (Anthropic's: 0-1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: Metadata | None = None  # ignored
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None

    def check(self) -> None:
        stops = self.stop_sequences or []
        if len(stops) > MAX_STOP or not all(stops):
            raise ProtocolError(
                f"stop_sequences takes up to {MAX_STOP} non-empty strings", "stop_sequences"
            )
        t = self.thinking
        if t is not None and t.type == "enabled":
            if t.budget_tokens is None:
                raise ProtocolError(
                    "thinking.budget_tokens is required when thinking is enabled",
                    "thinking.budget_tokens",
                )
            if t.budget_tokens >= self.max_tokens:
                raise ProtocolError(
                    f"thinking.budget_tokens ({t.budget_tokens}) must be less than max_tokens "
                    f"({self.max_tokens})",
                    "thinking.budget_tokens",
                )
        choice = self.tool_choice
        if choice is not None:
            names = [tool.name for tool in self.tools or []]
            if choice.type == "tool":
                if choice.name is None:
                    raise ProtocolError('tool_choice "tool" needs a name', "tool_choice.name")
                if choice.name not in names:
                    known = ", ".join(names) or "none"
                    raise ProtocolError(
                        f"tool_choice names the tool {choice.name[:80]!r}, which is not among "
                        f"the tools ({known})",
                        "tool_choice.name",
                    )
            elif choice.name is not None:
                raise ProtocolError(
                    f'tool_choice.name goes with type "tool", not {choice.type!r}',
                    "tool_choice.name",
                )
            if choice.type == "any" and not names:
                raise ProtocolError('tool_choice "any" needs tools', "tool_choice")
            if choice.type in ("any", "tool") and t is not None and t.on:
                raise ProtocolError(
                    f'thinking cannot be enabled when tool_choice is "{choice.type}" (a forced '
                    'call starts at once, without a thought); use "auto" or "none"',
                    "tool_choice",
                )
        self._check_messages()

    def _check_messages(self) -> None:
        """Roles and blocks in order: the first message is the user's; tool_use only in assistant
        messages, tool_result only in user messages; every tool_use of an assistant message is
        answered, once, by a tool_result in the user message right after it; images only in user
        messages, as base64 (none inside tool results); no redacted thoughts (not offered)."""
        if self.messages[0].role != "user":
            raise ProtocolError("the first message must be the user's", "messages.0.role")
        last = len(self.messages) - 1
        open_ids: set[str] = set()  # the calls the previous assistant message made
        for i, m in enumerate(self.messages):
            answered: set[str] = set()
            calls: list[str] = []
            for j, b in enumerate(m.blocks):
                where = f"messages.{i}.content.{j}"
                if b.type == "image":
                    _check_image(b, m.role, where)
                if (
                    b.type == "tool_result"
                    and isinstance(b.content, list)
                    and any(p.type == "image" for p in b.content)
                ):
                    raise ProtocolError("images in tool results are not supported", where)
                if b.type == "redacted_thinking":
                    raise ProtocolError("redacted_thinking blocks are not supported", where)
                if b.type == "tool_use":
                    if m.role != "assistant":
                        raise ProtocolError("tool_use blocks belong in assistant messages", where)
                    if i == last:
                        raise ProtocolError(
                            "the last message cannot end in a tool_use: send its tool_result in "
                            "a user message",
                            where,
                        )
                    if b.id in calls:
                        raise ProtocolError(f"two tool_use blocks share the id {b.id!r}", where)
                    calls.append(b.id)
                elif b.type == "tool_result":
                    if m.role != "user":
                        raise ProtocolError("tool_result blocks belong in user messages", where)
                    if b.tool_use_id not in open_ids or b.tool_use_id in answered:
                        raise ProtocolError(
                            f"tool_use_id {b.tool_use_id[:80]!r} answers no tool_use of the "
                            "assistant message before it (or one already answered)",
                            f"{where}.tool_use_id",
                        )
                    answered.add(b.tool_use_id)
                elif b.type == "thinking" and m.role != "assistant":
                    raise ProtocolError("thinking blocks belong in assistant messages", where)
            if open_ids - answered:
                missing = ", ".join(sorted(open_ids - answered))
                raise ProtocolError(
                    f"the tool_use blocks {missing} of messages.{i - 1} have no tool_result in "
                    "the message right after it",
                    f"messages.{i}.content",
                )
            open_ids = set(calls)


def _check_image(b: ImageBlock, role: str, where: str) -> None:
    """An image block's form: base64 data with its media type, or a URL (fetched only from hosts
    the operator allows: the chat request's image checks decide, serve/images.py)."""
    if role != "user":
        raise ProtocolError("image blocks belong in user messages", where)
    source = b.source
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return
    if (
        source.get("type") != "base64"
        or not isinstance(source.get("media_type"), str)
        or not isinstance(source.get("data"), str)
    ):
        raise ProtocolError(
            'an image source must be {"type": "base64", "media_type": "image/png", "data": ...}'
            ' or {"type": "url", "url": ...}',
            f"{where}.source",
        )
