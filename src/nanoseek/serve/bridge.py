"""The engine on its own thread, and the async side that HTTP handlers use.

One thread owns the engine: it takes new requests and cancellations from an inbox between steps and
runs engine.step() while anything is unfinished. Handlers never call the engine, so a long step
never blocks the event loop and the event loop never waits on the engine's lock: after each step the
thread publishes the engine's stats, which /metrics reads as they are. Each request's StepEvents go
onto the asyncio.Queue its handler reads; a step's events travel together, in one
loop.call_soon_threadsafe (one wake-up per step, not per token per request).

If a step raises, the engine is marked dead: every waiting handler gets an EngineDead item, /health
turns 503, and new requests are refused; the process keeps answering.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections import defaultdict, deque
from dataclasses import dataclass

from nanoseek.engine import Engine, SamplingParams, StepEvent

log = logging.getLogger("nanoseek.serve")


@dataclass
class EngineDead:
    """Queued instead of events when the engine has failed."""

    reason: str


@dataclass
class Rejected:
    """Queued when the engine refuses a request that passed the server's own checks."""

    request_id: str
    reason: str


class EngineBridge:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.error: str | None = None  # why the engine died
        self._inbox: deque[tuple] = deque()
        self._wake = threading.Event()
        # request id -> (where its events go, completions running)
        self._sinks: dict[str, tuple[Sink, int]] = {}
        # events of this step, delivered together after it
        self._outbox: list[tuple[Sink, object]] = []
        self._closing = False
        self.stats: dict = engine.stats()  # the engine's figures after its latest step
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)

    # ------------------------------------------------------------------ the async side
    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)

    def submit(
        self,
        ids: list[int],
        params: SamplingParams,
        request_id: str,
        queue: asyncio.Queue,
        group: str | None = None,
        images=None,
    ) -> None:
        """Queue a request; its StepEvents (or EngineDead / Rejected) arrive on `queue`. Several
        requests may share one queue; requests of one group share one fair part of the batch. Call
        from the event loop."""
        sink = Sink(asyncio.get_running_loop(), queue)
        self._post(("add", ids, params, request_id, group, sink, images))

    def cancel(self, request_id: str) -> None:
        self._post(("cancel", request_id))

    def _post(self, op: tuple) -> None:
        self._inbox.append(op)
        self._wake.set()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self._closing:
            # before draining, so a post that lands after the drain still wakes us
            self._wake.clear()
            try:
                while self._inbox:
                    self._apply(self._inbox.popleft())
                if self.error is None and self.engine.has_unfinished():
                    self.engine.step()
                    self.stats = self.engine.stats()
                else:
                    self.stats = self.engine.stats()
                    self._flush()
                    self._wake.wait()
                    continue
            # the engine's state is unknown now: fail loudly, keep the server up
            except Exception as e:
                self._die(f"{type(e).__name__}: {e}", traceback.format_exc())
            self._flush()

    def _flush(self) -> None:
        by_loop = defaultdict(list)
        for sink, item in self._outbox:
            by_loop[sink.loop].append((sink.queue, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

    def _apply(self, op: tuple) -> None:
        if op[0] == "cancel":
            self._sinks.pop(op[1], None)
            if self.error is None:
                self.engine.cancel(op[1])
            return
        _, ids, params, rid, group, sink, images = op
        if self.error is not None:
            self._outbox.append((sink, EngineDead(self.error)))
            return
        self._sinks[rid] = (sink, params.n)
        try:
            self.engine.add_request(
                ids, params, request_id=rid, callback=self._on_event, group=group, images=images
            )
        except ValueError as e:
            self._sinks.pop(rid, None)
            self._outbox.append((sink, Rejected(rid, str(e))))

    def _on_event(self, ev: StepEvent) -> None:
        entry = self._sinks.get(ev.request_id)
        if entry is None:  # cancelled by its handler
            return
        sink, running = entry
        if ev.finished:
            running -= 1
            if running:
                self._sinks[ev.request_id] = (sink, running)
            else:
                del self._sinks[ev.request_id]
        self._outbox.append((sink, ev))

    def _die(self, reason: str, trace: str) -> None:
        log.error("the engine failed; refusing new requests:\n%s", trace)
        self.error = reason
        self._outbox += [(sink, EngineDead(reason)) for sink, _ in self._sinks.values()]
        self._sinks.clear()


@dataclass(frozen=True)
class Sink:
    """Where a request's events go: a queue, and the event loop that owns it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
