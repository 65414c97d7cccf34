"""The server: loads the checkpoint on a thread, checks and admits requests, runs them on the engine thread
(bridge.py) and answers in OpenAI shapes, as JSON or SSE.

A request goes: key (401) -> ready (503) -> body size (413) -> JSON fields (400) -> model name (404) -> prompt and
sampling limits (400) -> a slot, or a place in the queue (429) -> the engine thread (bridge.py) -> JSON or SSE.
A client that goes away (or times out) has its generation cancelled.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from nanoseek.checkpoint import Checkpoint
from nanoseek.engine import Engine, SamplingParams, StepEvent
from nanoseek.serve import protocol as P
from nanoseek.serve.bridge import EngineBridge, EngineDead, Rejected
from nanoseek.serve.chat_format import (
    EngineTokenizer,
    FormatError,
    ReasoningParser,
    TokenTable,
    chat_prompt,
    completion_prompt,
)
from nanoseek.serve.config import ServerConfig
from nanoseek.serve.errors import APIError
from nanoseek.serve.logits import JsonObjectProcessor, JsonVocab, LogitBias, MinTokens
from nanoseek.serve.metrics import Metrics

log = logging.getLogger("nanoseek.serve")
FINGERPRINT = "nanoseek-0.1"


# ------------------------------------------------------------------------------------------------ one request


@dataclass
class Choice:
    """One completion as the client sees it, built up from engine events."""

    index: int
    parser: ReasoningParser | None  # chat: splits reasoning from content
    prefix_text: str = ""  # completions with echo: the prompt
    token_ids: list[int] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, ev: StepEvent) -> tuple[str, str]:
        """-> (reasoning, content) this event adds."""
        self.token_ids += ev.token_ids
        self.logprobs += ev.logprobs or []
        text = ev.text or ""
        r, c = self.parser.feed(text) if self.parser else ("", text)
        if ev.finished:
            self.finish_reason = ev.finish_reason
            if self.parser:
                r2, c2 = self.parser.finish()
                r, c = r + r2, c + c2
        self.reasoning.append(r)
        self.content.append(c)
        return r, c


@dataclass
class Job:
    """A request's work: one engine request per prompt, each with n completions."""

    id: str
    prompts: list[list[int]]
    params: SamplingParams
    make_parser: Callable[[], ReasoningParser | None]
    start: float  # when the request arrived (time.perf_counter)
    deadline: float  # when it must be done
    echo: list[str] | None = None
    first_token: float | None = None
    cached: list[int] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)

    def __post_init__(self):
        n = self.params.n
        self.cached = [0] * len(self.prompts)
        self.choices = [Choice(p * n + i, self.make_parser(), self.echo[p] if self.echo else "")
                        for p in range(len(self.prompts)) for i in range(n)]

    def engine_id(self, p: int) -> str:
        return f"{self.id}-{p}"

    def choice(self, ev: StepEvent) -> Choice:
        p = int(ev.request_id.rsplit("-", 1)[1])
        self.cached[p] = ev.output.cached_tokens
        return self.choices[p * self.params.n + ev.index]

    @property
    def done(self) -> bool:
        return all(c.finish_reason for c in self.choices)


# ------------------------------------------------------------------------------------------------- the server


class Server:
    def __init__(self, config: ServerConfig, load: Callable[[], Checkpoint], engine_options: dict | None = None):
        self.config, self._load, self.engine_options = config, load, dict(engine_options or {})
        self.metrics = Metrics()
        self.status, self.load_error = "loading", None
        self.created = int(time.time())
        self.bridge: EngineBridge | None = None
        self.active = self.queued = 0
        self._slots: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Load the checkpoint and start the engine thread (runs on a thread of its own)."""
        try:
            ckpt = self._load()
            self.tok, self.defaults = ckpt.tokenizer, ckpt.defaults
            self.engine = Engine(ckpt.model, EngineTokenizer(ckpt.tokenizer), **self.engine_options)
            self.table = TokenTable(ckpt.tokenizer)
            self.json_vocab = JsonVocab(self.table, ckpt.tokenizer.eos_id,
                                        ckpt.tokenizer.special_ids.get("end_think"))
            self.bridge = EngineBridge(self.engine)
            self.bridge.start()
            self.status = "ok"
            log.info("model loaded: context %d tokens", self.engine.max_model_len)
        except Exception as e:
            self.status, self.load_error = "failed", f"{type(e).__name__}: {e}"
            log.exception("loading the model failed")
            raise

    def close(self) -> None:
        if self.bridge is not None:
            self.bridge.close()

    @property
    def health(self) -> tuple[int, dict]:
        if self.status == "ok" and self.bridge.error:
            return 503, {"status": "failed", "error": self.bridge.error}
        if self.status == "failed":
            return 503, {"status": "failed", "error": self.load_error}
        return (200 if self.status == "ok" else 503), {"status": self.status}

    # ------------------------------------------------------------------ checks
    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")

    def ready(self) -> None:
        code, body = self.health
        if code != 200:
            message = ("the model is still loading" if body["status"] == "loading"
                       else f"the model is unavailable: {body.get('error')}")
            raise APIError(503, message, "unavailable_error", code="model_not_ready", headers={"Retry-After": "5"})

    async def body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(self, model: type[P.SamplingRequest], body: bytes) -> P.SamplingRequest:
        try:
            req = P.parse(model, body)
        except P.ProtocolError as e:
            raise APIError(400, str(e), param=e.param) from None
        if req.model is not None and req.model != self.config.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist. This server serves "
                           f"`{self.config.model_name}`.", "not_found_error", "model", "model_not_found")
        ignored = P.unknown_fields(req)
        if ignored:
            log.warning("ignoring unknown request fields: %s", ", ".join(ignored))
        return req

    def sampling(self, req: P.SamplingRequest, prompts: list[list[int]], max_tokens: int | None, default_max: int,
                 logprobs: int | None, json_thinking: bool | None = None, param: str = "messages") -> SamplingParams:
        """The request's SamplingParams, after every limit check (json_thinking: None = no JSON mode, else
        whether the output starts with a thought)."""
        limit = self.config.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens={max_tokens} is more than this server allows ({limit})",
                           param="max_tokens")
        context = self.engine.max_model_len
        longest = max(map(len, prompts))
        if longest >= context:
            raise APIError(400, f"the prompt has {longest} tokens; this model's context is {context} tokens and "
                           "leaves no room to generate", param=param, code="context_length_exceeded")
        # max_tokens beyond the context is cut to what fits: finish_reason "length" tells the client.
        budget = min(max_tokens or default_max, limit, context - longest)
        vocab = self.table.size
        processors = []
        if req.logit_bias:
            bias = {int(k): v for k, v in req.logit_bias.items()}
            if max(bias) >= vocab:
                raise APIError(400, f"logit_bias: token id {max(bias)} is outside the vocabulary ({vocab})",
                               param="logit_bias")
            processors.append(LogitBias(bias))
        if req.min_tokens:
            if req.min_tokens > budget:
                raise APIError(400, f"min_tokens={req.min_tokens} is more than max_tokens={budget}", param="min_tokens")
            processors.append(MinTokens(req.min_tokens, [self.tok.eos_id, *(req.stop_token_ids or [])]))
        if json_thinking is not None:
            need = 4 if json_thinking else 3  # ["</think>"] "{" "}" EOS
            if budget < need:
                raise APIError(400, f"JSON mode needs max_tokens >= {need}", param="max_tokens")
            processors.append(JsonObjectProcessor(self.json_vocab, budget, json_thinking))
        if any(t >= vocab for t in req.stop_token_ids or []):
            raise APIError(400, f"stop_token_ids must be below the vocabulary size {vocab}", param="stop_token_ids")
        d = self.defaults
        try:
            params = SamplingParams(
                max_tokens=budget, n=req.n, seed=req.seed, logprobs=logprobs,
                temperature=req.temperature if req.temperature is not None else d.get("temperature", 1.0),
                top_p=req.top_p if req.top_p is not None else d.get("top_p", 1.0),
                top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,
                min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty or 1.0,
                stop=req.stop_list, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                logits_processors=processors)
            for ids in prompts:
                self.engine.check(ids, params)
        except ValueError as e:
            raise APIError(400, str(e).removeprefix("SamplingParams: ")) from None
        return params

    # ------------------------------------------------------------------ slots
    @asynccontextmanager
    async def slot(self, request: Request, job: Job):
        """Hold one of max_concurrent_requests slots. Without a free one, wait in a queue of at most max_queue
        (429 beyond that) until one frees, the client leaves, or the request's time is up (503)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_concurrent_requests)
        if self._slots.locked() and self.queued >= self.config.max_queue:
            raise APIError(429, f"the server is busy: {self.active} requests running and {self.queued} queued; "
                           "retry later", "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        self.queued += 1
        acquire = asyncio.ensure_future(self._slots.acquire())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([acquire, gone], timeout=max(0.0, job.deadline - time.perf_counter()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.queued -= 1
            gone.cancel()
            acquire.cancel()  # a no-op once acquired; a semaphore gives back a grant it was cancelled with
        if not acquire.done() or acquire.cancelled():
            if gone.done() and not gone.cancelled():
                raise APIError(499, "the client closed the connection", code="client_closed")
            raise APIError(503, "no slot freed up within the request timeout; retry later", "unavailable_error",
                           code="queue_timeout", headers={"Retry-After": "1"})
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()

    # ------------------------------------------------------------------ generation
    async def events(self, job: Job) -> AsyncIterator[tuple[Choice, StepEvent, str, str] | None]:
        """Run a job on the engine: yields (choice, event, new reasoning, new content) as tokens come, and None
        when nothing came for `keepalive` seconds. Whatever stops the iteration (the end, an error, a client gone,
        the deadline), engine requests still running are cancelled."""
        queue: asyncio.Queue = asyncio.Queue()
        for p, ids in enumerate(job.prompts):
            self.bridge.submit(ids, job.params, job.engine_id(p), queue)
        try:
            while not job.done:
                left = job.deadline - time.perf_counter()
                if left <= 0:
                    raise APIError(504, f"the request took longer than {self.config.request_timeout:g} s",
                                   "timeout_error", code="request_timeout")
                try:
                    item = await asyncio.wait_for(queue.get(), min(left, self.config.keepalive))
                except TimeoutError:
                    yield None
                    continue
                if isinstance(item, EngineDead):
                    raise APIError(503, f"the engine failed: {item.reason}", "unavailable_error",
                                   code="engine_dead")
                if isinstance(item, Rejected):
                    raise APIError(400, item.reason)
                if item.token_ids and job.first_token is None:
                    job.first_token = time.perf_counter()
                choice = job.choice(item)
                yield choice, item, *choice.add(item)
        finally:
            for p in range(len(job.prompts)):
                if not all(c.finish_reason for c in job.choices[p * job.params.n:(p + 1) * job.params.n]):
                    self.bridge.cancel(job.engine_id(p))
            if job.done:
                self._record(job)

    def _record(self, job: Job) -> None:
        end = time.perf_counter()
        generated = sum(len(c.token_ids) for c in job.choices)
        self.metrics.generation_done(
            prompt=sum(map(len, job.prompts)), cached=sum(job.cached), generated=generated,
            ttft=None if job.first_token is None else job.first_token - job.start, duration=end - job.start,
            decode_time=None if job.first_token is None else end - job.first_token)

    def usage(self, job: Job, chat: bool) -> P.Usage:
        reasoning = None
        if chat:
            end = self.tok.special_ids.get("end_think")
            reasoning = sum((c.token_ids.index(end) + 1 if end in c.token_ids else len(c.token_ids))
                            for c in job.choices if c.parser and c.parser.saw_reasoning)
        return P.Usage.of(sum(map(len, job.prompts)), sum(len(c.token_ids) for c in job.choices),
                          sum(job.cached), reasoning)

    def chat_logprobs(self, lps) -> P.ChatLogprobs:
        t = self.table
        return P.ChatLogprobs(content=[
            P.TokenLogprob(token=t.text(lp.token_id), logprob=_finite(lp.logprob), bytes=t.raw(lp.token_id),
                           top_logprobs=[P.TopLogprob(token=t.text(i), logprob=_finite(v), bytes=t.raw(i))
                                         for i, v in lp.top]) for lp in lps])

    def completion_logprobs(self, lps, offset: int) -> P.CompletionLogprobs:
        t = self.table
        tokens = [t.text(lp.token_id) for lp in lps]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        return P.CompletionLogprobs(tokens=tokens, token_logprobs=[_finite(lp.logprob) for lp in lps],
                                    top_logprobs=[{t.text(i): _finite(v) for i, v in lp.top} for lp in lps],
                                    text_offset=offsets)

    # ------------------------------------------------------------------ endpoints
    async def chat_completions(self, request: Request) -> Response:
        start = time.perf_counter()
        self.authorize(request)
        self.ready()
        req: P.ChatCompletionRequest = self.parse(P.ChatCompletionRequest, await self.body(request))
        thinking = req.thinking_enabled(self.config.thinking)
        try:
            ids, in_reasoning = chat_prompt(self.tok, [m.as_dict() for m in req.messages], thinking)
        except FormatError as e:
            raise APIError(400, str(e), param=e.param) from None
        params = self.sampling(req, [ids], req.max_completion_tokens or req.max_tokens, self.config.max_tokens,
                               (req.top_logprobs or 0) if req.logprobs else None,
                               json_thinking=in_reasoning if req.json_mode else None)
        job = Job(f"chatcmpl-{uuid.uuid4().hex}", [ids], params, lambda: ReasoningParser(in_reasoning), start,
                  start + self.config.request_timeout)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self.stream(request, job, self.chat_chunks(job, include_usage))
        async with self.slot(request, job):
            await self.until_done(request, job)
        choices = [P.ChatChoice(index=c.index, finish_reason=c.finish_reason,
                                message=P.AssistantMessage(
                                    content="".join(c.content),
                                    reasoning_content="".join(c.reasoning) if c.parser.saw_reasoning else None),
                                logprobs=self.chat_logprobs(c.logprobs) if req.logprobs else None)
                   for c in job.choices]
        return _json(P.ChatCompletion(id=job.id, created=int(time.time()), model=self.config.model_name,
                                      system_fingerprint=FINGERPRINT, choices=choices,
                                      usage=self.usage(job, chat=True)))

    async def chat_chunks(self, job: Job, include_usage: bool) -> AsyncIterator[str]:
        created, name = int(time.time()), self.config.model_name

        def chunk(choices, usage=None) -> str:
            return _sse(P.ChatCompletionChunk(id=job.id, created=created, model=name, usage=usage,
                                              system_fingerprint=FINGERPRINT, choices=choices))

        for c in job.choices:
            yield chunk([P.ChunkChoice(index=c.index, delta=P.Delta(role="assistant", content=""))])
        async with aclosing(self.events(job)) as events:
            async for item in events:
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                c, ev, r, text = item
                lps = self.chat_logprobs(ev.logprobs) if ev.logprobs else None
                if r:
                    yield chunk([P.ChunkChoice(index=c.index, delta=P.Delta(reasoning_content=r), logprobs=lps)])
                    lps = None
                if text or lps:
                    yield chunk([P.ChunkChoice(index=c.index, delta=P.Delta(content=text), logprobs=lps)])
                if ev.finished:
                    yield chunk([P.ChunkChoice(index=c.index, delta=P.Delta(), finish_reason=c.finish_reason)])
        if include_usage:
            yield chunk([], self.usage(job, chat=True))

    async def completions(self, request: Request) -> Response:
        start = time.perf_counter()
        self.authorize(request)
        self.ready()
        req: P.CompletionRequest = self.parse(P.CompletionRequest, await self.body(request))
        vocab = self.table.size
        prompts = []
        for p in req.prompts:
            if not isinstance(p, str) and any(t >= vocab for t in p):
                raise APIError(400, f"prompt token ids must be below the vocabulary size {vocab}", param="prompt")
            try:
                prompts.append(completion_prompt(self.tok, p, req.suffix))
            except FormatError as e:
                raise APIError(400, str(e), param=e.param) from None
        params = self.sampling(req, prompts, req.max_tokens, 16, req.logprobs, param="prompt")
        echo = [p if isinstance(p, str) else self.tok.decode(p, skip_special_tokens=True)
                for p in req.prompts] if req.echo else None
        job = Job(f"cmpl-{uuid.uuid4().hex}", prompts, params, lambda: None, start,
                  start + self.config.request_timeout, echo)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self.stream(request, job, self.completion_chunks(job, include_usage, req.logprobs))
        async with self.slot(request, job):
            await self.until_done(request, job)
        choices = [P.CompletionChoice(
            index=c.index, text=c.prefix_text + "".join(c.content), finish_reason=c.finish_reason,
            logprobs=None if req.logprobs is None else self.completion_logprobs(c.logprobs, len(c.prefix_text)))
            for c in job.choices]
        return _json(P.Completion(id=job.id, created=int(time.time()), model=self.config.model_name,
                                  system_fingerprint=FINGERPRINT, choices=choices, usage=self.usage(job, False)))

    async def completion_chunks(self, job: Job, include_usage: bool, logprobs: int | None) -> AsyncIterator[str]:
        created, name = int(time.time()), self.config.model_name
        offsets = {c.index: len(c.prefix_text) for c in job.choices}

        def chunk(choices, usage=None) -> str:
            return _sse(P.Completion(id=job.id, created=created, model=name, system_fingerprint=FINGERPRINT,
                                     choices=choices, usage=usage))

        for c in job.choices:
            if c.prefix_text:
                yield chunk([P.CompletionChoice(index=c.index, text=c.prefix_text)])
        async with aclosing(self.events(job)) as events:
            async for item in events:
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                c, ev, _, text = item
                lps = None
                if logprobs is not None and ev.logprobs:
                    lps = self.completion_logprobs(ev.logprobs, offsets[c.index])
                    offsets[c.index] += sum(map(len, lps.tokens))
                if text or lps or ev.finished:
                    yield chunk([P.CompletionChoice(index=c.index, text=text, logprobs=lps,
                                                    finish_reason=c.finish_reason if ev.finished else None)])
        if include_usage:
            yield chunk([], self.usage(job, chat=False))

    async def until_done(self, request: Request, job: Job) -> None:
        """Run a non-streaming job to its end; if the client disconnects first, cancel it."""
        async def run():
            async with aclosing(self.events(job)) as events:
                async for _ in events:
                    pass

        work = asyncio.ensure_future(run())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, gone):
                task.cancel()
        if not work.cancelled() and work.done():
            work.result()  # re-raise its APIError
        if not job.done:
            raise APIError(499, "the client closed the connection", code="client_closed")

    async def stream(self, request: Request, job: Job, chunks: AsyncIterator[str]) -> Response:
        """Take a slot now (so that a full queue is a 429, not a broken stream), then stream SSE."""
        slot = self.slot(request, job)
        await slot.__aenter__()

        async def body():
            try:
                async for piece in chunks:
                    yield piece
            except APIError as e:
                self.metrics.count_error(e.type)
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"

        async def close():
            await chunks.aclose()  # cancels the engine requests if the stream ended early
            await slot.__aexit__(None, None, None)

        return SSEResponse(body(), on_close=close)


class SSEResponse(StreamingResponse):
    """A text/event-stream whose clean-up runs however the response ends: finished, failed or disconnected."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _finite(x: float) -> float:
    return max(x, -9999.0)  # JSON has no -inf


def _json(model, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"
