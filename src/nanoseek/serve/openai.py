"""The OpenAI translation: a request's JSON -> prompt ids, SamplingParams and a Job
(every limit checked), and the job's engine events -> OpenAI JSON or SSE chunks (chat
with DeepSeek's reasoning_content, and completions). Prompts are measured in bytes
before they are tokenized, and tokenized on a worker thread: a huge prompt neither
stalls the event loop nor gets tokenized at all."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import Response

from nanoseek import chat_template
from nanoseek.engine import SamplingParams
from nanoseek.serve import protocol
from nanoseek.serve.chat_format import (
    TOOL_TOKEN_NAMES,
    FormatError,
    ReasoningParser,
    chat_request_prompt,
    completion_prompt,
    tool_format,
)
from nanoseek.serve.errors import APIError
from nanoseek.serve.grammar import Grammar, GrammarError, GrammarProcessor, tool_calls_grammar
from nanoseek.serve.images import (
    RemoteImages,
    check_urls,
    image_limits,
    image_urls,
    load_request_images,
)
from nanoseek.serve.job import Choice, Job
from nanoseek.serve.logits import JsonObjectProcessor, LogitBias, MinTokens
from nanoseek.serve.logprobs import (
    chat_logprobs,
    choice_logprobs,
    completion_logprobs,
    echo_logprobs,
    vllm_prompt_logprobs,
)
from nanoseek.serve.server import Server
from nanoseek.serve.tools import ToolCallRules, ToolParser

log = logging.getLogger("nanoseek.serve")
FINGERPRINT = "nanoseek-0.1"


class OpenAIAPI:
    """The OpenAI-compatible endpoints of a Server."""

    def __init__(self, server: Server):
        self.server = server
        self.config = server.config

    def models(self, request: Request) -> Response:
        self.server.authorize(request)
        card = protocol.ModelCard(id=self.config.model_name, created=self.server.created)
        if self.server.status == "ok":
            card.max_model_len = self.server.engine.max_model_len
            vision = self.server.engine.vision
            card.input_modalities = ["text"] if vision is None else ["text", "image"]
            if vision is not None:
                card.image_limits = image_limits(self.config, vision.config)
        return _json(protocol.ModelList(data=[card]))

    # ------------------------------------------------------------------ request -> SamplingParams
    async def admit(
        self, request: Request, model: type[protocol.SamplingRequest]
    ) -> protocol.SamplingRequest:
        """The server's admission checks, then the body parsed and checked as `model`."""
        self.server.authorize(request)
        self.server.ready()
        body = await self.server.body(request)
        try:
            req = protocol.parse(model, body)
        except protocol.ProtocolError as e:
            raise APIError(400, str(e), param=e.param) from None
        if req.model is not None and req.model != self.config.model_name:
            raise APIError(
                404,
                f"The model `{req.model}` does not exist. This server serves "
                f"`{self.config.model_name}`.",
                "not_found_error",
                "model",
                "model_not_found",
            )
        ignored = protocol.unknown_fields(req)
        if ignored:
            log.warning("ignoring unknown request fields: %s", ", ".join(ignored))
        return req

    def sampling(
        self,
        req: protocol.SamplingRequest,
        prompts: list[list[int]],
        max_tokens: int | None,
        default_max: int,
        logprobs: int | None,
        json_thinking: bool | None = None,
        param: str = "messages",
        extra_processors: tuple = (),
        grammar: Grammar | None = None,
        thinking: bool = False,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """The request's SamplingParams, after every limit check (json_thinking: None = no JSON
        mode, else whether the output starts with a thought; grammar: a structured-output mode's,
        applied after the thought if `thinking`). max_tokens=0 scores the prompt only: it may then
        fill the whole context."""
        limit = self.config.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise APIError(
                400,
                f"max_tokens={max_tokens} is more than this server allows ({limit})",
                param="max_tokens",
            )
        context = self.server.engine.max_model_len
        longest = max(map(len, prompts))
        if longest > context or (longest == context and max_tokens != 0):
            room = "is shorter" if longest > context else "leaves no room to generate"
            raise APIError(
                400,
                f"the prompt has {longest} tokens; this model's context is "
                f"{context} tokens and {room}",
                param=param,
                code="context_length_exceeded",
            )
        # max_tokens beyond the context is cut to what fits: finish_reason "length" says so.
        budget = min(default_max if max_tokens is None else max_tokens, limit, context - longest)
        vocab = self.server.table.size
        processors = list(extra_processors)
        if req.logit_bias:
            bias = {int(k): v for k, v in req.logit_bias.items()}
            if max(bias) >= vocab:
                raise APIError(
                    400,
                    f"logit_bias: token id {max(bias)} is outside the vocabulary ({vocab})",
                    param="logit_bias",
                )
            processors.append(LogitBias(bias))
        if req.min_tokens:
            structured = req.structured_mode()
            if structured is not None:
                raise APIError(
                    400,
                    f"min_tokens cannot be combined with {structured[2]} (its output may end "
                    "sooner)",
                    param="min_tokens",
                )
            if req.min_tokens > budget:
                raise APIError(
                    400,
                    f"min_tokens={req.min_tokens} is more than max_tokens={budget}",
                    param="min_tokens",
                )
            stop_ids = [self.server.tok.eos_id, *(req.stop_token_ids or [])]
            processors.append(MinTokens(req.min_tokens, stop_ids))
        if json_thinking is not None:
            need = 4 if json_thinking else 3  # ["</think>"] "{" "}" EOS
            if budget < need:
                raise APIError(400, f"JSON mode needs max_tokens >= {need}", param="max_tokens")
            processors.append(JsonObjectProcessor(self.server.json_vocab, budget, json_thinking))
        if grammar is not None:
            vocab = self.server.grammar_vocab
            shared = len(prompts) * req.n
            processors.append(GrammarProcessor(vocab, grammar, thinking, sequences=shared))
        if any(t >= vocab for t in req.stop_token_ids or []):
            raise APIError(
                400,
                f"stop_token_ids must be below the vocabulary size {vocab}",
                param="stop_token_ids",
            )
        d = self.server.defaults
        try:
            params = SamplingParams(
                max_tokens=budget,
                n=req.n,
                seed=req.seed,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                temperature=req.temperature
                if req.temperature is not None
                else d.get("temperature", 1.0),
                top_p=req.top_p if req.top_p is not None else d.get("top_p", 1.0),
                top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,
                min_p=req.min_p or 0.0,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty or 1.0,
                stop=req.stop_list,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                logits_processors=processors,
            )
            for ids in prompts:
                self.server.engine.check(ids, params)
        except ValueError as e:
            raise APIError(400, str(e).removeprefix("SamplingParams: ")) from None
        return params

    async def grammar(self, req: protocol.SamplingRequest) -> Grammar | None:
        """The request's structured-output grammar, compiled on a worker thread (a large schema
        takes a while); None for no mode or json_object (logits.py's automaton)."""
        mode = req.structured_mode()
        if mode is None or mode[0] == "json_object":
            return None
        kind, value, param = mode
        try:
            return await asyncio.to_thread(self.server.grammar_vocab.build, kind, value, param)
        except GrammarError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    def usage(self, job: Job, chat: bool) -> protocol.Usage:
        reasoning = None
        if chat:
            end = self.server.tok.special_ids.get("end_think")
            reasoning = sum(
                (c.token_ids.index(end) + 1 if end in c.token_ids else len(c.token_ids))
                for c in job.choices
                if c.parser and c.parser.saw_reasoning
            )
        return protocol.Usage.of(
            sum(map(len, job.prompts)),
            sum(len(c.token_ids) for c in job.choices),
            job.cached,
            reasoning,
        )

    # ------------------------------------------------------------------ endpoints
    async def chat_completions(self, request: Request) -> Response:
        start = time.perf_counter()
        req: protocol.ChatCompletionRequest = await self.admit(
            request, protocol.ChatCompletionRequest
        )
        job = await self.chat_job(req, start)
        return await self.chat_response(request, req, job)

    async def chat_job(self, req: protocol.ChatCompletionRequest, start: float) -> Job:
        """A checked chat request -> its Job (prompt, SamplingParams, reasoning and tool parsers);
        /v1/messages (serve/anthropic.py) translates onto this too."""
        tok = self.server.tok
        thinking = req.thinking_enabled(self.config.thinking)
        self._check_thinking_switch(req)
        self.server.check_size(1, req.n)
        messages = [m.as_dict() for m in req.messages]
        tools = [t.as_dict() for t in req.tools or []]
        choice = req.tool_choice_name
        fmt = self._tool_format(messages, tools)
        forced = choice not in ("auto", "none")
        mode = req.structured_mode()
        if forced and (messages[-1].get("prefix") or mode):
            raise APIError(
                400,
                f"tool_choice {choice!r} forces a call; it cannot go with "
                + ("a prefix message" if messages[-1].get("prefix") else mode[2]),
                param="tool_choice",
            )
        text = [
            [m.get("content"), m.get("reasoning_content"), m.get("tool_calls")] for m in messages
        ]
        self.server.check_bytes(_text_bytes([text, tools]), "messages")
        try:
            images = await self.request_images(req.messages)
            ids, in_reasoning, prefix = await asyncio.to_thread(
                chat_request_prompt, tok, messages, thinking, tools, choice, *images
            )
        except FormatError as e:
            raise APIError(400, str(e), param=e.param) from None
        rules = []
        if tools:
            rules.append(ToolCallRules(tok.special_ids, choice != "none", req.parallel_tool_calls))
        calls = await self.tool_grammar(tools, choice, fmt, req.parallel_tool_calls)
        if calls is not None:
            if req.min_tokens:
                raise APIError(
                    400,
                    "min_tokens cannot be combined with a constrained tool call (tool_choice "
                    "required or named, or a strict function): its grammar may end sooner",
                    param="min_tokens",
                )
            vocab = self.server.grammar_vocab
            trigger = tok.special_ids["tool_calls_begin"] if choice == "auto" else None
            rules.append(
                GrammarProcessor(vocab, calls, in_reasoning, trigger=trigger, sequences=req.n)
            )
        grammar = await self.grammar(req)
        params = self.sampling(
            req,
            [ids],
            req.max_completion_tokens or req.max_tokens,
            self.config.max_tokens,
            (req.top_logprobs or 0) if req.logprobs else None,
            json_thinking=in_reasoning if mode and mode[0] == "json_object" else None,
            grammar=grammar,
            thinking=in_reasoning,
            extra_processors=tuple(rules),
            prompt_logprobs=req.prompt_logprobs,
        )
        make_tools = self._tool_parser(fmt if tools and choice != "none" else None, prefix)
        job = Job(
            f"chatcmpl-{uuid.uuid4().hex}",
            [ids],
            params,
            lambda: ReasoningParser(in_reasoning),
            start,
            start + self.config.request_timeout,
            make_tools=make_tools,
            images=[images[0]],
        )
        return job

    async def request_images(self, messages: list[protocol.Message]) -> tuple:
        """A chat request's image parts -> (ImageInput or None, the vision config) for
        chat_request_prompt: checked (a model that reads images, the count, data URLs or remote
        ones from the hosts the operator allows), then fetched and decoded on a worker thread
        (serve/images.py). Raises FormatError naming the field."""
        urls = image_urls(messages)
        vision = self.server.engine.vision
        remote = RemoteImages(self.config.remote_image_hosts, self.config.remote_image_timeout)
        check_urls(urls, self.config.max_images_per_request, vision, remote)
        if not urls:
            return None, None
        images = await asyncio.to_thread(load_request_images, urls, vision.config, remote)
        return images, vision.config

    async def chat_response(
        self, request: Request, req: protocol.ChatCompletionRequest, job: Job
    ) -> Response:
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self.server.stream(request, job, self.chat_chunks(job, include_usage))
        await self.server.run(request, job)
        choices = [
            protocol.ChatChoice(
                index=c.index,
                finish_reason=c.finish_reason,
                message=_assistant_message(c),
                logprobs=chat_logprobs(self.server.table, c.logprobs) if req.logprobs else None,
            )
            for c in job.choices
        ]
        return _json(
            protocol.ChatCompletion(
                id=job.id,
                created=int(time.time()),
                model=self.config.model_name,
                system_fingerprint=FINGERPRINT,
                choices=choices,
                usage=self.usage(job, chat=True),
                prompt_logprobs=vllm_prompt_logprobs(
                    self.server.table, next(iter(job.requests.values())).prompt_logprobs
                ),
            )
        )

    async def tool_grammar(
        self, tools: list[dict], choice: str, fmt: str | None, parallel: bool
    ) -> Grammar | None:
        """The grammar of a request's tool calls, or None when they are free.

        required: the prompt ends in `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>`; the grammar
        picks one of the tools' names, then that function's arguments by its schema, then more
        calls if parallel, then the close. A named function: the prompt ends where its arguments
        begin; the grammar is its arguments, then the close (exactly one call). auto, with at least
        one `strict` function: the output is free until the model writes
        `<｜tool▁calls▁begin｜>` (the processor's trigger), then the whole block is constrained:
        names among the tools, a strict function's arguments by its schema, a non-strict one's as
        any JSON object. Forced calls use every function's schema, strict or not (as vLLM does).
        A schema the engine cannot compile: a 400 naming `tools.N.function.parameters`."""
        if not tools or choice == "none" or fmt is None:
            return None
        forced = choice != "auto"
        entries = []  # (index, name, schema, constrained)
        for i, tool in enumerate(tools):
            function = tool["function"]
            if choice not in ("auto", "required") and function["name"] != choice:
                continue
            constrained = forced or bool(function.get("strict"))
            schema = {"type": "object"}
            if constrained:
                schema = {"type": "object", **(function.get("parameters") or {})}
            entries.append((i, function["name"], schema, constrained))
        if not any(constrained for *_, constrained in entries):
            return None
        named = choice not in ("auto", "required")
        prefilled = "calls" if choice == "auto" else "arguments" if named else "call"
        vocab = self.server.grammar_vocab

        def build() -> Grammar:
            for i, _, schema, constrained in entries:
                if constrained:  # each schema alone first, so that an error names its tool
                    vocab.build("json_schema", schema, f"tools.{i}.function.parameters")
            text = tool_calls_grammar(
                vocab,
                [(name, schema) for _, name, schema, _ in entries],
                style="v3" if fmt == "fenced" else "v31",
                parallel=parallel and not named,
                prefilled=prefilled,
            )
            return vocab.compile(text, "tools")

        try:
            return await asyncio.to_thread(build)
        except GrammarError as e:
            param = e.param or "tools"
            raise APIError(400, f"{param}: {e}", param=param) from None

    def _tool_parser(self, fmt: str | None, prefix: str):
        """A factory of ToolParsers for a job's choices, if the engine's text shows tool tokens
        (fmt None: they are only removed from the text, as other special tokens are)."""
        if not all(name in self.server.tok.special_ids for name in TOOL_TOKEN_NAMES):
            return None
        return lambda: ToolParser(fmt, prefix)

    def _tool_format(self, messages: list[dict], tools: list[dict]) -> str | None:
        """How this model writes calls; a 400 if the request uses tools and the model cannot."""
        fmt = tool_format(self.server.tok)
        history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        if fmt is None and (tools or history):
            why = (
                "its tokenizer has no tool-call tokens (<｜tool▁calls▁begin｜> and the rest)"
                if self.server.tok.chat_template is None
                or "tool_sep" not in self.server.tok.special_ids
                else "its chat template renders no tool calls"
            )
            raise APIError(
                400, f"this model cannot call tools: {why}", param="tools" if tools else "messages"
            )
        return fmt

    def _check_thinking_switch(self, req: protocol.ChatCompletionRequest) -> None:
        """A thinking switch the model cannot honour is a 400 (a request that leaves it unset
        gets the model's own behaviour)."""
        kwargs = req.chat_template_kwargs or {}
        param = "thinking" if req.thinking is not None else None
        for key in ("thinking", "enable_thinking"):
            if param is None and kwargs.get(key) is not None:
                param = f"chat_template_kwargs.{key}"
        if param is None:
            return
        tok = self.server.tok
        if "think" not in tok.special_ids:
            raise APIError(400, "this model's tokenizer has no <think> token", param=param)
        if tok.chat_template is not None and not chat_template.reads_thinking(tok.chat_template):
            raise APIError(400, "this model's chat template has no thinking switch", param=param)

    async def chat_chunks(self, job: Job, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        name = self.config.model_name

        def chunk(choices, usage=None) -> str:
            return _sse(
                protocol.ChatCompletionChunk(
                    id=job.id,
                    created=created,
                    model=name,
                    usage=usage,
                    system_fingerprint=FINGERPRINT,
                    choices=choices,
                )
            )

        for c in job.choices:
            yield chunk(
                [
                    protocol.ChunkChoice(
                        index=c.index, delta=protocol.Delta(role="assistant", content="")
                    )
                ]
            )
        async with aclosing(self.server.events(job)) as events:
            async for item in events:
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                c, ev, r, text = item
                lps = chat_logprobs(self.server.table, ev.logprobs) if ev.logprobs else None
                if r:
                    yield chunk(
                        [
                            protocol.ChunkChoice(
                                index=c.index,
                                delta=protocol.Delta(reasoning_content=r),
                                logprobs=lps,
                            )
                        ]
                    )
                    lps = None
                if text or lps:
                    yield chunk(
                        [
                            protocol.ChunkChoice(
                                index=c.index, delta=protocol.Delta(content=text), logprobs=lps
                            )
                        ]
                    )
                for d in c.tool_deltas:  # one piece of one call per chunk, as OpenAI sends them
                    call = protocol.ToolCallDelta(
                        index=d.index,
                        id=d.id,
                        type="function" if d.id else None,
                        function=protocol.FunctionCallOut(name=d.name, arguments=d.arguments),
                    )
                    yield chunk(
                        [
                            protocol.ChunkChoice(
                                index=c.index, delta=protocol.Delta(tool_calls=[call])
                            )
                        ]
                    )
                if ev.finished:
                    yield chunk(
                        [
                            protocol.ChunkChoice(
                                index=c.index, delta=protocol.Delta(), finish_reason=c.finish_reason
                            )
                        ]
                    )
        if include_usage:
            yield chunk([], self.usage(job, chat=True))

    async def completions(self, request: Request) -> Response:
        start = time.perf_counter()
        req: protocol.CompletionRequest = await self.admit(request, protocol.CompletionRequest)
        self.server.check_size(len(req.prompts), req.n)
        vocab = self.server.table.size
        suffix = _text_bytes(req.suffix)
        for p in req.prompts:
            if isinstance(p, str):
                self.server.check_bytes(_text_bytes(p) + suffix, "prompt")
            elif not all(0 <= t < vocab for t in p):
                raise APIError(
                    400,
                    f"prompt token ids must lie in [0, {vocab}), the vocabulary",
                    param="prompt",
                )
        try:
            prompts = await asyncio.to_thread(self._completion_prompts, req)
        except FormatError as e:
            raise APIError(400, str(e), param=e.param) from None
        mode = req.structured_mode()
        grammar = await self.grammar(req)
        params = self.sampling(
            req,
            prompts,
            req.max_tokens,
            16,
            req.logprobs,
            json_thinking=False if mode and mode[0] == "json_object" else None,
            param="prompt",
            grammar=grammar,
            prompt_logprobs=req.prompt_logprob_count,
        )
        echo = await asyncio.to_thread(self._echo, req) if req.echo else None
        job = Job(
            f"cmpl-{uuid.uuid4().hex}",
            prompts,
            params,
            lambda: None,
            start,
            start + self.config.request_timeout,
            echo,
            make_tools=self._tool_parser(None, ""),
        )
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = self.completion_chunks(job, include_usage, req.logprobs, req.echo)
            return await self.server.stream(request, job, chunks)
        await self.server.run(request, job)
        choices = []
        for r in job.requests.values():
            echoed = None
            if req.echo and req.logprobs is not None:
                echoed = echo_logprobs(self.server.table, r.prompt, r.prompt_logprobs)
            prompt_lps = (
                vllm_prompt_logprobs(self.server.table, r.prompt_logprobs)
                if req.prompt_logprobs is not None
                else None
            )
            choices += [
                protocol.CompletionChoice(
                    index=c.index,
                    text=c.prefix_text + "".join(c.content),
                    finish_reason=c.finish_reason,
                    logprobs=None
                    if req.logprobs is None
                    else choice_logprobs(self.server.table, echoed, c.logprobs, len(c.prefix_text)),
                    prompt_logprobs=prompt_lps,
                )
                for c in r.choices
            ]
        return _json(
            protocol.Completion(
                id=job.id,
                created=int(time.time()),
                model=self.config.model_name,
                system_fingerprint=FINGERPRINT,
                choices=choices,
                usage=self.usage(job, chat=False),
            )
        )

    def _completion_prompts(self, req: protocol.CompletionRequest) -> list[list[int]]:
        """Every prompt's ids (tokenizing: on a worker thread)."""
        return [completion_prompt(self.server.tok, p, req.suffix) for p in req.prompts]

    def _echo(self, req: protocol.CompletionRequest) -> list[str]:
        """Every prompt as text, for echo (decoding: on a worker thread)."""
        return [
            p if isinstance(p, str) else self.server.tok.decode(p, skip_special_tokens=True)
            for p in req.prompts
        ]

    async def completion_chunks(
        self, job: Job, include_usage: bool, logprobs: int | None, echo: bool = False
    ) -> AsyncIterator[str]:
        """SSE chunks of a completion. With echo the prompt comes first; with echo and logprobs it
        comes once the prompt is computed, with its tokens' logprobs."""
        created = int(time.time())
        name = self.config.model_name
        offsets = {c.index: len(c.prefix_text) for c in job.choices}
        # choices whose echoed prompt waits for its logprobs
        echo_pending = {c.index for c in job.choices} if echo and logprobs is not None else set()

        def chunk(choices, usage=None) -> str:
            return _sse(
                protocol.Completion(
                    id=job.id,
                    created=created,
                    model=name,
                    system_fingerprint=FINGERPRINT,
                    choices=choices,
                    usage=usage,
                )
            )

        for c in job.choices:
            if c.prefix_text and c.index not in echo_pending:
                yield chunk([protocol.CompletionChoice(index=c.index, text=c.prefix_text)])
        async with aclosing(self.server.events(job)) as events:
            async for item in events:
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                c, ev, _, text = item
                if c.index in echo_pending:
                    echo_pending.discard(c.index)
                    ids = ev.output.prompt_token_ids
                    lps = echo_logprobs(self.server.table, ids, ev.output.prompt_logprobs)
                    yield chunk(
                        [protocol.CompletionChoice(index=c.index, text=c.prefix_text, logprobs=lps)]
                    )
                lps = None
                if logprobs is not None and ev.logprobs:
                    lps = completion_logprobs(self.server.table, ev.logprobs, offsets[c.index])
                    offsets[c.index] += sum(map(len, lps.tokens))
                if text or lps or ev.finished:
                    finish_reason = c.finish_reason if ev.finished else None
                    yield chunk(
                        [
                            protocol.CompletionChoice(
                                index=c.index, text=text, logprobs=lps, finish_reason=finish_reason
                            )
                        ]
                    )
        if include_usage:
            yield chunk([], self.usage(job, chat=False))


def _assistant_message(c: Choice) -> protocol.AssistantMessage:
    reasoning = "".join(c.reasoning) if c.parser.saw_reasoning else None
    content = "".join(c.content)
    calls = c.tools.calls if c.tools is not None else []
    tool_calls = [
        protocol.ToolCallOut(
            id=call.id, function=protocol.FunctionCallOut(name=call.name, arguments=call.arguments)
        )
        for call in calls
    ]
    return protocol.AssistantMessage(
        content=content if content or not calls else None,
        reasoning_content=reasoning,
        tool_calls=tool_calls or None,
    )


def _text_bytes(value) -> int:
    """UTF-8 bytes of every string in a JSON value (lone surrogates count too)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(map(_text_bytes, value.values()))
    if isinstance(value, list):
        return sum(map(_text_bytes, value))
    return 0


def _json(model, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"
