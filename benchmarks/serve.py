"""The HTTP server against the in-process engine on one request trace, side by side.

    python benchmarks/serve.py            # the BENCHMARKS.md run
    python benchmarks/serve.py --smoke    # seconds

The trace is benchmarks/generate.py's: Poisson arrivals (100/s), prompts cut from the
embedded corpus's documents (long-tailed, up to 512 tokens), long-tailed output lengths,
lm_tiny's shape with random weights, greedy, stopping at `max_tokens` or EOS.
- `engine`: the requests submitted to an `Engine` in this process as they arrive.
- `server`: `mode=serve`'s app (`lcx.serve`, same engine sizes) in a process of its own,
  the requests sent as they arrive by an asyncio client (h11) in this one, each a
  streamed `/v1/completions` with token-id prompts; a token's time is its SSE chunk's
  arrival at the client.
The two sides alternate, each running the trace once to compile, then `--repeats` times;
the table has the median of each figure and the spread of throughput: requests/s,
output tokens/s, time to first token (from the request's arrival) and between tokens
(p50, p99), errors (must be 0); then the server's throughput overhead against the
engine, the median over the runs side by side. The client runs on the same 2 CPU cores
as the server, so the overhead includes what a client costs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import h11  # uvicorn's HTTP/1.1 state machine (the benchmark's client)
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.generate import build_model, corpus_documents, make_trace  # noqa: E402
from lcx.data import ByteTokenizer  # noqa: E402
from lcx.generate import Engine  # noqa: E402


def trace_of(args):
    """benchmarks/generate.py's trace at these settings, every request stopping at EOS."""
    model, config = build_model(args.smoke)
    documents = corpus_documents(config)
    rng = np.random.default_rng(args.seed + 2)  # generate.py's trace seed
    trace = make_trace(documents, rng, args.requests, args.rate, args.prompt_cap,
                       args.output_mean, 4 * args.output_mean)  # fmt: skip
    stop = (ByteTokenizer.eos_id,)
    trace = [(a, dataclasses.replace(r, stop_ids=stop)) for a, r in trace]
    longest = max(len(r.prompt) + r.max_new_tokens for _, r in trace)
    return model, trace, -(-longest // 8) * 8


def stats(arrivals, token_times, start, finish, errors) -> dict:
    """The figures of one run from each request's arrival and token timestamps."""
    ttft = [times[0] - arrivals[i] for i, times in token_times.items() if times]
    gaps = [b - a for times in token_times.values() for a, b in zip(times, times[1:], strict=False)]
    tokens, total = sum(map(len, token_times.values())), finish - start
    ms = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if xs else 0.0  # noqa: E731
    return {
        "seconds": total,
        "requests_per_sec": len(token_times) / total,
        "tokens_per_sec": tokens / total,
        "tokens": tokens,
        "ttft_p50_ms": ms(ttft, 50),
        "ttft_p99_ms": ms(ttft, 99),
        "itl_p50_ms": ms(gaps, 50),
        "itl_p99_ms": ms(gaps, 99),
        "errors": errors,
    }


# ---- the engine in this process ---------------------------------------------------------


def run_engine(model, trace, *, slots, max_length, token_budget) -> dict:
    """The engine fed as requests arrive."""
    engine = Engine(model, slots=slots, max_length=max_length, token_budget=token_budget)
    pending, arrivals, token_times, ids = list(enumerate(trace)), {}, {}, {}
    start = time.perf_counter()
    while pending or not engine.idle:
        now = time.perf_counter()
        while pending and pending[0][1][0] <= now - start:
            index, (arrival, request) = pending.pop(0)
            ids[engine.submit(request)] = index
            arrivals[index], token_times[index] = start + arrival, []
        if engine.idle:
            time.sleep(max(0.0, pending[0][1][0] - (now - start)))
            continue
        for event in engine.step():
            token_times[ids[event.request_id]].append(time.perf_counter())
    return stats(arrivals, token_times, start, time.perf_counter(), 0)


# ---- the server in another process, the client in this one ------------------------------


def serve_forever(args):
    """The server process: the same model behind the app until SIGTERM."""
    from lcx.serve import Service, make_app
    from lcx.serve.server import run_server

    model, _, max_length = trace_of(args)
    service = Service(model, ByteTokenizer(), model_name="bench", max_context=max_length,
                      slots=args.slots, token_budget=args.token_budget,
                      max_waiting=args.requests)  # fmt: skip
    run_server(make_app(service), service, host="127.0.0.1", port=args.port, drain_seconds=5)


CHUNK_START = b"data: {"  # each SSE chunk of a completion (the last is "data: [DONE]")


async def run_client(url, trace) -> dict:
    """Each request sent at its arrival time, streamed; token times as chunks arrive."""
    host, port = url.removeprefix("http://").split(":")
    arrivals, token_times, errors = {}, {}, 0

    async def one(index, arrival, request, start):
        nonlocal errors
        await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
        arrivals[index], times = time.perf_counter(), []
        token_times[index] = times
        body = {"model": "bench", "prompt": list(request.prompt), "temperature": 0,
                "max_tokens": request.max_new_tokens, "stream": True}  # fmt: skip
        try:
            async for found in _sse_chunks(host, int(port), "/v1/completions", body):
                times.extend([time.perf_counter()] * found)
        except (OSError, h11.ProtocolError, RuntimeError):
            errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(i, a, r, start) for i, (a, r) in enumerate(trace)))
    return stats(arrivals, token_times, start, time.perf_counter(), errors)


async def _sse_chunks(host: str, port: int, path: str, body: dict):
    """POST `body` as JSON; yield how many SSE chunks begin in each piece of the response
    as it arrives. The client shares the server's two cores, so it is h11 (uvicorn's own
    HTTP/1.1 state machine) on asyncio's sockets, not httpx: httpx spent about 280 us of
    CPU per streamed chunk here, more than the server's whole HTTP layer (about 165 us),
    and the comparison would have measured the client."""
    reader, writer = await asyncio.open_connection(host, port)
    connection, payload = h11.Connection(h11.CLIENT), json.dumps(body).encode()
    headers = [("Host", f"{host}:{port}"), ("Content-Type", "application/json"),
               ("Content-Length", str(len(payload)))]  # fmt: skip
    writer.write(connection.send(h11.Request(method="POST", target=path, headers=headers)))
    writer.write(connection.send(h11.Data(data=payload)) + connection.send(h11.EndOfMessage()))
    tail = b""  # a chunk's start may straddle two pieces
    try:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(1 << 16))
            elif isinstance(event, h11.Response) and event.status_code != 200:
                raise RuntimeError(f"status {event.status_code}")
            elif isinstance(event, h11.Data):
                data = tail + bytes(event.data)
                yield data.count(CHUNK_START)
                tail = data[-len(CHUNK_START) + 1 :]
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return
    finally:
        writer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv) -> tuple[subprocess.Popen, str]:
    """This script as the server process; (process, url) once it answers /health."""
    import httpx

    port = _free_port()
    command = [sys.executable, os.path.abspath(__file__), *argv, "--serve", f"--port={port}"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server process exited: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("the server process did not come up")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)


# ---- driver -----------------------------------------------------------------------------


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=100.0, help="arrivals per second")
    parser.add_argument("--prompt_cap", type=int, default=512)
    parser.add_argument("--output_mean", type=float, default=32)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--token_budget", type=int, default=128)
    parser.add_argument("--json", default="")
    parser.add_argument("--serve", action="store_true", help="(internal) be the server")
    parser.add_argument("--port", type=int, default=0, help="(internal) the server's port")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.prompt_cap, args.output_mean = 10, 32, 4
        args.slots, args.token_budget, args.rate = 3, 16, 200.0
        args.repeats = min(args.repeats, 2)
    if args.serve:
        serve_forever(args)
        return {}
    model, trace, max_length = trace_of(args)
    sizes = dict(slots=args.slots, max_length=max_length, token_budget=args.token_budget)
    runs = {"engine": [], "server": []}
    process, url = start_server(argv)
    try:  # the sides alternate, so a drift in the machine's speed hits both alike
        for i in range(args.repeats + 1):  # the first run of each side compiles
            engine = run_engine(model, trace, **sizes)
            server = asyncio.run(run_client(url, trace))
            if i:
                runs["engine"].append(engine)
                runs["server"].append(server)
    finally:
        process.terminate()
        process.wait(60)
    results = {"settings": vars(args), "runs": runs}
    for side, rows in runs.items():
        results[side] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        tps = [r["tokens_per_sec"] for r in rows]
        results[side]["tokens_per_sec_spread"] = (min(tps), max(tps))
        results[side]["errors"] = sum(r["errors"] for r in rows)
    pairs = zip(runs["engine"], runs["server"], strict=True)
    ratios = [server["tokens_per_sec"] / engine["tokens_per_sec"] for engine, server in pairs]
    results["overhead"] = 1 - statistics.median(ratios)  # run by run, side by side
    results["overhead_spread"] = (1 - max(ratios), 1 - min(ratios))
    report(results, argv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def report(results, argv):
    """The side-by-side table, with the command and the machine."""
    print(f"\n`python benchmarks/serve.py {' '.join(argv)}` on {os.cpu_count()} CPU cores\n")
    print("| side | requests/s | output tokens/s (min-max) | TTFT p50 / p99 ms | "
          "inter-token p50 / p99 ms | errors |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for side in ("engine", "server"):
        r = results[side]
        low, high = r["tokens_per_sec_spread"]
        print(f"| {side} | {r['requests_per_sec']:.1f} | {r['tokens_per_sec']:.0f} "
              f"({low:.0f}-{high:.0f}) | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
              f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['errors']} |")  # fmt: skip
    low, high = (100 * x for x in results["overhead_spread"])
    print(
        f"server throughput overhead against the engine, run by run: "
        f"{100 * results['overhead']:.1f}% (median; {low:.1f} to {high:.1f})"
    )


if __name__ == "__main__":
    main()
