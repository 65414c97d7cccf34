"""The engine on its own thread, and the async side that HTTP handlers use.

One thread owns the engine: it takes new requests and cancellations from an inbox between steps and runs
engine.step() while anything is unfinished. Handlers never call the engine, so a long step never blocks the event
loop and the event loop never waits on the engine's lock. Each request's StepEvents travel back through
loop.call_soon_threadsafe onto the asyncio.Queue its handler reads.

If a step raises, the engine is marked dead: every waiting handler gets an EngineDead item, /health turns 503,
and new requests are refused; the process keeps answering.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections import deque
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
        self._sinks: dict[str, tuple[callable, int]] = {}  # request id -> (deliver, completions still running)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)

    # ------------------------------------------------------------------ the async side
    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)

    def submit(self, ids: list[int], params: SamplingParams, request_id: str, queue: asyncio.Queue) -> None:
        """Queue a request; its StepEvents (or EngineDead / Rejected) arrive on `queue`. Several requests may
        share one queue. Call from the event loop."""
        loop = asyncio.get_running_loop()

        def deliver(item) -> None:  # runs on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

        self._post(("add", ids, params, request_id, deliver))

    def cancel(self, request_id: str) -> None:
        self._post(("cancel", request_id))

    def _post(self, op: tuple) -> None:
        self._inbox.append(op)
        self._wake.set()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self._closing:
            self._wake.clear()  # before draining, so a post that lands after the drain still wakes us
            while self._inbox:
                self._apply(self._inbox.popleft())
            if self.error is not None or not self.engine.has_unfinished():
                self._wake.wait()
                continue
            try:
                self.engine.step()
            except Exception as e:  # the engine's state is unknown now: fail loudly, keep the server up
                self._die(f"{type(e).__name__}: {e}", traceback.format_exc())

    def _apply(self, op: tuple) -> None:
        if op[0] == "cancel":
            self._sinks.pop(op[1], None)
            if self.error is None:
                self.engine.cancel(op[1])
            return
        _, ids, params, rid, deliver = op
        if self.error is not None:
            deliver(EngineDead(self.error))
            return
        self._sinks[rid] = (deliver, params.n)
        try:
            self.engine.add_request(ids, params, request_id=rid, callback=self._on_event)
        except ValueError as e:
            self._sinks.pop(rid, None)
            deliver(Rejected(rid, str(e)))

    def _on_event(self, ev: StepEvent) -> None:
        entry = self._sinks.get(ev.request_id)
        if entry is None:  # cancelled by its handler
            return
        deliver, running = entry
        if ev.finished:
            running -= 1
            if running:
                self._sinks[ev.request_id] = (deliver, running)
            else:
                del self._sinks[ev.request_id]
        deliver(ev)

    def _die(self, reason: str, trace: str) -> None:
        log.error("the engine failed; refusing new requests:\n%s", trace)
        self.error = reason
        for deliver, _ in self._sinks.values():
            deliver(EngineDead(reason))
        self._sinks.clear()
