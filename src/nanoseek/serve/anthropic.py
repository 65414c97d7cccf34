"""The Anthropic translation: POST /v1/messages (Anthropic's Messages API, as DeepSeek's API also
offers it) onto the chat path. A checked MessagesRequest becomes a ChatCompletionRequest (system ->
system messages, tool_use -> assistant tool_calls, tool_result -> tool messages, a final assistant
message -> DeepSeek's prefix completion, tool_choice any/tool -> required/named, thinking -> the
thinking switch), which OpenAIAPI.chat_job turns into the one kind of Job (same prompt building,
reasoning and tool parsers, admission, cancellation); this module shapes the job's result as an
Anthropic message or as Anthropic's named SSE events.

thinking.budget_tokens caps the thought: once it has that many tokens, `</think>` is forced
(ThinkingBudget). Without a `thinking` field the thought is off (Anthropic's default), on a model
whose chat template has the switch."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import replace

import torch
from fastapi import Request
from fastapi.responses import Response

from nanoseek import chat_template
from nanoseek.serve import protocol
from nanoseek.serve.anthropic_protocol import MessagesRequest
from nanoseek.serve.errors import APIError
from nanoseek.serve.job import Choice, Job
from nanoseek.serve.openai import OpenAIAPI

log = logging.getLogger("nanoseek.serve")


class ThinkingBudget:
    """Logits processor: once the thought (the output before `</think>`, generation starting
    inside it) has `budget` tokens, only `</think>` may come next."""

    def __init__(self, budget: int, end_think_id: int):
        self.budget = budget
        self.end_think_id = end_think_id

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) < self.budget or self.end_think_id in output_ids:
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced[self.end_think_id] = 0.0
        return forced


class AnthropicAPI:
    """POST /v1/messages on top of an OpenAIAPI's chat path."""

    def __init__(self, api: OpenAIAPI):
        self.api = api
        self.server = api.server

    async def messages(self, request: Request) -> Response:
        start = time.perf_counter()
        self.server.authorize(request)
        self.server.ready()
        body = await self.server.body(request)
        try:
            req = protocol.parse(MessagesRequest, body)
        except protocol.ProtocolError as e:
            raise APIError(400, str(e), param=e.param) from None
        ignored = protocol.unknown_fields(req)
        if ignored:
            log.warning("ignoring unknown request fields: %s", ", ".join(ignored))
        chat, images = self.chat_request(req)
        try:
            job = await self.api.chat_job(chat, start)
        except APIError as e:  # an image's field, in the names the client sent
            if e.param in images:
                e.param = images[e.param]
            raise
        if req.thinking is not None and req.thinking.budget_tokens is not None:
            self._cap_thought(job, req.thinking.budget_tokens)
        if req.stream:
            return await self.server.stream(
                request,
                job,
                self.events(job, req),
                error_event=lambda e: _event("error", e.anthropic_body()),
                done="",
            )
        await self.server.run(request, job)
        [c] = job.choices
        stop_reason, stop_sequence = self.stop_reason(c, req)
        name = self.server.config.model_name
        message = _message(job, name, _content(c), stop_reason, stop_sequence, self.usage(job))
        return Response(json.dumps(message, ensure_ascii=False), media_type="application/json")

    # ------------------------------------------------------------------ request -> chat request
    def chat_request(
        self, req: MessagesRequest
    ) -> tuple[protocol.ChatCompletionRequest, dict[str, str]]:
        """The chat request this message request means (both already checked), and the field of
        each image in it -> the image block's field (`messages.I.content.J.source`)."""
        messages = []
        images = {}
        if req.system is not None:
            system = [req.system] if isinstance(req.system, str) else [b.text for b in req.system]
            messages += [{"role": "system", "content": text} for text in system]
        last = len(req.messages) - 1
        for i, m in enumerate(req.messages):
            blocks = m.blocks
            text = "".join(b.text for b in blocks if b.type == "text")
            if m.role == "user":
                for b in blocks:
                    if b.type == "tool_result":
                        content = b.content
                        if not isinstance(content, str):
                            content = "".join(p.text for p in content)
                        messages.append(
                            {"role": "tool", "tool_call_id": b.tool_use_id, "content": content}
                        )
                if any(b.type == "image" for b in blocks):
                    parts = []
                    for j, b in enumerate(blocks):
                        if b.type == "text":
                            parts.append({"type": "text", "text": b.text})
                        elif b.type == "image":
                            chat_field = f"messages.{len(messages)}.content.{len(parts)}.image_url"
                            images[chat_field] = f"messages.{i}.content.{j}.source"
                            if b.source["type"] == "url":
                                url = b.source["url"]
                            else:
                                url = f"data:{b.source['media_type']};base64,{b.source['data']}"
                            parts.append({"type": "image_url", "image_url": {"url": url}})
                    messages.append({"role": "user", "content": parts})
                elif text or not any(b.type == "tool_result" for b in blocks):
                    messages.append({"role": "user", "content": text})
                continue
            out = {"role": "assistant", "content": text or None}
            thought = [b.thinking for b in blocks if b.type == "thinking"]
            if thought:
                out["reasoning_content"] = "".join(thought)
            calls = [
                {
                    "id": b.id,
                    "type": "function",
                    "function": {
                        "name": b.name,
                        "arguments": json.dumps(b.input, ensure_ascii=False),
                    },
                }
                for b in blocks
                if b.type == "tool_use"
            ]
            if calls:
                out["tool_calls"] = calls
            if i == last:  # Anthropic's prefill: the answer continues this text
                out["prefix"] = True
                out["content"] = text
            messages.append(out)
        chat = {
            "messages": messages,
            "max_tokens": req.max_tokens,
            "stream": req.stream,
        }
        for name in ("temperature", "top_p", "top_k"):
            if getattr(req, name) is not None:
                chat[name] = getattr(req, name)
        if req.stop_sequences:
            chat["stop"] = list(req.stop_sequences)
        if req.tools:
            chat["tools"] = [_function(t) for t in req.tools]
        choice = req.tool_choice
        if choice is not None:
            chat["tool_choice"] = {
                "auto": "auto",
                "none": "none",
                "any": "required",
                "tool": {"type": "function", "function": {"name": choice.name}},
            }[choice.type]
            chat["parallel_tool_calls"] = not choice.disable_parallel_tool_use
        output = req.output_config
        if output is not None and output.format is not None:
            schema = {"name": "output", "schema": output.format.schema_}
            chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        if req.thinking is not None:
            chat["thinking"] = {"type": "enabled" if req.thinking.on else "disabled"}
        elif self._has_thinking_switch():
            chat["thinking"] = {"type": "disabled"}
        try:
            body = json.dumps(chat, ensure_ascii=False).encode()
            return protocol.parse(protocol.ChatCompletionRequest, body), images
        except protocol.ProtocolError as e:  # what MessagesRequest.check leaves to the chat path
            param = _anthropic_names(e.param) if e.param else None
            raise APIError(400, _anthropic_names(str(e)), param=param) from None

    def _has_thinking_switch(self) -> bool:
        tok = self.server.tok
        if "think" not in tok.special_ids:
            return False
        return tok.chat_template is None or chat_template.reads_thinking(tok.chat_template)

    def _cap_thought(self, job: Job, budget: int) -> None:
        """Add ThinkingBudget to a job whose generation starts inside a thought."""
        end_think = self.server.tok.special_ids.get("end_think")
        parser = job.make_parser()
        if end_think is None or parser is None or not parser.saw_reasoning:
            return
        processors = [*job.params.logits_processors, ThinkingBudget(budget, end_think)]
        job.params = replace(job.params, logits_processors=processors)

    # ------------------------------------------------------------------ job -> message
    def stop_reason(self, c: Choice, req: MessagesRequest) -> tuple[str | None, str | None]:
        """(stop_reason, stop_sequence) of a finished choice."""
        if c.finish_reason == "length":
            return "max_tokens", None
        if c.finish_reason == "tool_calls":
            return "tool_use", None
        if c.finish_reason != "stop":
            return None, None
        if c.token_ids and c.token_ids[-1] in self.server.engine.eos_ids:
            return "end_turn", None
        # a stop string ended it: the one that occurs first in the generated text
        text = self.server.tok.decode(c.token_ids)
        found = [(text.find(s), s) for s in req.stop_sequences or [] if s in text]
        if not found:
            return "end_turn", None
        return "stop_sequence", min(found)[1]

    def usage(self, job: Job) -> dict:
        """Anthropic's usage: input_tokens excludes the prompt tokens the prefix cache served
        (cache_read_input_tokens), as Anthropic counts them."""
        prompt = sum(map(len, job.prompts))
        return {
            "input_tokens": prompt - job.cached,
            "output_tokens": sum(len(c.token_ids) for c in job.choices),
            "cache_read_input_tokens": job.cached,
        }

    async def events(self, job: Job, req: MessagesRequest) -> AsyncIterator[str]:
        """The job as Anthropic's SSE events: message_start (once the prompt is admitted, so that
        its usage counts the cached tokens), then per block content_block_start, its deltas and
        content_block_stop (thinking, text, then one block per tool call), then message_delta
        with the stop reason and usage, and message_stop. Keep-alives are ping events."""
        started = False
        index = -1
        open_block: str | None = None

        def start_block(block: dict) -> str:
            nonlocal index, open_block
            out = stop_block()
            index += 1
            open_block = block["type"]
            return out + _event("content_block_start", {"index": index, "content_block": block})

        def stop_block() -> str:
            nonlocal open_block
            if open_block is None:
                return ""
            open_block = None
            return _event("content_block_stop", {"index": index})

        def delta(delta: dict) -> str:
            return _event("content_block_delta", {"index": index, "delta": delta})

        async with aclosing(self.server.events(job)) as events:
            async for item in events:
                if item is None:
                    yield _event("ping", {})
                    continue
                c, ev, reasoning, text = item
                out = ""
                if not started:
                    started = True
                    usage = self.usage(job) | {"output_tokens": 0}
                    message = _message(job, self.server.config.model_name, [], None, None, usage)
                    out += _event("message_start", {"message": message})
                if reasoning:
                    if open_block != "thinking":
                        out += start_block({"type": "thinking", "thinking": "", "signature": ""})
                    out += delta({"type": "thinking_delta", "thinking": reasoning})
                if text:
                    if open_block != "text":
                        out += start_block({"type": "text", "text": ""})
                    out += delta({"type": "text_delta", "text": text})
                for d in c.tool_deltas:
                    if d.id is not None:
                        block = {"type": "tool_use", "id": _tool_id(d.id), "name": d.name}
                        out += start_block(block | {"input": {}})
                    if d.arguments:
                        out += delta({"type": "input_json_delta", "partial_json": d.arguments})
                if ev.finished:
                    out += stop_block()
                    stop_reason, stop_sequence = self.stop_reason(c, req)
                    out += _event(
                        "message_delta",
                        {
                            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                            "usage": self.usage(job),
                        },
                    )
                    out += _event("message_stop", {})
                if out:
                    yield out


def _function(tool) -> dict:
    function = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _content(c: Choice) -> list[dict]:
    """A finished choice's content blocks: its thought, its text, its tool calls."""
    blocks = []
    if c.parser.saw_reasoning:
        blocks.append({"type": "thinking", "thinking": "".join(c.reasoning), "signature": ""})
    text = "".join(c.content)
    if text:
        blocks.append({"type": "text", "text": text})
    for call in c.tools.calls if c.tools is not None else []:
        try:
            arguments = json.loads(call.arguments)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):  # cut short by max_tokens, or not JSON (no strict)
            log.warning("a tool call's arguments are not a JSON object: %.200r", call.arguments)
            arguments = {}
        blocks.append(
            {"type": "tool_use", "id": _tool_id(call.id), "name": call.name, "input": arguments}
        )
    return blocks


def _message(job: Job, model: str, content, stop_reason, stop_sequence, usage) -> dict:
    return {
        "id": _message_id(job),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


def _message_id(job: Job) -> str:
    return "msg_" + job.id.removeprefix("chatcmpl-")


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _anthropic_names(message: str) -> str:
    """An error of the translated chat request, in the names the client sent."""
    for chat, ours in (
        (".function.parameters", ".input_schema"),
        (".function.name", ".name"),
        ("response_format.json_schema.schema", "output_config.format.schema"),
    ):
        message = message.replace(chat, ours)
    return message


def _event(kind: str, data: dict) -> str:
    """One named SSE event; its data carries the same `type`."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind} | data, ensure_ascii=False)}\n\n"
