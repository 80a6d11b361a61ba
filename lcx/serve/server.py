"""Running the app on uvicorn, with a graceful drain on SIGTERM.

On SIGTERM (or Ctrl-C) the server stops listening at once, answers any new request on
an open connection with 503, lets the requests in flight finish for up to
`drain_seconds`, then ends the rest, each stream with a final chunk whose
finish_reason is "abort" and its `data: [DONE]`, and returns normally, so the process
exits 0. A second Ctrl-C quits without waiting. uvicorn's own handler would re-raise
the signal after shutting down (exit status 143); this one does not.
"""

from __future__ import annotations

import asyncio
import signal
import time

import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with the drain described above."""

    def __init__(self, config: uvicorn.Config, service, drain_seconds: float):
        super().__init__(config)
        self.service, self.drain_seconds = service, drain_seconds
        self.drained: dict | None = None  # what the drain did, once it ran

    def handle_exit(self, sig, frame):
        if self.service.draining:
            if sig == signal.SIGINT:
                self.force_exit = self.should_exit = True
            return
        self.service.draining = True
        asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self):
        for server in getattr(self, "servers", []):
            server.close()  # stop accepting connections
        engine = self.service.engine_thread
        started = time.monotonic()
        in_flight = engine.in_flight
        while engine.in_flight and time.monotonic() - started < self.drain_seconds:
            await asyncio.sleep(0.02)
        aborted = engine.in_flight
        if aborted:
            engine.abort_all()
            while engine.in_flight:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # let the aborted streams send their last chunks
        self.drained = {
            "in_flight": in_flight,
            "aborted": aborted,
            "seconds": round(time.monotonic() - started, 3),
        }
        self.should_exit = True


def run_server(app, service, *, host: str, port: int, drain_seconds: float) -> dict:
    """Serve `app` until SIGTERM / Ctrl-C; what the drain did."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", timeout_graceful_shutdown=5
    )
    server = DrainingServer(config, service, drain_seconds)
    try:
        server.run()
    finally:
        service.close()
    return server.drained or {}


class BackgroundServer:
    """`app` on uvicorn in a daemon thread (a notebook's, a test's): `url` once listening
    (port 0: a free port), `stop()` to end it. No signal handling: the caller stops it."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30):
        import threading

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="lcx-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)
        bound = self.server.servers[0].sockets[0].getsockname()
        self.url = f"http://{bound[0]}:{bound[1]}"

    def stop(self, timeout: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
