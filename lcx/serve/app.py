"""The OpenAI-compatible HTTP API on a `Service`: FastAPI routes, SSE streams, errors.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
`GET /health`, `GET /metrics` (Prometheus text), and vLLM's `/tokenize`, `/detokenize`
and `/tokenizer_info`, which let lm-evaluation-harness's `local-completions` use the
server's own tokenizer. Streams are Server-Sent Events framed by FastAPI's
`format_sse_event` and ended by `data: [DONE]`, as OpenAI's are. Every error is OpenAI's
error JSON; a failure inside one request is a 500 naming its id, and the server goes on.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from lcx.serve.metrics import Metrics
from lcx.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from lcx.serve.service import Generation, Piece, Service, TokenLogprob


def make_app(service: Service, *, api_key: str = "") -> FastAPI:
    """The FastAPI app serving `service`; with `api_key`, /v1 and the tokenizer routes
    want `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="lcx", docs_url=None, redoc_url=None)
    metrics = Metrics(service.engine_thread)
    service.metrics = metrics
    app.state.service, app.state.metrics = service, metrics

    async def authorized(request: Request):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(
                401,
                "Incorrect API key provided",
                kind="authentication_error",
                code="invalid_api_key",
            )

    def check_model(name: str):
        if name != service.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server has `{service.model_name}`",
                param="model",
                code="model_not_found",
            )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        _count(metrics, request, error.status)
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        _count(metrics, request, 400)
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return JSONResponse(
            error_body(f"{where}: {first['msg']}", "invalid_request_error", where), status_code=400
        )

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _failed(request: Request, error: Exception):
        _count(metrics, request, 500)
        request_id = getattr(request.state, "request_id", "-")
        return JSONResponse(
            error_body(
                f"request {request_id} failed: {type(error).__name__}: {error}", "server_error"
            ),
            status_code=500,
        )

    @app.get("/health")
    async def health():
        return {"status": "draining" if service.draining else "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        card = {
            "id": service.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "lcx",
            "max_model_len": service.max_context,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        request.state.request_id = request_id = f"cmpl-{uuid.uuid4().hex}"
        check_model(body.model)
        prompts = service.prompt_tokens(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise APIError(
                400, "max_tokens=0 needs echo=true (prompt log-probabilities)", param="max_tokens"
            )
        for prompt in prompts:
            service.check_fits(prompt, max_tokens, "prompt")
        texts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        choices = []  # (index, prompt, prompt text)
        for i, prompt in enumerate(prompts):
            text = texts[i] if isinstance(texts[i], str) else _decode(service, prompt)
            choices += [(i * body.n + j, prompt, text) for j in range(body.n)]
        echoed = {}
        if body.echo:  # each prompt scored once, all in one packed call; n choices share it
            scored = await service.score_prompts(prompts, body.logprobs or 0)
            echoed = {index: scored[index // body.n] for index, _, _ in choices}
        usage = _usage(sum(len(p) for p in prompts), 0)
        metrics.prompt_tokens.inc(usage["prompt_tokens"])
        head = {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": service.model_name,
        }
        pieces = {}
        if max_tokens > 0:
            pieces = {
                index: service.stream(
                    Generation(
                        prompt, max_tokens, service.sampling(body, index), body.stops, body.logprobs
                    )
                )
                for index, prompt, _ in choices
            }

        def choice(index, text, tokens, finish_reason):
            logprobs = None if body.logprobs is None else _completion_logprobs(tokens)
            return {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }

        echo_text = {i: t if body.echo else "" for i, _, t in choices}
        if not body.stream:
            done = await _gather(pieces)
            out = []
            for index, _, _ in choices:
                text, tokens, reason = _joined(done.get(index, []), "length")
                _add_usage(usage, done.get(index, []), first_choice=index % body.n == 0)
                out.append(
                    choice(index, echo_text[index] + text, echoed.get(index, []) + tokens, reason)
                )
            _count(metrics, request, 200)
            return {**head, "choices": out, "usage": _total(usage)}

        first = await _first_pieces(pieces)

        async def events():
            for index, _, _ in choices:
                if body.echo:
                    yield {
                        **head,
                        "choices": [
                            choice(
                                index,
                                echo_text[index],
                                echoed[index],
                                None if max_tokens else "length",
                            )
                        ],
                    }
            async for index, piece in _merged(first, pieces):
                _add_usage(usage, [piece], first_choice=index % body.n == 0)
                yield {
                    **head,
                    "choices": [choice(index, piece.text, piece.tokens, piece.finish_reason)],
                }
            if body.stream_options and body.stream_options.include_usage:
                yield {**head, "choices": [], "usage": _total(usage)}

        _count(metrics, request, 200)
        return _sse(events())

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        request.state.request_id = request_id = f"chatcmpl-{uuid.uuid4().hex}"
        check_model(body.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        prompt = service.chat_tokens(messages)
        # Without a limit: what the context leaves, at least one token (else the 400 below).
        max_tokens = body.token_limit or max(service.max_context - len(prompt), 1)
        service.check_fits(prompt, max_tokens, "messages")
        metrics.prompt_tokens.inc(len(prompt))
        top = (body.top_logprobs or 0) if body.logprobs else None
        pieces = {
            index: service.stream(
                Generation(prompt, max_tokens, service.sampling(body, index), body.stops, top)
            )
            for index in range(body.n)
        }
        head = {"id": request_id, "created": int(time.time()), "model": service.model_name}
        usage = _usage(len(prompt), 0)

        def logprobs(tokens):
            return {"content": [_chat_logprob(t) for t in tokens]} if body.logprobs else None

        if not body.stream:
            done = await _gather(pieces)
            out = []
            for index in range(body.n):
                text, tokens, reason = _joined(done[index], "length")
                _add_usage(usage, done[index], first_choice=index == 0)
                message = {"role": "assistant", "content": text}
                out.append(
                    {
                        "index": index,
                        "message": message,
                        "logprobs": logprobs(tokens),
                        "finish_reason": reason,
                    }
                )
            _count(metrics, request, 200)
            return {**head, "object": "chat.completion", "choices": out, "usage": _total(usage)}

        first = await _first_pieces(pieces)
        head = {**head, "object": "chat.completion.chunk"}

        async def events():
            for index in range(body.n):
                delta = {"role": "assistant", "content": ""}
                yield {
                    **head,
                    "choices": [
                        {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                    ],
                }
            async for index, piece in _merged(first, pieces):
                _add_usage(usage, [piece], first_choice=index == 0)
                delta = {"content": piece.text} if piece.text else {}
                yield {
                    **head,
                    "choices": [
                        {
                            "index": index,
                            "delta": delta,
                            "logprobs": logprobs(piece.tokens),
                            "finish_reason": piece.finish_reason,
                        }
                    ],
                }
            if body.stream_options and body.stream_options.include_usage:
                yield {**head, "choices": [], "usage": _total(usage)}

        _count(metrics, request, 200)
        return _sse(events())

    # vLLM's tokenizer routes, which lm-evaluation-harness's `tokenizer_backend="remote"` reads.
    @app.get("/tokenizer_info", dependencies=[Depends(authorized)])
    async def tokenizer_info():
        tok = service.tokenizer
        name = lambda i: None if i is None else tok.token_name(i)  # noqa: E731
        return {
            "eos_token": name(tok.eos_id),
            "bos_token": name(tok.bos_id),
            "pad_token": name(tok.pad_id),
            "model_max_length": service.max_context,
        }

    @app.post("/tokenize", dependencies=[Depends(authorized)])
    async def tokenize(body: dict):
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError(400, "prompt: a string is required", param="prompt")
        ids = service.tokenize(prompt, add_special_tokens=body.get("add_special_tokens", True))
        return {"tokens": ids, "count": len(ids), "max_model_len": service.max_context}

    @app.post("/detokenize", dependencies=[Depends(authorized)])
    async def detokenize(body: dict):
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise APIError(400, "tokens: a list of token ids is required", param="tokens")
        return {"prompt": _decode(service, tokens)}

    return app


# ---- helpers ----------------------------------------------------------------------------


def _count(metrics, request, status):
    metrics.requests.labels(request.url.path, str(status)).inc()


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _add_usage(usage: dict, pieces, *, first_choice: bool):
    """Count pieces' tokens in `usage`; a prompt's cached tokens once, from its first choice
    (its `n` choices share the prompt, as `prompt_tokens` counts it once)."""
    usage["completion_tokens"] += _generated(pieces)
    if first_choice:
        usage["prompt_tokens_details"]["cached_tokens"] += sum(p.cached_tokens for p in pieces)


def _total(usage: dict) -> dict:
    """`usage` with its total brought up to date."""
    details = usage["prompt_tokens_details"]
    return _usage(usage["prompt_tokens"], usage["completion_tokens"], details["cached_tokens"])


def _decode(service, ids) -> str:
    return service.tokenizer.decode(ids).decode("utf-8", errors="replace")


def _generated(pieces: list[Piece]) -> int:
    return sum(p.generated for p in pieces)


def _joined(pieces: list[Piece], default_reason):
    text = "".join(p.text for p in pieces)
    tokens = [t for p in pieces for t in p.tokens]
    reasons = [p.finish_reason for p in pieces if p.finish_reason]
    return text, tokens, reasons[-1] if reasons else default_reason


async def _all_or_none(streams, work) -> list:
    """`work(stream)` for every stream concurrently; if one fails (a 429 for the third
    choice), the others are stopped and their engine requests cancelled before it raises."""
    tasks = [asyncio.create_task(work(s)) for s in streams.values()]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams.values():
            await stream.aclose()
        raise


async def _gather(streams) -> dict[int, list[Piece]]:
    """Every piece of every stream, run concurrently."""

    async def collect(stream):
        return [piece async for piece in stream]

    return dict(zip(streams, await _all_or_none(streams, collect), strict=True))


async def _first_pieces(streams) -> dict[int, Piece | None]:
    """Each stream's first piece, so that a refusal (429, 400) is an HTTP error before the
    SSE response starts."""
    firsts = await _all_or_none(streams, lambda s: anext(s, None))
    return dict(zip(streams, firsts, strict=True))


async def _merged(first, streams):
    """(index, piece) from all streams as they come, each stream's first piece first."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, stream):
        try:
            async for piece in stream:
                await queue.put((index, piece))
        finally:
            await queue.put((index, None))

    for index, piece in first.items():
        if piece is not None:
            yield index, piece
    live = [i for i, p in first.items() if p is not None and p.finish_reason is None]
    if len(live) == 1:  # one choice (n=1, one prompt): its pieces as they are, no queue
        (index,) = live
        try:
            async for piece in streams[index]:
                yield index, piece
        finally:
            await streams[index].aclose()
        return
    tasks = [asyncio.create_task(pump(i, streams[i])) for i in live]
    try:
        remaining = len(tasks)
        while remaining:
            index, piece = await queue.get()
            if piece is None:
                remaining -= 1
            else:
                yield index, piece
    finally:
        for task in tasks:
            task.cancel()
        for i in live:
            await streams[i].aclose()


def _sse(chunks) -> StreamingResponse:
    async def body():
        async for chunk in chunks:
            yield format_sse_event(data_str=json.dumps(chunk))
        yield format_sse_event(data_str="[DONE]")

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _completion_logprobs(tokens: list[TokenLogprob]) -> dict:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [None if t.logprob is None else dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def _chat_logprob(t: TokenLogprob) -> dict:
    def entry(text, logprob):
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**entry(t.text, t.logprob), "top_logprobs": [entry(s, p) for s, p in t.top]}
