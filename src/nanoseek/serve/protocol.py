"""The HTTP API's shapes: OpenAI chat/completions requests and
responses with vLLM and DeepSeek extras.

Requests are validated strictly from the JSON body (no "1" for 1); unknown fields are allowed and
ignored, with a warning in the log, as vLLM does. `check()` holds the rules that involve several
fields. Any ValidationError or ProtocolError becomes a 400 whose `param` names the field.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from nanoseek.serve import tools

MAX_STOP = 16  # stop strings per request
# a logit_bias key: ASCII digits (str.isdigit also takes "²" and "١")
TOKEN_ID = re.compile(r"[0-9]{1,10}")
JSON_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for response_format names


class ProtocolError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    # allow_inf_nan: the JSON parser takes NaN and Infinity, which no sampling field means
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------- requests


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str  # a data: URL (base64); remote URLs are refused
    detail: Literal["auto", "low", "high"] | None = None  # accepted, not used: tiling is VL2's


class ImageURLPart(_Strict):
    """OpenAI's image content part (user messages only)."""

    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Strict):
    """A call in an assistant message of the history (OpenAI's shape)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImageURLPart] | None = None
    # DeepSeek: the thought, for a prefix message (dropped from history)
    reasoning_content: str | None = None
    prefix: bool = False  # DeepSeek chat prefix completion: continue this (last, assistant) message
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this is the result of

    def as_dict(self) -> dict:
        """The message as serve/chat_format.py takes it: text parts joined into one string, or,
        with images, a list of {"type": "text", "text"} and {"type": "image"} parts (the images
        themselves are read from the request by serve/images.py)."""
        content = self.content
        if isinstance(content, list):
            if any(isinstance(p, ImageURLPart) for p in content):
                content = [
                    {"type": "text", "text": p.text}
                    if isinstance(p, TextPart)
                    else {"type": "image"}
                    for p in content
                ]
            else:
                content = "".join(p.text for p in content)
        role = "system" if self.role == "developer" else self.role
        out = {
            "role": role,
            "content": content,
            "reasoning_content": self.reasoning_content,
            "prefix": self.prefix,
        }
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments (an object)
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition

    def as_dict(self) -> dict:
        """As the chat template gets it: only the fields the client sent (and not null)."""
        function = self.function.model_dump(exclude_unset=True, exclude_none=True)
        return {"type": self.type, "function": function}


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted; usage comes once, at the end


class JsonSchemaFormat(_Strict):
    """OpenAI's response_format.json_schema. `strict` is accepted either way: the schema is always
    enforced as the grammar engine compiles it, and what it cannot compile is a 400."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extra (v0.12 on; older releases: the guided_* fields)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class Thinking(_Strict):
    type: Literal["enabled", "disabled"]


Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class SamplingRequest(_Strict):
    """Fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None  # vLLM extra; <= 0 means no limit
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM extra
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extra
    min_tokens: int = Field(0, ge=0)  # vLLM extra
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None  # vLLM extra
    user: str | None = None
    # vLLM's structured-output extras (at most one mode per request)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    response_format: ResponseFormat | None = None  # OpenAI's (chat); vLLM takes it on completions

    def structured_mode(self) -> tuple[str, Any, str] | None:
        """(kind, value, param) of the request's structured-output mode, if any: kind is
        json_object, json_schema, regex, choice or grammar; param names the field."""
        modes = self._modes()
        if len(modes) > 1:
            raise ProtocolError(
                "use at most one structured-output mode, got " + ", ".join(m[2] for m in modes),
                modes[1][2],
            )
        if not modes:
            return None
        kind, value, param = modes[0]
        if kind == "json_schema" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ProtocolError(f"{param} must be a JSON schema", param) from None
            if not isinstance(value, dict | bool):
                raise ProtocolError(f"{param} must be a JSON schema (an object)", param)
        if kind == "choice" and (not value or not all(value)):
            raise ProtocolError(f"{param} must be a list of non-empty strings", param)
        if kind in ("regex", "grammar") and not value:
            raise ProtocolError(f"{param} must not be empty", param)
        return kind, value, param

    def _modes(self) -> list[tuple[str, Any, str]]:
        modes = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            modes.append(("json_object", None, "response_format"))
        elif rf is not None and rf.type == "json_schema":
            schema = rf.json_schema.schema_ if rf.json_schema else None
            modes.append(("json_schema", schema, "response_format.json_schema.schema"))
        for kind, field in (
            ("json_schema", "guided_json"),
            ("regex", "guided_regex"),
            ("choice", "guided_choice"),
            ("grammar", "guided_grammar"),
        ):
            if getattr(self, field) is not None:
                modes.append((kind, getattr(self, field), field))
        so = self.structured_outputs
        if so is not None:
            for kind, field in (
                ("json_schema", "json_"),
                ("regex", "regex"),
                ("choice", "choice"),
                ("grammar", "grammar"),
            ):
                if getattr(so, field) is not None:
                    name = field.rstrip("_")
                    modes.append((kind, getattr(so, field), f"structured_outputs.{name}"))
        return modes

    def check(self) -> None:
        rf = self.response_format
        if rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise ProtocolError(
                    "response_format json_schema needs a json_schema object",
                    "response_format.json_schema",
                )
            if not JSON_SCHEMA_NAME.fullmatch(rf.json_schema.name):
                raise ProtocolError(
                    "response_format.json_schema.name must be 1-64 of a-z, A-Z, 0-9, _ and -",
                    "response_format.json_schema.name",
                )
            if rf.json_schema.schema_ is None:
                raise ProtocolError(
                    "response_format.json_schema.schema is required",
                    "response_format.json_schema.schema",
                )
        self.structured_mode()
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options is only allowed with stream=true", "stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP or not all(stops):
            raise ProtocolError(f"stop takes up to {MAX_STOP} non-empty strings", "stop")
        for key in self.logit_bias or {}:
            if not TOKEN_ID.fullmatch(key):
                raise ProtocolError(
                    f"logit_bias keys are token ids (up to 10 digits 0-9), got {key[:20]!r}",
                    "logit_bias",
                )

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM extra
    thinking: Thinking | None = None  # DeepSeek: {"type": "enabled" | "disabled"}
    # vLLM: {"thinking": bool} (or "enable_thinking")
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise ProtocolError("top_logprobs needs logprobs=true", "top_logprobs")
        if self.prompt_logprobs is not None and self.stream:
            raise ProtocolError("prompt_logprobs cannot be streamed", "prompt_logprobs")
        try:
            tools.check_request(
                [t.as_dict() for t in self.tools or []],
                self.tool_choice_name,
                [m.as_dict() for m in self.messages],
            )
        except tools.ToolError as e:
            raise ProtocolError(str(e), e.param) from None
        for key in ("thinking", "enable_thinking"):
            value = (self.chat_template_kwargs or {}).get(key)
            if value is not None and not isinstance(value, bool):
                raise ProtocolError(
                    f"chat_template_kwargs.{key} must be a boolean", f"chat_template_kwargs.{key}"
                )

    def thinking_enabled(self, default: bool) -> bool:
        if self.thinking is not None:
            return self.thinking.type == "enabled"
        kwargs = self.chat_template_kwargs or {}
        for key in ("thinking", "enable_thinking"):
            if kwargs.get(key) is not None:
                return kwargs[key]
        return default

    @property
    def tool_choice_name(self) -> str:
        """ "none", "auto", "required" or the named function; by default "auto" with tools and
        "none" without, as OpenAI."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or ("auto" if self.tools else "none")


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 with echo (or prompt_logprobs): score the prompt, generate nothing
    max_tokens: int | None = Field(None, ge=0)
    suffix: str | None = None  # fill in the middle
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM extra

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0 and not self.echo and self.prompt_logprobs is None:
            raise ProtocolError(
                "max_tokens=0 generates nothing: use it with echo=true or prompt_logprobs to score "
                "the prompt",
                "max_tokens",
            )
        if self.prompt_logprobs is not None and self.stream:
            raise ProtocolError("prompt_logprobs cannot be streamed", "prompt_logprobs")
        if isinstance(self.prompt, list) and (
            not self.prompt or any(p in ("", []) for p in self.prompt)
        ):
            raise ProtocolError("prompt must not be empty", "prompt")
        if self.echo and self.suffix is not None:
            raise ProtocolError("echo and suffix cannot be used together", "echo")

    @property
    def prompt_logprob_count(self) -> int | None:
        """The top alternatives each prompt token's logprob comes with, or None for no prompt
        logprobs: prompt_logprobs, else with echo the logprobs (as vLLM does)."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TokenizeCompletionRequest(_Strict):
    """vLLM's /tokenize for text: with add_special_tokens (the default) the ids start with BOS, as
    a /v1/completions text prompt does."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False

    def check(self) -> None:
        pass


class TokenizeChatRequest(_Strict):
    """vLLM's /tokenize for messages: the ids /v1/chat/completions would run (the chat template
    brings its own BOS; add_special_tokens adds one only where it is missing)."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    thinking: Thinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # as the chat endpoint takes them: the tools' declaration and a forced call's prefilled opening
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    def check(self) -> None:
        try:
            tools.check_request(
                [t.as_dict() for t in self.tools or []],
                self.tool_choice_name,
                [m.as_dict() for m in self.messages],
            )
        except tools.ToolError as e:
            raise ProtocolError(str(e), e.param) from None
        if self.continue_final_message and self.add_generation_prompt:
            raise ProtocolError(
                "continue_final_message and add_generation_prompt cannot both be true "
                "(set add_generation_prompt=false)",
                "continue_final_message",
            )
        if self.continue_final_message and self.tool_choice_name not in ("auto", "none"):
            raise ProtocolError(
                f"tool_choice {self.tool_choice_name!r} forces a call; it cannot go with "
                "continue_final_message (as on chat, with a prefix message)",
                "tool_choice",
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ProtocolError(
                "continue_final_message needs an assistant message last", "continue_final_message"
            )

    thinking_enabled = ChatCompletionRequest.thinking_enabled
    tool_choice_name = ChatCompletionRequest.tool_choice_name


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]

    def check(self) -> None:
        pass


class DetokenizeResponse(BaseModel):
    prompt: str


def parse(model: type[SamplingRequest], body: bytes) -> SamplingRequest:
    """JSON body -> a checked request, or ProtocolError naming the first bad field."""
    try:
        req = model.model_validate_json(body)
    except ValidationError as e:
        raise ProtocolError(*_describe(e)) from None
    req.check()
    return req


def _describe(e: ValidationError) -> tuple[str, str | None]:
    errors = e.errors(include_url=False)
    if errors[0]["type"] == "json_invalid":
        return f"the request body is not valid JSON: {errors[0]['msg']}", None
    if not errors[0]["loc"]:
        return "the request body must be a JSON object", None

    # union members add their type to the location ("content.str"): drop those
    def path(err) -> list[str]:
        return [str(x) for x in err["loc"] if not _TYPE_TAG.fullmatch(str(x))]

    # of a union's failures, the one that got furthest
    err = max(errors, key=lambda err: len(path(err)))
    param = ".".join(path(err))
    return f"{param}: {err['msg']}", param or None


# "str", "int", "list[int]", "function-after[...]", a model's class name: never
# a field name (those are lowercase).
_TYPE_TAG = re.compile(r"str|int|float|bool|none|[\w-]+\[.*\]|[A-Z]\w*")


def unknown_fields(req: BaseModel, path: str = "") -> list[str]:
    """The fields a client sent that this server ignores (for a warning)."""
    out = [f"{path}{k}" for k in (req.model_extra or {})]
    for name in type(req).model_fields:
        value = getattr(req, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                sub = f"{path}{name}." + (f"{i}." if isinstance(value, list) else "")
                out += unknown_fields(item, sub)
    return out


# ---------------------------------------------------------------------------------------- responses


class _DropNone(BaseModel):
    """Serialises without its None fields (deltas carry only what changed)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]  # OpenAI: {"cached_tokens"}
    completion_tokens_details: dict[str, int] | None = None  # {"reasoning_tokens"} (chat)
    prompt_cache_hit_tokens: int  # DeepSeek: hit + miss = prompt_tokens
    prompt_cache_miss_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int, reasoning: int | None = None) -> Usage:
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details={"cached_tokens": cached},
            completion_tokens_details=None
            if reasoning is None
            else {"reasoning_tokens": reasoning},
            prompt_cache_hit_tokens=cached,
            prompt_cache_miss_tokens=prompt - cached,
        )


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry: one token's logprob, rank and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str


# per prompt token: None for the first, else {token id: PromptLogprob} for the prompt's token and
# the top alternatives
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCallOut(_DropNone):
    name: str | None = None
    arguments: str | None = None


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    """content is null when the message is only tool calls; tool_calls is left out when there are
    none."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler):
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class _Envelope(BaseModel):
    """What every generation response and chunk carries besides its choices and usage (a subclass
    fixes `object`; the field keeps its place in the JSON)."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra: only when asked for

    @model_serializer(mode="wrap")
    def _drop_absent_prompt_logprobs(self, handler):
        out = handler(self)
        if out.get("prompt_logprobs") is None:
            out.pop("prompt_logprobs", None)
        return out


class ToolCallDelta(_DropNone):
    """A streamed piece of a call: the first carries id, type and name (and arguments ""), later
    ones the next piece of the arguments; `index` says which call."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallOut


class Delta(_DropNone):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape; with echo the prompt's tokens come first, the very first without a
    logprob (null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None

    @model_serializer(mode="wrap")
    def _keep_openai_nulls(self, handler):
        """logprobs and finish_reason are null when absent, as OpenAI sends them; vLLM's
        prompt_logprobs appears only when asked for."""
        out = handler(self)
        if out.get("prompt_logprobs") is None:
            out.pop("prompt_logprobs", None)
        return out


class Completion(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ImageLimits(BaseModel):
    """What a vision-language checkpoint's server takes in one chat request (a client checks an
    image against these before sending it; the server checks them again)."""

    max_images_per_request: int
    max_image_pixels: int  # width x height of one image
    max_image_bytes: int  # encoded bytes of one image
    max_body_bytes: int  # the whole request body, the base64 data URLs included
    formats: list[str]  # the MIME types the image loader reads


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoseek"
    max_model_len: int | None = None
    # nanoseek extras, known once the checkpoint has loaded (null before): ["text"] or
    # ["text", "image"] (OpenRouter's word), and for images the limits above
    input_modalities: list[str] | None = None
    image_limits: ImageLimits | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
