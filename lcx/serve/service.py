"""What the HTTP layer asks of lcx: prompts to token ids, generations streamed as text
pieces (stop strings, end of turn, log-probabilities), prompt scoring for `echo`.

One `Service` holds the model's engine in its own thread (`lcx.generate.threaded`) and
a packed scorer; every request becomes engine requests whose events come back to the
request's asyncio task. The engine thread hands a step's events over in one
`call_soon_threadsafe` however many requests they belong to (`_Mailbox`), rather than
waking the event loop (one per Service) once per token of every request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import AsyncIterator

from lcx.data.sft import turn_stop_ids
from lcx.data.tokenizer import prompt_ids, text_ids
from lcx.generate.api import request_seed
from lcx.generate.engine import TOP_LOGPROBS, Engine, Event, Request
from lcx.generate.sampling import SamplingParams
from lcx.generate.scoring import PackedScorer
from lcx.generate.text import TextStream
from lcx.generate.threaded import Ended, EngineThread, QueueFull
from lcx.serve.protocol import APIError


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token of an answer as the logprobs fields show it."""

    text: str
    logprob: float | None  # None for a prompt's first token
    top: tuple[tuple[str, float], ...]  # (text, logprob), best first


@dataclasses.dataclass
class Piece:
    """A streamed piece of one choice: new text, the tokens that arrived with it, and the
    finish reason on the last piece ("stop", "length", or "abort" when the server ended
    it)."""

    text: str
    tokens: list[TokenLogprob]
    finish_reason: str | None = None
    generated: int = 0  # engine tokens that arrived with it
    cached_tokens: int = 0  # on the first piece: prompt tokens the prefix cache held


@dataclasses.dataclass(frozen=True)
class Generation:
    """One choice to generate."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stops: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per token; None: no logprobs


class Service:
    """The model behind the endpoints.

    Args:
      model, tokenizer: an lcx Transformer and the tokenizer it was trained with.
      model_name: the id `/v1/models` lists and requests must name.
      max_context: prompt tokens + max_tokens a request may ask for.
      slots, token_budget: the engine's sizes (`lcx.generate.Engine`).
      max_waiting: requests that may wait for a slot before new ones get 429.
      engine_options: more Engine keyword arguments (a paged cache, the prefix cache).
      on_token: called (in the request's task) as `on_token(request_key, now)` for every
        token, for metrics; may be None.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_name: str,
        max_context: int,
        slots: int,
        token_budget: int,
        max_waiting: int,
        engine_options: dict | None = None,
    ):
        self.tokenizer, self.model_name, self.max_context = tokenizer, model_name, max_context
        engine = Engine(model, slots=slots, max_length=max_context, token_budget=token_budget,
                        **(engine_options or {}))  # fmt: skip
        self.engine_thread = EngineThread(engine, max_waiting=max_waiting)
        self._model = model
        self._scorer = None
        self.stop_ids = turn_stop_ids(tokenizer)
        self.draining = False
        self.metrics = None  # lcx.serve.metrics.Metrics, set by the app
        self._mailbox = _Mailbox()

    def close(self):
        self.engine_thread.close(timeout=10)

    # ---- prompts ----------------------------------------------------------------------

    def prompt_tokens(self, prompt) -> list[list[int]]:
        """A completions `prompt` (string, strings, ids, lists of ids) as token-id lists:
        text as [BOS] + its tokens, ids as given."""
        if isinstance(prompt, str):
            return [prompt_ids(self.tokenizer, prompt)]
        if prompt and isinstance(prompt[0], int):
            return [self._checked_ids(prompt, "prompt")]
        if prompt and isinstance(prompt[0], str):
            return [prompt_ids(self.tokenizer, p) for p in prompt]
        return [self._checked_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]

    def tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """`/tokenize`: the text's tokens, after BOS with `add_special_tokens`. A text that is
        exactly a special token's name ("</s>") is that token, as Hugging Face tokenizers
        read it (lm-evaluation-harness finds the EOS id so); anywhere else such a name is
        plain text, as in every prompt."""
        tok = self.tokenizer
        specials = {
            tok.token_name(i): i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None
        }
        ids = [specials[text]] if text in specials else text_ids(tok, text)
        return ([tok.bos_id] if add_special_tokens and tok.bos_id is not None else []) + ids

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """The conversation through the tokenizer's chat template, ready for the answer."""
        try:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except Exception as e:  # a template's raise_exception, a missing template
            raise APIError(
                400, f"messages: the chat template refused them: {e}", param="messages"
            ) from None

    def _checked_ids(self, ids, name) -> list[int]:
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"{name} holds token ids outside [0, {vocab})", param="prompt")
        return list(ids)

    def check_fits(self, prompt: list[int], max_tokens: int, param: str) -> None:
        """400 when the prompt and max_tokens exceed max_context: never truncated."""
        if len(prompt) + max_tokens > self.max_context:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_context} tokens; the "
                f"prompt has {len(prompt)} tokens and max_tokens is {max_tokens} "
                f"({len(prompt) + max_tokens} in all). Shorten the prompt or lower max_tokens.",
                param=param,
                code="context_length_exceeded",
            )

    def sampling(self, body, index: int) -> SamplingParams:
        """Choice `index`'s sampling settings from a request body."""
        seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(4), "little")
        top_k = body.top_k if body.top_k and body.top_k > 0 else None
        top_p = body.top_p if body.top_p < 1 else None
        return SamplingParams(body.temperature, top_k, top_p, request_seed(seed, index))

    # ---- generation -------------------------------------------------------------------

    async def stream(self, generation: Generation) -> AsyncIterator[Piece]:
        """The choice's text as it is generated; cancels its engine request when the
        consumer stops early (a client that went away)."""
        if self.draining:
            raise APIError(503, "the server is shutting down", kind="server_error")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        top = generation.logprobs or 0
        request = Request(
            generation.prompt,
            generation.max_tokens,
            generation.sampling,
            self.stop_ids,
            min(top, TOP_LOGPROBS),
        )
        try:
            ticket = self.engine_thread.submit(
                request, lambda e: self._mailbox.post(loop, events, e)
            )
        except QueueFull as e:
            raise APIError(
                429,
                f"too many requests: {e}; retry shortly",
                kind="rate_limit_error",
                headers={"Retry-After": "1"},
            ) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        text = TextStream(self.tokenizer, generation.stops)
        finished, last = False, time.perf_counter()
        try:
            while True:
                event = await events.get()
                if isinstance(event, Ended):
                    finished = True
                    if event.reason == "failed":
                        raise event.error
                    yield Piece(text.flush(), [], "abort")
                    return
                last = self._observe(last, first=not text.tokens)
                new_text, stopped = text.add(event.token)
                piece = Piece(new_text, [], "stop" if stopped else None, generated=1,
                              cached_tokens=event.cached_tokens)  # fmt: skip
                if generation.logprobs is not None:
                    piece.tokens = [self._token_logprob(event)]
                if not stopped and event.done:
                    piece.text += text.flush()
                    piece.finish_reason = "stop" if event.token in self.stop_ids else "length"
                yield piece
                if piece.finish_reason is not None:
                    finished = event.done  # else a stop string ended it: cancel it below
                    return
        finally:
            if not finished:
                self.engine_thread.cancel(ticket)

    def _observe(self, last: float, first: bool) -> float:
        """Count a token and time it (from the request's arrival, or from its last token)."""
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
            histogram = self.metrics.time_to_first_token if first else self.metrics.inter_token
            histogram.observe(now - last)
        return now

    def _token_logprob(self, event: Event) -> TokenLogprob:
        top = tuple((self.token_text(i), p) for i, p in event.top_logprobs)
        return TokenLogprob(self.token_text(event.token), event.logprob, top)

    def token_text(self, token: int) -> str:
        """A token as the logprobs fields name it: its text, its name for a special token,
        or `bytes:\\xNN...` when its bytes are not whole UTF-8 characters (OpenAI's
        convention)."""
        data = self.tokenizer.decode([token])
        if not data:  # a special token: its name in the vocabulary
            return self.tokenizer.token_name(token)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    # ---- scoring ----------------------------------------------------------------------

    async def score_prompts(self, prompts: list[list[int]], top: int) -> list[list[TokenLogprob]]:
        """Each prompt token's log-probability given the tokens before it (the first
        token has none), with `top` alternatives each: `echo` with `logprobs`. All the
        prompts of a request are scored together, many to a packed row."""
        if self._scorer is None:
            self._scorer = PackedScorer(
                self._model, self.max_context, self.tokenizer.pad_id, top=TOP_LOGPROBS
            )
        # The scorer's forward runs beside the engine thread; JAX dispatch is thread-safe.
        scored = await asyncio.to_thread(self._scorer.score, prompts)
        return [self._prompt_logprobs(p, s, top) for p, s in zip(prompts, scored, strict=True)]

    def _prompt_logprobs(self, prompt, scores, top) -> list[TokenLogprob]:
        out = [TokenLogprob(self.token_text(prompt[0]), None, ())]
        for i, token in enumerate(prompt[1:]):
            top_pairs = zip(
                scores.top_ids[i, :top].tolist(), scores.top_logprobs[i, :top].tolist(), strict=True
            )
            alternatives = tuple((self.token_text(t), p) for t, p in top_pairs)
            out.append(TokenLogprob(self.token_text(token), float(scores.logprob[i]), alternatives))
        return out


class _Mailbox:
    """Events from the engine thread to the event loop, one wake-up for all that arrive
    before the loop runs: `post` from the engine thread, delivered into each request's
    asyncio.Queue in order."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: list = []
        self._scheduled = False

    def post(self, loop, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            wake, self._scheduled = not self._scheduled, True
        if wake:
            loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)
