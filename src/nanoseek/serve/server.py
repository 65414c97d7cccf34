"""The server's lifecycle and admission, and the engine run of an admitted request.

Lifecycle: the checkpoint loads on a thread, then the engine thread (bridge.py) starts; `health`
says where it stands. Admission: API key (401) -> ready (503) -> body size (413) -> prompt bytes
(400, before any tokenizing) -> prompts x n per request (429), then room among the sequences and
tokens of all admitted requests (429), then a slot, or a place in the queue (429). A job then runs
on the engine thread, its prompts one fair group of the engine's batch; whatever ends it (the end,
an error, the client gone, the deadline) cancels every engine request it has. serve/openai.py turns
requests into jobs and jobs into responses.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from nanoseek.checkpoint import Checkpoint
from nanoseek.engine import Engine, StepEvent
from nanoseek.serve.bridge import EngineBridge, EngineDead, Rejected
from nanoseek.serve.chat_format import EngineTokenizer, TokenTable
from nanoseek.serve.config import ServerConfig
from nanoseek.serve.errors import APIError
from nanoseek.serve.grammar import GrammarVocab
from nanoseek.serve.job import Choice, Job
from nanoseek.serve.logits import JsonVocab
from nanoseek.serve.metrics import Metrics

log = logging.getLogger("nanoseek.serve")
ASCII_DIGITS = re.compile(r"[0-9]+")  # str.isdigit also takes "²", which int() refuses


class Server:
    """The loaded model, its engine thread, the admission state and the metrics of one app."""

    def __init__(
        self,
        config: ServerConfig,
        load: Callable[[], Checkpoint],
        engine_options: dict | None = None,
    ):
        self.config = config
        self._load = load
        self.engine_options = dict(engine_options or {})
        self.metrics = Metrics()
        self.status = "loading"
        self.load_error: str | None = None
        self.created = int(time.time())
        self.bridge: EngineBridge | None = None
        self.active = 0  # requests holding a slot
        self.queued = 0  # requests waiting for one
        self.sequences = 0  # prompts x n of the requests running or queued
        self.tokens = 0  # (prompt + max_tokens) x n of the same
        self._slots: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Load the checkpoint and start the engine thread (runs on a thread of its own)."""
        try:
            ckpt = self._load()
            self.tok = ckpt.tokenizer
            self.defaults = ckpt.defaults
            self.engine = Engine(ckpt.model, EngineTokenizer(ckpt.tokenizer), **self.engine_options)
            self.table = TokenTable(ckpt.tokenizer)
            longest = max(len(self.table.raw(i)) for i in range(self.table.size))
            # a prompt of more bytes than this has more tokens than the context holds (+1: a token
            # decoded alone may lose a leading space)
            self.max_prompt_bytes = self.engine.max_model_len * (longest + 1)
            self.json_vocab = JsonVocab(
                self.table, ckpt.tokenizer.eos_id, ckpt.tokenizer.special_ids.get("end_think")
            )
            self.grammar_vocab = GrammarVocab(self.table, ckpt.tokenizer)
            self.bridge = EngineBridge(self.engine)
            self.bridge.start()
            self.status = "ok"
            log.info("model loaded: context %d tokens", self.engine.max_model_len)
        except Exception as e:
            self.status = "failed"
            self.load_error = f"{type(e).__name__}: {e}"
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
            raise APIError(
                401,
                "a valid API key is needed: send 'Authorization: Bearer KEY' (or 'x-api-key: KEY')",
                "authentication_error",
                code="invalid_api_key",
            )

    def ready(self) -> None:
        code, body = self.health
        if code != 200:
            message = (
                "the model is still loading"
                if body["status"] == "loading"
                else f"the model is unavailable: {body.get('error')}"
            )
            raise APIError(
                503,
                message,
                "unavailable_error",
                code="model_not_ready",
                headers={"Retry-After": "5"},
            )

    async def body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and _declared_over(declared, limit):
            raise APIError(
                413, f"the request body is larger than {limit} bytes", code="body_too_large"
            )
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(
                    413, f"the request body is larger than {limit} bytes", code="body_too_large"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def check_bytes(self, size: int, param: str) -> None:
        """Refuse a prompt by its length in bytes, before tokenizing it: at more bytes than the
        context's tokens can hold (the longest token's bytes each), it cannot fit."""
        if size >= self.max_prompt_bytes:
            context = self.engine.max_model_len
            raise APIError(
                400,
                f"the prompt has {size} bytes; this model's context of {context} "
                f"tokens holds less than {self.max_prompt_bytes} bytes",
                param=param,
                code="context_length_exceeded",
            )

    def check_size(self, prompts: int, n: int) -> None:
        """Refuse a request of more sequences (prompts x n) than one request may have (429)."""
        limit = self.config.max_sequences_per_request
        if prompts * n > limit:
            raise APIError(
                429,
                f"the request asks for {prompts} prompts x n={n} = {prompts * n} "
                f"sequences; this server takes at most {limit} per request: send "
                "fewer prompts or a smaller n",
                "rate_limit_error",
                code="too_many_sequences",
                headers={"x-should-retry": "false"},
            )

    def engine_stats(self) -> dict:
        """The engine's figures after its latest step, as its thread published them: no lock."""
        return self.bridge.stats

    # ------------------------------------------------------------------ slots
    @asynccontextmanager
    async def slot(self, request: Request, job: Job):
        """Reserve the job's sequences and tokens among all admitted requests' (429 beyond
        max_queued_sequences or max_queued_tokens), then hold one of max_concurrent_requests slots.
        Without a free one, wait in a queue of at most max_queue (429 beyond that) until one frees,
        the client leaves, or the request's time is up (503)."""
        self.check_size(len(job.prompts), job.params.n)
        self._reserve(job)
        try:
            async with self._slot(request, job):
                yield
        finally:
            self.sequences -= job.sequences
            self.tokens -= job.tokens

    def _reserve(self, job: Job) -> None:
        c = self.config
        if job.tokens > c.max_queued_tokens:
            raise APIError(
                429,
                f"the request may need {job.tokens} tokens of sequences ((prompt "
                f"+ max_tokens) x n); this server holds at most "
                f"{c.max_queued_tokens}: send fewer prompts, a smaller n or "
                "max_tokens",
                "rate_limit_error",
                code="too_many_tokens",
                headers={"x-should-retry": "false"},
            )
        if (
            self.sequences + job.sequences > c.max_queued_sequences
            or self.tokens + job.tokens > c.max_queued_tokens
        ):
            raise APIError(
                429,
                f"the server is busy: the requests admitted hold {self.sequences} "
                f"sequences and {self.tokens} tokens (at most "
                f"{c.max_queued_sequences} and {c.max_queued_tokens}); this one "
                f"needs {job.sequences} and {job.tokens}: retry later",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.sequences += job.sequences
        self.tokens += job.tokens

    @asynccontextmanager
    async def _slot(self, request: Request, job: Job):
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_concurrent_requests)
        if self._slots.locked() and self.queued >= self.config.max_queue:
            raise APIError(
                429,
                f"the server is busy: {self.active} requests running and "
                f"{self.queued} queued; retry later",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.queued += 1
        acquire = asyncio.ensure_future(self._slots.acquire())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait(
                [acquire, gone],
                timeout=max(0.0, job.deadline - time.perf_counter()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            self.queued -= 1
            gone.cancel()
            acquire.cancel()  # a no-op once acquired; a cancelled grant goes back to the semaphore
        if not acquire.done() or acquire.cancelled():
            if gone.done() and not gone.cancelled():
                raise APIError(499, "the client closed the connection", code="client_closed")
            raise APIError(
                503,
                "no slot freed up within the request timeout; retry later",
                "unavailable_error",
                code="queue_timeout",
                headers={"Retry-After": "1"},
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()

    # ------------------------------------------------------------------ generation
    async def events(self, job: Job) -> AsyncIterator[tuple[Choice, StepEvent, str, str] | None]:
        """Run a job on the engine: yields (choice, event, new reasoning, new content) as tokens
        come, and None when nothing came for `keepalive` seconds. Whatever stops the iteration (the
        end, an error, a client gone, the deadline), engine requests still running are cancelled."""
        queue: asyncio.Queue = asyncio.Queue()
        for request in job.requests.values():
            self.bridge.submit(
                request.prompt, job.params, request.request_id, queue, job.id, request.images
            )
        try:
            while not job.done:
                left = job.deadline - time.perf_counter()
                if left <= 0:
                    timeout = self.config.request_timeout
                    raise APIError(
                        504,
                        f"the request took longer than {timeout:g} s",
                        "timeout_error",
                        code="request_timeout",
                    )
                item = await _next(queue, min(left, self.config.keepalive))
                if item is None:
                    yield None
                    continue
                if isinstance(item, EngineDead):
                    raise APIError(
                        503,
                        f"the engine failed: {item.reason}",
                        "unavailable_error",
                        code="engine_dead",
                    )
                if isinstance(item, Rejected):
                    raise APIError(400, item.reason)
                if item.token_ids and job.first_token is None:
                    job.first_token = time.perf_counter()
                choice = job.choice(item)
                yield choice, item, *choice.add(item)
        finally:
            self.cancel(job)
            if job.done:
                self._record(job)

    def cancel(self, job: Job) -> None:
        """Cancel every engine request of a job, finished or not (a finished one is a no-op): called
        whenever a job ends, so that no sequence outlives its request."""
        for request_id in job.requests:
            self.bridge.cancel(request_id)

    def _record(self, job: Job) -> None:
        end = time.perf_counter()
        generated = sum(len(c.token_ids) for c in job.choices)
        self.metrics.generation_done(
            prompt=sum(map(len, job.prompts)),
            cached=job.cached,
            generated=generated,
            ttft=None if job.first_token is None else job.first_token - job.start,
            duration=end - job.start,
            decode_time=None if job.first_token is None else end - job.first_token,
        )

    async def run(self, request: Request, job: Job) -> None:
        """Run a non-streaming job to its end in a slot."""
        async with self.slot(request, job):
            await self.until_done(request, job)

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
            self.cancel(job)  # even if this task was cancelled, or `work` ignored its cancellation
        if not work.cancelled() and work.done():
            work.result()  # re-raise its APIError
        if not job.done:
            raise APIError(499, "the client closed the connection", code="client_closed")

    async def stream(
        self,
        request: Request,
        job: Job,
        chunks: AsyncIterator[str],
        error_event: Callable[[APIError], str] | None = None,
        done: str = "data: [DONE]\n\n",
    ) -> Response:
        """Take a slot now (so that a full queue is a 429, not a broken stream), then stream SSE
        (error_event: how a mid-stream error is sent, OpenAI's way by default; done: the last
        event, if any)."""
        slot = self.slot(request, job)
        await slot.__aenter__()

        async def body():
            try:
                async for piece in chunks:
                    yield piece
            except APIError as e:
                self.metrics.count_error(e.type)
                yield error_event(e) if error_event else f"data: {json.dumps(e.body())}\n\n"
            if done:
                yield done

        async def close():
            await chunks.aclose()  # cancels the engine requests if the stream ended early
            await slot.__aexit__(None, None, None)

        return SSEResponse(body(), on_close=close)


class SSEResponse(StreamingResponse):
    """A text/event-stream whose clean-up runs however the response ends:
    finished, failed or disconnected."""

    def __init__(self, content, on_close):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


def _declared_over(content_length: str, limit: int) -> bool:
    """Whether a Content-Length header says the body is over `limit` bytes. A malformed one says
    nothing (the body is counted as it arrives anyway); a number with more digits than the limit is
    over it without converting (int() refuses more than 4,300 digits)."""
    if not ASCII_DIGITS.fullmatch(content_length):
        return False
    digits = content_length.lstrip("0")
    return len(digits) > len(str(limit)) or int(digits or "0") > limit


async def _next(queue: asyncio.Queue, timeout: float):
    """The next item of `queue`, or None after `timeout` seconds without one. Not asyncio.wait_for:
    on Python 3.11 it returns the item and swallows a cancellation that arrives just as queue.get()
    completes, and a job whose cancellation is lost runs on after its client has gone."""
    if not queue.empty():
        return queue.get_nowait()
    try:
        async with asyncio.timeout(timeout):
            return await queue.get()
    except TimeoutError:
        return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
