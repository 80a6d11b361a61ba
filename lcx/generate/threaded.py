"""The engine in a thread of its own, fed by any other thread: what a server runs.

One thread owns the `Engine` (its queue, slots and cache are plain Python state, not
locked); other threads hand it requests and cancellations through a queue, and get each
request's events back through the callback they gave. Between two engine steps the
thread takes everything handed to it, so a cancellation frees its slot before the next
step. With nothing to do it blocks on the queue instead of spinning.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable

from lcx.generate.engine import Engine, Event, Request


class QueueFull(Exception):
    """More requests are waiting for a slot than the thread was told to hold."""


@dataclasses.dataclass(frozen=True)
class Ended:
    """A request's last callback when it ends without a final token: `reason` is
    "cancelled" (the caller's `cancel`), "aborted" (`abort_all`) or "failed" (`error`
    holds the exception the engine raised)."""

    reason: str
    error: BaseException | None = None


class Ticket:
    """A submitted request: pass it to `cancel`."""

    def __init__(self, request: Request, on_event: Callable[[Event | Ended], None]):
        self.request, self.on_event = request, on_event
        self.engine_id: int | None = None  # set by the engine thread when it queues it
        self.ended = False  # its last callback was made (engine thread only)


class EngineThread:
    """Runs `engine` in a daemon thread; `submit` and `cancel` from any thread.

    Args:
      engine: the `Engine` (used by this thread only from now on).
      max_waiting: requests beyond the engine's slots that may wait; `submit` raises
        `QueueFull` past it.
    """

    def __init__(self, engine: Engine, *, max_waiting: int):
        self.engine, self.max_waiting = engine, max_waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0  # submitted and not yet ended
        self._tickets: dict[int, Ticket] = {}  # engine id -> ticket (engine thread only)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="lcx-engine", daemon=True)
        self._thread.start()

    # ---- any thread -------------------------------------------------------------------

    def submit(self, request: Request, on_event: Callable[[Event | Ended], None]) -> Ticket:
        """Queue `request`; `on_event` gets each of its events (called in the engine
        thread: keep it short) and then nothing more after a `done` event or an `Ended`.
        ValueError for a request the engine cannot serve, QueueFull when too many wait."""
        self.engine.check_request(request)
        with self._lock:
            if self._in_flight >= self.engine.slots + self.max_waiting:
                raise QueueFull(
                    f"{self._in_flight - self.engine.slots} requests are waiting for a slot "
                    f"(max_waiting={self.max_waiting})"
                )
            self._in_flight += 1
        ticket = Ticket(request, on_event)
        self._inbox.put(("submit", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """End `ticket`'s request before the next step (its `on_event` gets `Ended`)."""
        self._inbox.put(("cancel", ticket))

    def abort_all(self) -> None:
        """End every request in flight (each gets `Ended("aborted")`)."""
        self._inbox.put(("abort", None))

    def close(self, timeout: float | None = None) -> None:
        """Abort what is in flight and stop the thread."""
        self.abort_all()
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet ended."""
        return self._in_flight

    @property
    def running(self) -> int:
        """Requests holding a slot."""
        return min(self._in_flight, self.engine.slots)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return max(self._in_flight - self.engine.slots, 0)

    # ---- the engine thread ------------------------------------------------------------

    def _loop(self):
        while not self._stop:
            self._take_inbox(block=self.engine.idle)
            if self._stop or self.engine.idle:
                continue
            try:
                events = self.engine.step()
            except Exception as error:  # the engine's state is unknown: end everything
                self._end_all(Ended("failed", error))
                continue
            for event in events:
                ticket = self._tickets[event.request_id]
                if event.done:
                    self._forget(ticket)
                ticket.on_event(event)

    def _take_inbox(self, *, block: bool):
        """Apply every queued submit, cancel and abort; wait for one if `block`."""
        while True:
            try:
                kind, ticket = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "submit":
                ticket.engine_id = self.engine.submit(ticket.request)
                self._tickets[ticket.engine_id] = ticket
            elif kind == "cancel":
                if not ticket.ended:
                    self._end(ticket, Ended("cancelled"))
            elif kind == "abort":
                self._end_all(Ended("aborted"))
            else:
                self._stop = True

    def _end(self, ticket: Ticket, how: Ended):
        """Drop the request from the engine (if there) and tell its caller."""
        self.engine.cancel(ticket.engine_id)
        self._forget(ticket)
        ticket.on_event(how)

    def _end_all(self, how: Ended):
        for ticket in list(self._tickets.values()):
            self._end(ticket, how)

    def _forget(self, ticket: Ticket):
        """The request is over: no longer in flight."""
        ticket.ended = True
        self._tickets.pop(ticket.engine_id, None)
        self.engine.results.pop(ticket.engine_id, None)
        with self._lock:
            self._in_flight -= 1
