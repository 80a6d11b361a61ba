"""A serving engine where every step is one packed row of query tokens against a KV cache.

Continuous batching over a fixed number of sequence slots (Orca, Yu et al., OSDI 2022)
with chunked prefill piggybacked on decodes (SARATHI, Agrawal et al., arXiv 2308.16369):
each step's row holds one decode token of every running sequence, then chunks of waiting
prompts up to `token_budget` tokens; each token carries its slot + 1 as segment id and
its position, and one jitted forward attends the row against the cache (`lcx.cache`).
A prompt longer than the budget's remainder is prefilled over several steps. Shapes are
fixed by (slots, max_length, token_budget): the step compiles twice, for decode-only
rows and for rows with chunks.

`prefill` is Prepacking (Zhao et al., arXiv 2404.09529) for a static batch: prompts
packed by `first_fit_decreasing` into rows, one forward, each prompt's keys/values
scattered to its slot. A shared prefix (Hydragen, arXiv 2402.05099) is prefilled once,
stored once, and merged into every step's attention by log-sum-exp
(`lcx.attention.shared_prefix`); each slot's cache then holds only its own suffix.

Host-side bookkeeping (queues, slots, stop conditions) is plain Python over small lists;
the device sees fixed-shape arrays only.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lcx import paged_cache
from lcx.attention.shared_prefix import SharedPrefix
from lcx.cache import CHUNK_QUERY_BLOCK, AttentionCache
from lcx.generate import past_future
from lcx.generate.drafting import DraftModel
from lcx.generate.pages import PagePool
from lcx.generate.sampling import SamplingParams, sample, settings_arrays, verify_drafts
from lcx.packing import first_fit_decreasing
from lcx.paged_cache import PagedAttentionCache, PageLayout, ragged_reads, ragged_work

TOP_LOGPROBS = 20  # the most alternatives an event reports (OpenAI's chat API allows 20)
# Prefix grouping (BatchLLM): how far down the queue admission looks for a request that
# shares cached or running pages, and how often the oldest request may be passed over.
PREFIX_GROUP_LOOKAHEAD = 64
PREFIX_GROUP_MAX_SKIPS = 8


@dataclasses.dataclass(frozen=True)
class Request:
    """A prompt to continue: token ids, how many new tokens at most, how, when to stop."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_ids: tuple[int, ...] = ()
    top_logprobs: int = 0  # alternatives per token in its events (at most TOP_LOGPROBS)


@dataclasses.dataclass(frozen=True)
class Event:
    """One generated token of a request; `done` on its last.

    `logprob` is the token's log-probability under the model (its raw distribution,
    before temperature, top-k and top-p, as OpenAI's API reports it); `top_logprobs` the
    request's `top_logprobs` most likely tokens as (id, log-probability), best first.
    """

    request_id: int
    token: int
    done: bool
    logprob: float = float("nan")
    top_logprobs: tuple[tuple[int, float], ...] = ()
    cached_tokens: int = 0  # on a request's first event: prompt tokens the prefix cache held
    # Speculative decoding: the request's tokens drafted and accepted so far.
    drafted: int = 0
    accepted: int = 0


@dataclasses.dataclass
class _Running:
    """Host state of the sequence in a slot."""

    request_id: int
    request: Request
    prefilled: int = 0  # tokens of `context` already in the cache
    generated: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)  # a paged cache's, in order
    names: list[int] = dataclasses.field(default_factory=list)  # its full pages' hash chain
    wanted: list[int] = dataclasses.field(default_factory=list)  # context's reusable pages'
    context: Sequence[int] = ()  # what to prefill: the prompt (and, preempted, what followed)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    drafted: int = 0  # speculative tokens proposed, and accepted
    accepted: int = 0
    submitted: float = 0.0  # time.perf_counter() at submit, and at its first token
    first_token: float | None = None

    def __post_init__(self):
        self.context = self.context or self.request.prompt

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.context)


def _forward_and_sample(graphdef, attend_cache, state, cache, prefixes, row, settings):
    """One packed forward against the cache, then each slot's next token from its logits."""
    model = nnx.merge(graphdef, state)
    # The decode part: one place per slot, or k + 1 when drafts are verified.
    slots = row["offset"].shape[0]
    decode_rows = slots * (row["drafts"].shape[1] if "drafts" in row else 1)
    if "table" in row:  # a paged cache: the page table, and the step's work items
        paged = {
            "pages": PageLayout(row["table"], *row.get("work", ())),
            "decode_rows": decode_rows,
        }
    else:
        paged = {"decode_rows": decode_rows if attend_cache else 0}
    logits, cache = model(
        row["tokens"],
        row["segment_ids"],
        row["positions"],
        cache=cache,
        logits_at=row["logits_at"],
        attend_cache=attend_cache,
        prefixes=prefixes,
        offset_S=row["offset"],
        **paged,
    )
    b, n, v = logits.shape
    flat = logits.reshape(b * n, v)
    chosen = flat[row["logit_of_slot"]]
    temperature, top_k, top_p, seed = settings
    tokens = sample(chosen, seed, row["count"], temperature, top_k, top_p)
    picked = (tokens, *_logprobs(chosen, tokens))
    if "drafts" not in row:
        return picked, cache
    # Speculative decoding: slot s's k + 1 verify positions follow the slots' picks.
    s, k1 = row["drafts"].shape
    verify = flat[s:]
    each = lambda x: jnp.repeat(x, k1)  # noqa: E731
    counts = (row["count"][:, None] + jnp.arange(k1)).reshape(-1)
    drafts = row["drafts"].reshape(-1)
    accept, residual, plain = verify_drafts(
        verify, drafts, each(seed), counts, each(temperature), each(top_k), each(top_p)
    )
    candidates = jnp.stack([drafts, residual, plain], axis=-1)  # [S * K1, 3]
    logprobs = jax.nn.log_softmax(verify.astype(jnp.float32), axis=-1)
    candidate_logprob = jnp.take_along_axis(logprobs, candidates, axis=-1)
    top_logprob, top_id = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, v))
    shaped = lambda x: x.reshape(s, k1, *x.shape[1:])  # noqa: E731
    verified = tuple(map(shaped, (accept, candidates, candidate_logprob, top_id, top_logprob)))
    return (*picked, *verified), cache


def _logprobs(logits_NxV, tokens_N):
    """Each token's log-probability under its row's raw distribution, and the row's best
    TOP_LOGPROBS (ids, log-probabilities)."""
    logprobs = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1)
    token_logprob = jnp.take_along_axis(logprobs, tokens_N[:, None], axis=-1)[:, 0]
    top_logprob, top_id = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logits_NxV.shape[-1]))
    return token_logprob, top_id, top_logprob


class Engine:
    """Continuous batching: `submit` requests, then `step` (or `run`) until `idle`.

    Args:
      model: an lcx `Transformer` whose mixers have caches.
      slots: sequences decoded at once.
      max_length: cache entries per slot: prompt (after a shared prefix) plus new tokens.
      token_budget: query tokens per step: `slots` places for decodes, the rest for
        prompt chunks; > slots.
      shared_prefix: token ids every request continues, prefilled once and stored once;
        requests then give only what follows it.
      cache_dtype: dtype of the cache (default the model's compute dtype).
      mesh, rules: shard the parameters by their logical axes under `rules` (as
        `config.sharding_rules`) and the cache's slots over `data`, its kv heads over
        `tensor`; the step is jitted with these shardings. A parameter dimension its
        mesh axes do not divide is replicated instead, with a UserWarning naming it.
      page_size: keep the cache in pages of this many tokens (`lcx.paged_cache`), taken as
        sequences grow and returned when they end, each step reading only each slot's
        own pages; None: one `max_length` stretch per slot.
      num_pages: the pages of the pool (default: `slots` full-length sequences' worth).
        When a step needs a page and none is free, the newest request is preempted: its
        pages are freed and it is queued again, to be prefilled anew with what it has
        generated (its outputs unchanged).
      prefix_cache: keep full pages named by the hash chain of their tokens
        (`lcx.generate.pages`): a request whose prompt starts with cached pages skips
        their prefill (`Event.cached_tokens`); pages nobody holds are reused least
        recently used first. Waiting requests are grouped by shared prefix (BatchLLM): a
        free slot takes the queued request whose prompt starts with the most cached or
        running pages, and a prompt whose next page an older request is prefilling
        waits for it instead of computing it too. Needs `page_size`.
      speculative: None, or {"method": "ngram", "k": 4, "n": 3}: prompt-lookup decoding
        (the tokens that followed the latest earlier occurrence of a sequence's last n,
        n-1, ..., 1 tokens are its drafts, at most k), or {"method": "draft", "k": 4,
        "draft": model}: a small lcx model with the same vocabulary drafts k tokens
        greedily from its own cache (`lcx.generate.drafting`). Each decoding sequence's last token
        and drafts are verified in one block of the step's row, and each keeps its own
        accepted count (`lcx.generate.sampling.verify_drafts`: greedy output is
        unchanged, sampling keeps the model's distribution); `Event.drafted` and
        `Event.accepted` count them per request.
      admission: "fcfs" (a free slot takes the next request) or "past_future" (the
        Past-Future scheduler, arXiv 2507.10150; needs `page_size`): the next request is
        admitted only while the predicted peak page use of everything running, and of it,
        fits the pool in each of `past_future.SAMPLES` futures, where every request's
        output length is drawn from the lengths of the last `past_future.HISTORY`
        finished requests and of the running ones (a survival estimate, where a request
        that ran to its max_new_tokens, like a running one, only says its output runs
        longer than that), given that it runs past what it has generated
        (`lcx.generate.past_future`); until
        `past_future.HISTORY_MIN` have finished, each runs to its `max_new_tokens`.
      sla: (seconds to the first token, seconds per later token) a request must meet to
        count in `goodput_requests`; None: none counted.
    """

    def __init__(
        self,
        model,
        *,
        slots: int,
        max_length: int,
        token_budget: int,
        shared_prefix: Sequence[int] | None = None,
        cache_dtype=None,
        mesh=None,
        rules=(),
        page_size: int | None = None,
        num_pages: int | None = None,
        prefix_cache: bool = False,
        speculative: dict | None = None,
        admission: str = "fcfs",
        sla: tuple[float, float] | None = None,
    ):
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2 (a prompt and a token)")
        if token_budget <= slots:
            raise ValueError(
                f"token_budget={token_budget} must be > slots={slots}: every slot has a decode "
                "token's place in each step, and prompts need the rest"
            )
        cfg = model.cfg
        # The engine asks each mixer's record (lcx.model.MIXERS), not its name. A mixer that
        # updates per chunk of its sequence (LaCT) has prompt chunks end on its grid.
        self._chunk_grid = cfg.chunk_grid()
        self._no_prepacking = cfg.mixers_without("prepacked_prefill")
        if shared_prefix is not None and cfg.mixers_without("shared_prefix"):
            raise ValueError(
                f"shared_prefix: the model's {cfg.mixers_without('shared_prefix')} layers "
                "cannot merge a prefix stored once (their state is per slot); use attention"
            )
        self.vocab_size = cfg.vocab_size
        self.slots, self.max_length, self.token_budget = slots, max_length, token_budget
        self._graphdef, self._state = nnx.split(model)
        self.page_size, self._pool = page_size, None
        if page_size is None:
            for name, value in (("num_pages", num_pages), ("prefix_cache", prefix_cache)):
                if value not in (None, False):
                    raise ValueError(f"{name}={value} needs page_size (the tokens per page)")
            self._cache = model.init_cache(slots, max_length, cache_dtype)
        else:
            num_pages = self._check_pages(cfg, page_size, num_pages)
            if prefix_cache and cfg.mixers_without("prefix_reuse"):
                raise ValueError(
                    f"prefix_cache: the model's {cfg.mixers_without('prefix_reuse')} layers "
                    "cannot reuse a cached prefix's state"
                )
            self._pool = PagePool(num_pages, page_size, prefix_cache=prefix_cache)
            self._table = np.zeros((slots, -(-max_length // page_size)), np.int32)
            self._cache = model.init_paged_cache(num_pages, page_size, cache_dtype)
            # Work lists from the host only on paged_cache.HOST_WORK_BACKENDS.
            self._host_work = jax.default_backend() in paged_cache.HOST_WORK_BACKENDS
        self._window = cfg.attention_window
        self._draft_k, self._draft_n, draft_model = self._check_speculative(cfg, speculative)
        self._verifying: dict[int, list[int]] = {}  # slot -> this step's drafts
        if admission not in ("fcfs", "past_future"):
            raise ValueError(f"admission={admission!r}; valid: 'fcfs', 'past_future'")
        if admission == "past_future" and page_size is None:
            raise ValueError("admission='past_future' predicts page use: it needs page_size")
        self._admission, self._sla = admission, sla
        # Finished requests' (output length, whether a stop id ended it): one that ran to
        # its max_new_tokens only says its output would have run longer.
        self._finished: collections.deque[tuple[int, bool]] = collections.deque(
            maxlen=past_future.HISTORY
        )
        cache_sharding = None
        if mesh is not None:
            self._state = jax.device_put(self._state, _param_shardings(self._state, mesh, rules))
            cache_sharding = _cache_sharding(self._cache, mesh)
            self._cache = jax.device_put(self._cache, cache_sharding)
        out_shardings = None if mesh is None else (_replicated(mesh), cache_sharding)
        self._steps = {
            attend: _jitted_step(self._graphdef, attend, out_shardings) for attend in (True, False)
        }
        self._prefix_length = 0
        self._prefix_tokens: list[int] = []
        self._prefixes = None
        if shared_prefix is not None:
            self._check_tokens(shared_prefix, "shared_prefix")
            self._prefixes = self._prefill_prefix(model, list(shared_prefix), cache_dtype)
            self._prefix_length = len(shared_prefix)
            self._prefix_tokens = list(shared_prefix)
        self._drafter = None  # a draft model's proposer, which sees the shared prefix too
        if draft_model is not None:
            length = self._prefix_length + max_length
            self._drafter = DraftModel(draft_model, slots=slots, max_length=length,
                                       k=self._draft_k, cache_dtype=cache_dtype)  # fmt: skip
        self._proposals: dict[int, list[int]] = {}  # slot -> the draft model's drafts
        self._queue: collections.deque[tuple[int, Request]] = collections.deque()
        self._running: list[_Running | None] = [None] * slots
        self._next_id = 0
        self._preempted: dict[int, _Running] = {}  # queued again, with what they generated
        self._submitted: dict[int, float] = {}  # request id -> time.perf_counter() at submit
        self._prompt_names: dict[int, list[int]] = {}  # queued request id -> its pages' names
        self._skipped: dict[int, int] = {}  # queued request id -> times passed over
        self.results: dict[int, list[int]] = {}
        self.steps = 0
        self.preemptions = 0  # requests whose pages were taken back to let older ones run
        # Pages read by the steps' attention (a paged cache): all, and the decode tokens'.
        self.pages_read = self.decode_pages_read = 0
        self.drafted_tokens = self.accepted_tokens = 0  # speculative decoding, all requests
        self.goodput_requests = 0  # finished requests that met `sla`
        self.last_row: dict[str, np.ndarray] | None = None  # the last step's packed row

    # ---- requests ---------------------------------------------------------------------

    def submit(self, request: Request) -> int:
        """Queue a request; its id. ValueError (one line, nothing queued) if it cannot run."""
        self.check_request(request)
        request_id = self._next_id
        self._next_id += 1
        self._queue.append((request_id, request))
        self._submitted[request_id] = time.perf_counter()
        return request_id

    def cancel(self, request_id: int) -> bool:
        """Drop a queued or running request, freeing its slot for the next step; what it
        generated so far goes to `results`. False if it is not queued or running."""
        for i, (queued_id, _) in enumerate(self._queue):
            if queued_id == request_id:
                del self._queue[i]
                self._submitted.pop(request_id, None)
                self._prompt_names.pop(request_id, None)
                self._skipped.pop(request_id, None)
                preempted = self._preempted.pop(request_id, None)
                self.results[request_id] = [] if preempted is None else preempted.generated
                return True
        for slot, running in enumerate(self._running):
            if running is not None and running.request_id == request_id:
                self.results[request_id] = running.generated
                self._release(slot)
                return True
        return False

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests in a slot (prefilling or decoding)."""
        return sum(r is not None for r in self._running)

    @property
    def pages_in_use(self) -> int:
        """Pages held by running sequences (0 without a paged cache)."""
        return 0 if self._pool is None else self._pool.num_pages - self._pool.free

    @property
    def cached_pages(self) -> int:
        """Pages named in the prefix cache, held or not (0 without one)."""
        return 0 if self._pool is None else self._pool.cached

    @property
    def idle(self) -> bool:
        """No request queued or running."""
        return not self._queue and all(r is None for r in self._running)

    def run(self, on_event: Callable[[Event], None] | None = None) -> dict[int, list[int]]:
        """Step until idle; the new tokens of every request, by id."""
        while not self.idle:
            for event in self.step():
                if on_event is not None:
                    on_event(event)
        return self.results

    @property
    def cache(self):
        """The per-slot cache (one entry per layer), for inspection: a LaCT layer's holds
        each slot's fast weights."""
        return self._cache

    # ---- one step ---------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Admit waiting requests into free slots, run one packed row, sample, retire."""
        self._admit()
        plan = self._plan_row()
        if plan is None:
            return []
        row, logits_at, samplers = plan
        tokens = self._run(row, logits_at[None], np.arange(self.slots), attend_cache=True)
        self.steps += 1
        self.last_row = row  # tokens, segment_ids (slot + 1), positions: [1, W] each
        return self._take(tokens, samplers)

    def prefill(self, requests: Sequence[Request], *, packing: str = "ffd") -> list[Event]:
        """Prepacked prefill of a static batch into free slots; their first tokens.

        The prompts are packed by `first_fit_decreasing` into rows as long as the longest
        prompt (`packing="padded"`: one prompt per row, the baseline), run in one forward
        (each prompt attends only itself), and each prompt's keys/values are written to
        its slot. Decode them with `step`.
        """
        if packing not in ("ffd", "padded"):
            raise ValueError(f"packing={packing!r}; valid: 'ffd', 'padded'")
        if self._no_prepacking:
            raise ValueError(
                f"prefill (prepacked): the model's {self._no_prepacking} layers cannot prefill "
                "whole prompts in packed rows; submit the requests and step: prompts are "
                f"prefilled in chunks on their grid of {self._chunk_grid} tokens"
            )
        requests = list(requests)
        row, logits_at, logit_of_slot, free = self._pack_prefill(requests, packing)
        if self._pool is not None:
            need = sum(self._pages_for(len(r.prompt)) for r in requests)
            if need > self._pool.free:
                raise ValueError(
                    f"prefill of {len(requests)} prompts needs {need} pages of "
                    f"page_size={self.page_size}; {self._pool.free} are free"
                )
        samplers = []
        for i, request in enumerate(requests):
            request_id = self._next_id
            self._next_id += 1
            running = _Running(
                request_id, request, prefilled=len(request.prompt), submitted=time.perf_counter()
            )
            self._running[free[i]] = running
            if self._pool is not None:
                self._reserve(free[i], len(request.prompt))
                self._register(free[i], len(request.prompt))
            samplers.append(free[i])
        return self._take(self._run(row, logits_at, logit_of_slot, attend_cache=False), samplers)

    def compiled_prefill(self, requests: Sequence[Request], *, packing: str = "ffd"):
        """The compiled executable `prefill` would run (for its cost and memory analysis)."""
        row, logits_at, logit_of_slot, _ = self._pack_prefill(list(requests), packing)
        args = self._device_args(row, logits_at, logit_of_slot, attend_cache=False)
        return self._steps[False].lower(*args).compile()

    def _pack_prefill(self, requests, packing):
        """(row arrays, logits_at, logit_of_slot, free slots) of a prefill; checks first."""
        if not requests:
            raise ValueError("prefill needs at least one request")
        for request in requests:
            self.check_request(request)
        free = [s for s, r in enumerate(self._running) if r is None]
        if len(requests) > len(free):
            raise ValueError(
                f"prefill of {len(requests)} requests needs as many free slots; {len(free)} "
                f"of slots={self.slots} are free"
            )
        lengths = [len(r.prompt) for r in requests]
        capacity = max(lengths)
        if packing == "ffd":
            rows = first_fit_decreasing(lengths, capacity)
        else:
            rows = [[i] for i in range(len(requests))]
        width = -(-capacity // 8) * 8
        tokens = np.zeros((len(rows), width), np.int32)
        segment_ids, positions = np.zeros_like(tokens), np.zeros_like(tokens)
        per_row = max(len(members) for members in rows)
        logits_at = np.zeros((len(rows), per_row), np.int32)  # each prompt's last token
        logit_of_slot = np.zeros(self.slots, np.int32)  # its index in logits_at, flattened
        for r, members in enumerate(rows):
            start = 0
            for j, i in enumerate(members):
                slot, prompt = free[i], requests[i].prompt
                end = start + len(prompt)
                tokens[r, start:end] = prompt
                segment_ids[r, start:end] = slot + 1
                positions[r, start:end] = np.arange(len(prompt)) + self._prefix_length
                logits_at[r, j] = end - 1
                logit_of_slot[slot] = r * per_row + j
                start = end
        row = dict(tokens=tokens, segment_ids=segment_ids, positions=positions)
        return row, logits_at, logit_of_slot, free

    # ---- internals --------------------------------------------------------------------

    def _check_tokens(self, tokens, name):
        """ValueError unless `tokens` is a non-empty list of ids in the vocabulary."""
        if len(tokens) == 0:
            raise ValueError(f"{name} is empty; give at least one token id")
        ids = np.asarray(tokens)
        if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(
                f"{name} holds token ids outside the vocabulary [0, {self.vocab_size})"
            )

    def check_request(self, request: Request):
        """One-line ValueError for a request the engine cannot serve."""
        self._check_tokens(request.prompt, "prompt")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={request.max_new_tokens} must be >= 1")
        if not 0 <= request.top_logprobs <= TOP_LOGPROBS:
            raise ValueError(f"top_logprobs={request.top_logprobs} must be in [0, {TOP_LOGPROBS}]")
        need = len(request.prompt) + request.max_new_tokens - 1  # the last token is not cached
        if need > self.max_length:
            raise ValueError(
                f"a prompt of {len(request.prompt)} tokens plus max_new_tokens="
                f"{request.max_new_tokens} needs {need + 1} cache entries per slot; "
                f"max_length={self.max_length}"
            )

    def _prefill_prefix(self, model, prefix, cache_dtype):
        """Keys/values of the shared prefix, computed once: one SharedPrefix per layer."""
        n = len(prefix)
        cache = model.init_cache(1, n, cache_dtype)
        tokens = jnp.asarray([prefix], jnp.int32)
        ones = jnp.ones((1, n), jnp.int32)
        positions = jnp.arange(n, dtype=jnp.int32)[None]
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state, cache):
            """The prefix's forward, keeping its keys/values."""
            model = nnx.merge(graphdef, state)
            return model(tokens, ones, positions, cache=cache, attend_cache=False)[1]

        cache = run(state, cache)
        group_of_slot = jnp.zeros((self.slots,), jnp.int32)
        lengths, starts = jnp.asarray([n], jnp.int32), jnp.zeros((1,), jnp.int32)
        return tuple(((SharedPrefix(c.k, c.v, lengths, starts), group_of_slot),) for c in cache)

    def _admit(self):
        """Move queued requests into free slots, first come first served, while the pages of
        the next one's prompt are free (past_future: while the predicted peak fits); with
        the prefix cache, the next one is the request sharing the most pages (BatchLLM)."""
        for slot, running in enumerate(self._running):
            if running is None and self._queue:
                at = self._next_to_admit()
                request_id, request = self._queue[at]
                if self._admission == "past_future" and not self._fits(request_id, request):
                    return
                preempted = self._preempted.get(request_id)
                context = len(request.prompt if preempted is None else preempted.context)
                short = self._pool is not None and self._pool.free < self._pages_for(context)
                if short and self.running:
                    return  # as vLLM admits: a prompt whose pages are free now (or alone)
                del self._queue[at]
                self._skipped.pop(request_id, None)
                names = self._prompt_names.pop(request_id, None)
                preempted = self._preempted.pop(request_id, None)
                self._running[slot] = running = preempted or _Running(
                    request_id, request, submitted=self._submitted.pop(request_id, 0.0)
                )
                if self._pool is not None and self._pool.prefix_cache:
                    if preempted is not None or names is None:  # its context, not its prompt
                        names = self._pool.names(running.context[: len(running.context) - 1])
                    running.wanted = names
                    self._reuse_cached_pages(slot)

    def _next_to_admit(self) -> int:
        """The queue index of the request to admit next: the oldest, or with the prefix cache
        the one among the first PREFIX_GROUP_LOOKAHEAD whose prompt starts with the most
        pages that are cached or that running requests hold or are prefilling (BatchLLM,
        Zheng et al., arXiv 2412.03594, groups requests by shared prefix so the prefix is
        computed once and found while it is still in memory). The oldest is passed over at
        most PREFIX_GROUP_MAX_SKIPS times, and a preempted request is never."""
        head_id, _ = self._queue[0]
        grouping = self._pool is not None and self._pool.prefix_cache
        if not grouping or head_id in self._preempted:
            return 0
        if self._skipped.get(head_id, 0) >= PREFIX_GROUP_MAX_SKIPS:
            return 0
        held = {name for running in self._running if running is not None for name in running.wanted}
        live = lambda name: name in held or self._pool.is_cached(name)  # noqa: E731
        best, best_shared = 0, 0
        for at, (request_id, request) in enumerate(self._queue):
            if at == PREFIX_GROUP_LOOKAHEAD:
                break
            names = self._prompt_names.get(request_id)
            if names is None:
                names = self._pool.names(request.prompt[: len(request.prompt) - 1])
                self._prompt_names[request_id] = names
            shared = 0
            while shared < len(names) and live(names[shared]):
                shared += 1
            if shared > best_shared:
                best, best_shared = at, shared
        if best:
            self._skipped[head_id] = self._skipped.get(head_id, 0) + 1
        else:
            self._skipped.pop(head_id, None)
        return best

    def _plan_row(self):
        """The step's row: each slot's decode token (or padding), then prompt chunks.

        The decode part holds C places per slot, slot i's from index i * C: C = 1, or
        k + 1 when a sequence verifies its last token and drafts together this step.
        Each chunk starts a block of `CHUNK_QUERY_BLOCK` (a block attends one slot's
        cache); the row is the decode part in a decode-only step, else that plus the
        budget rounded up to whole blocks, so the step compiles for two shapes (four
        with speculation).
        """
        s, block = self.slots, CHUNK_QUERY_BLOCK
        if self._pool is not None:
            self._reserve_decode_pages()
        budget = self.token_budget - s  # tokens left beside the slots' decode tokens
        self._verifying = {}
        if self._drafter is not None:
            self._proposals = self._drafter.propose(self._draft_contexts())
        decoding = [slot for slot, r in enumerate(self._running) if r is not None and r.decoding]
        for slot in decoding:
            running = self._running[slot]
            n = len(running.request.prompt) + len(running.generated) - 1
            self._register(slot, n + 1)
            drafts = self._drafts(slot, n, budget)
            if drafts:
                self._verifying[slot] = drafts
                budget -= len(drafts)
        k1 = self._draft_k + 1
        c = k1 if self._verifying else 1  # decode places per slot
        width = s * c + -(-(self.token_budget - s) // block) * block
        tokens = np.zeros(width, np.int32)
        segment_ids, positions = np.zeros_like(tokens), np.zeros_like(tokens)
        # The row index of each slot's sampled token; when verifying, then each slot's
        # k + 1 verify positions.
        last = np.zeros(s + s * k1 if self._verifying else s, np.int32)
        samplers, chunks = [], []
        at = s * c  # the next chunk block's start
        for slot in decoding:
            running = self._running[slot]
            n = len(running.request.prompt) + len(running.generated) - 1
            sequence = [running.generated[-1], *self._verifying.get(slot, ())]
            here = slice(slot * c, slot * c + len(sequence))
            tokens[here], segment_ids[here] = sequence, slot + 1
            positions[here] = np.arange(n, n + len(sequence)) + self._prefix_length
            if slot in self._verifying:  # the last token and its drafts, verified together
                last[s + slot * k1 : s + slot * k1 + len(sequence)] = np.arange(
                    here.start, here.stop
                )
            else:
                last[slot] = slot * c
                samplers.append(slot)
        waiting = [(r.request_id, s) for s, r in enumerate(self._running) if r and not r.decoding]
        for _, slot in sorted(waiting):  # oldest request first
            running = self._running[slot]
            if self._pool is not None and self._pool.prefix_cache:
                self._reuse_cached_pages(slot)  # what an older request wrote since
                if self._prefilled_by_older(slot):
                    continue
            start = running.prefilled
            take = min(budget, width - at, len(running.context) - start)
            if self._chunk_grid:
                take = min(take, self._chunk_grid - start % self._chunk_grid)
            if self._pool is not None:  # as far as its pages and the free ones reach
                room = (len(running.pages) + self._pool.free) * self.page_size - start
                take = min(take, room)
                if take > 0:
                    self._reserve(slot, start + take)
            if take <= 0:
                break
            tokens[at : at + take] = running.context[start : start + take]
            segment_ids[at : at + take] = slot + 1
            positions[at : at + take] = np.arange(start, start + take) + self._prefix_length
            chunks.append((slot, take))
            self._register(slot, start + take)
            if start + take == len(running.context):
                last[slot] = at + take - 1
                samplers.append(slot)
            budget -= take
            at += -(-take // block) * block
        if not samplers and not chunks and not self._verifying:
            if self._pool is None or not self.running:
                return None
            # Every running sequence is a prompt waiting for pages that others hold: the
            # newest gives its back, so the oldest can go on.
            self._preempt(self._newest_running())
            return self._plan_row()
        for slot, take in chunks:
            self._running[slot].prefilled += take
        if not chunks:
            tokens, segment_ids, positions = (
                tokens[: s * c],
                segment_ids[: s * c],
                positions[: s * c],
            )
        row = dict(tokens=tokens[None], segment_ids=segment_ids[None], positions=positions[None])
        return row, last, samplers

    def _run(self, row, logits_at, logit_of_slot, *, attend_cache):
        """The jitted forward and sampling; the next token of every slot, on the host.

        `logits_at` [B, N]: the row indices whose logits are needed; `logit_of_slot` [S]:
        each slot's entry among them, flattened (meaningless for slots not sampled).
        """
        args = self._device_args(row, logits_at, logit_of_slot, attend_cache=attend_cache)
        sampled, self._cache = self._steps[attend_cache](*args)
        return tuple(np.asarray(x) for x in sampled)

    def _device_args(self, row, logits_at, logit_of_slot, *, attend_cache):
        """The jitted step's arguments: state, cache, prefixes, row arrays, sampling."""
        counts, params = [], []
        for running in self._running:
            counts.append(0 if running is None else len(running.generated))
            params.append(None if running is None else running.request.sampling)
        # Host arrays: the jitted call moves them to the device in one go (faster per step
        # than a jnp.asarray each).
        device_row = dict(
            tokens=row["tokens"],
            segment_ids=row["segment_ids"],
            positions=row["positions"],
            logits_at=np.asarray(logits_at, np.int32),
            logit_of_slot=np.asarray(logit_of_slot, np.int32),
            count=np.asarray(counts, np.int32),
            offset=np.full((self.slots,), self._prefix_length, np.int32),
        )
        if self._verifying and attend_cache:
            drafts = np.zeros((self.slots, self._draft_k + 1), np.int32)
            for slot, proposed in self._verifying.items():
                drafts[slot, : len(proposed)] = proposed
            device_row["drafts"] = drafts
        if self._pool is not None:
            device_row["table"] = self._table.copy()
            if attend_cache:
                where = (
                    row["segment_ids"][0],
                    row["positions"][0],
                    self.slots,
                    device_row["offset"],
                    self.page_size,
                    self._window,
                    self.slots * (self._draft_k + 1 if self._verifying else 1),
                )
                if self._host_work:
                    work, read = ragged_work(*where)
                    device_row["work"] = tuple(work)
                else:  # the step builds its work list; the host counts its pages
                    read = ragged_reads(*where)
                self.pages_read += sum(read)
                self.decode_pages_read += read[0]
        return self._state, self._cache, self._prefixes, device_row, settings_arrays(params)

    def _take(self, sampled, samplers) -> list[Event]:
        """Append each sampled (or verified) token to its sequence; retire finished ones."""
        tokens_S, logprob_S, top_id_SxN, top_logprob_SxN = sampled[:4]
        events = []
        for slot in samplers:
            top = (top_id_SxN[slot], top_logprob_SxN[slot])
            self._emit(slot, int(tokens_S[slot]), float(logprob_S[slot]), top, events)
        verifying, self._verifying = self._verifying, {}
        for slot, drafts in verifying.items():
            accept, candidates, candidate_logprob, top_id, top_logprob = (
                x[slot] for x in sampled[4:]
            )
            accepted = 0
            while accepted < len(drafts) and accept[accepted]:
                accepted += 1
            running = self._running[slot]
            running.drafted += len(drafts)
            running.accepted += accepted
            self.drafted_tokens += len(drafts)
            self.accepted_tokens += accepted
            # The accepted drafts, then the residual draw where a draft was rejected, or
            # the bonus token after them all; the cache entries of rejected drafts stay
            # behind the sequence's end, unseen, until new tokens overwrite them, and the
            # pages only they took go back to the pool.
            picks = [(j, 0) for j in range(accepted)]
            picks.append((accepted, 1 if accepted < len(drafts) else 2))
            for j, which in picks:
                top = (top_id[j], top_logprob[j])
                done = self._emit(
                    slot, int(candidates[j, which]), float(candidate_logprob[j, which]), top,
                    events,
                )  # fmt: skip
                if done:
                    break
            else:
                self._roll_back_pages(slot)
        return events

    def _emit(self, slot, token, logprob, top, events) -> bool:
        """Append one token to the slot's sequence and its Event; whether it ended it."""
        running = self._running[slot]
        running.generated.append(token)
        if running.first_token is None:
            running.first_token = time.perf_counter()
        request = running.request
        done = len(running.generated) >= request.max_new_tokens or token in request.stop_ids
        k = request.top_logprobs
        top = tuple(zip(top[0][:k].tolist(), top[1][:k].tolist(), strict=True))
        cached = running.cached_tokens if len(running.generated) == 1 else 0
        events.append(
            Event(
                running.request_id,
                token,
                done,
                logprob,
                top,
                cached,
                running.drafted,
                running.accepted,
            )  # fmt: skip
        )
        if done:
            self.results[running.request_id] = running.generated
            self._finished.append((len(running.generated), token in request.stop_ids))
            self.goodput_requests += self._met_sla(running)
            self._release(slot)
        return done

    # ---- admission --------------------------------------------------------------------

    def _met_sla(self, running) -> bool:
        """Whether a finished request met `sla` (time to first token, time per later token)."""
        if self._sla is None:
            return False
        ttft = running.first_token - running.submitted
        later = len(running.generated) - 1
        per_token = (time.perf_counter() - running.first_token) / later if later else 0.0
        return ttft <= self._sla[0] and per_token <= self._sla[1]

    def _fits(self, request_id, request) -> bool:
        """Whether the predicted peak page use of the running requests and the queued one
        fits the pool in every one of `past_future.SAMPLES` futures drawn from the output
        lengths of the finished and running requests (`lcx.generate.past_future`); before
        `past_future.HISTORY_MIN` have finished, each request runs to its max_new_tokens."""
        running = [r for r in self._running if r is not None]
        if not running:
            return True  # alone it fits: the pool holds one max_length sequence
        queued = self._preempted.get(request_id) or _Running(request_id, request)
        trusted = len(self._finished) >= past_future.HISTORY_MIN
        stopped = [n for n, by_stop_id in self._finished if by_stop_id]
        capped = [n for n, by_stop_id in self._finished if not by_stop_id]
        lengths, longer = past_future.survival(
            stopped, [*capped, *(len(r.generated) for r in running)]
        )
        now, end = [], []
        requests = sorted([*running, queued], key=lambda r: r.request_id)  # oldest first
        for r in requests:
            prompt, generated, most = (
                len(r.request.prompt),
                len(r.generated),
                r.request.max_new_tokens,
            )
            outputs = np.full(past_future.SAMPLES, most)
            if trusted:
                draws = past_future.uniforms(r.request_id)
                outputs = past_future.sample_output_lengths(lengths, longer, generated, most, draws)
            entries_now, entries_at_end = past_future.cache_entries(prompt, generated, outputs)
            now.append(np.full(past_future.SAMPLES, entries_now))
            end.append(entries_at_end)
        start = past_future.prefill_steps(
            [len(r.context) - r.prefilled for r in requests], self.token_budget - self.slots
        )  # as `_plan_row` takes prompt chunks: oldest first, beside every slot's decode
        peak = past_future.peak_pages(np.stack(now, 1), np.stack(end, 1), self.page_size, start)
        return peak <= self._pool.num_pages

    # ---- speculative decoding ---------------------------------------------------------

    def _check_speculative(self, cfg, speculative) -> tuple[int, int, object]:
        """(k, n, draft model) of `speculative` ((0, 0, None): none); a one-line ValueError
        for what cannot run."""
        if not speculative or speculative.get("method", "none") == "none":
            return 0, 0, None
        method, k, n = speculative.get("method"), speculative.get("k", 4), speculative.get("n", 3)
        keys = {"ngram": {"method", "k", "n"}, "draft": {"method", "k", "draft"}}
        if method not in keys or set(speculative) - keys[method]:
            raise ValueError(
                f"speculative: method={method!r} with keys {sorted(speculative)}; valid are "
                f"{{'method': 'ngram', 'k': 1..{CHUNK_QUERY_BLOCK - 1}, 'n': >= 1}} and "
                f"{{'method': 'draft', 'k': 1..{CHUNK_QUERY_BLOCK - 1}, 'draft': an lcx model}}"
            )
        if not 1 <= k < CHUNK_QUERY_BLOCK or n < 1:
            raise ValueError(
                f"speculative k={k} must be in [1, {CHUNK_QUERY_BLOCK - 1}] (the last token and "
                f"its drafts share one block of {CHUNK_QUERY_BLOCK}) and n={n} >= 1"
            )
        if cfg.mixers_without("rollback"):
            raise ValueError(
                f"speculative: the model's {cfg.mixers_without('rollback')} layers cannot "
                "take back rejected drafts"
            )
        draft = speculative.get("draft") if method == "draft" else None
        if method == "draft":
            draft_cfg = getattr(draft, "cfg", None)
            if draft_cfg is None or not hasattr(draft, "init_cache"):
                raise ValueError(
                    f"speculative draft={type(draft).__name__}: give an lcx Transformer "
                    "(lcx.model.Transformer, or lcx.checkpoints.load_hf of a checkpoint)"
                )
            if draft_cfg.vocab_size != cfg.vocab_size:
                raise ValueError(
                    f"speculative draft: its vocab_size={draft_cfg.vocab_size} differs from "
                    f"the model's {cfg.vocab_size}; a draft model must share the vocabulary"
                )
            if draft_cfg.mixers_without("rollback"):
                raise ValueError(
                    f"speculative draft: its {draft_cfg.mixers_without('rollback')} layers "
                    "cannot take back rejected drafts"
                )
        return k, n, draft

    def _draft_contexts(self) -> dict[int, list[int]]:
        """What the draft model continues for each decoding slot that may still speculate:
        the shared prefix, the prompt and what it generated."""
        return {
            slot: self._prefix_tokens + list(r.request.prompt) + r.generated
            for slot, r in enumerate(self._running)
            if r is not None and r.decoding and r.request.max_new_tokens - len(r.generated) > 1
        }

    def _drafts(self, slot, index, most) -> list[int]:
        """Drafts for the slot's next tokens, where they fit: at most k, `most` (what the
        step's token budget leaves beside the last token) and what its request may still
        generate; with a paged cache, only if pages are free. The draft model's proposal,
        or prompt lookup: the tokens after the latest earlier occurrence of its last n
        (then n - 1, ...) tokens."""
        if not self._draft_k:
            return []
        running = self._running[slot]
        left = running.request.max_new_tokens - len(running.generated) - 1
        room = min(self._draft_k, most, left)
        if room < 1:
            return []
        if self._drafter is not None:
            drafts = self._proposals.get(slot, [])[:room]
        else:
            drafts = _prompt_lookup(
                np.asarray(list(running.request.prompt) + running.generated), self._draft_n, room
            )
        if drafts and self._pool is not None and not self._reserve(slot, index + 1 + len(drafts)):
            return []
        return drafts

    # ---- pages ------------------------------------------------------------------------

    def _check_pages(self, cfg, page_size, num_pages) -> int:
        """The pool's size; a one-line ValueError for a model or a budget paging cannot serve."""
        if page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1 (tokens per page)")
        if cfg.mixers_without("paging"):
            raise ValueError(
                f"page_size: the model's {cfg.mixers_without('paging')} layers keep per-slot "
                "state, not pages; leave page_size=None"
            )
        per_sequence = -(-self.max_length // page_size)
        num_pages = self.slots * per_sequence if num_pages is None else num_pages
        if num_pages < per_sequence:
            raise ValueError(
                f"num_pages={num_pages} of page_size={page_size} hold {num_pages * page_size} "
                f"tokens; one sequence of max_length={self.max_length} needs {per_sequence} pages"
            )
        return num_pages

    def _pages_for(self, tokens: int) -> int:
        """Pages that hold `tokens` cache entries."""
        return -(-tokens // self.page_size)

    def _reserve(self, slot, tokens) -> bool:
        """Give slot's sequence pages for its first `tokens` entries; False if too few are free."""
        running = self._running[slot]
        need = self._pages_for(tokens) - len(running.pages)
        if need <= 0:
            return True
        pages = self._pool.take(need)
        if pages is None:
            return False
        self._table[slot, len(running.pages) : len(running.pages) + need] = pages
        running.pages += pages
        return True

    def _roll_back_pages(self, slot):
        """Give back the pages past those of the slot's entries in the cache (its prompt
        and tokens but the newest, not yet written): the pages its rejected drafts took."""
        running = self._running[slot]
        if self._pool is None:
            return
        keep = self._pages_for(len(running.request.prompt) + len(running.generated) - 1)
        if len(running.pages) > keep:
            self._pool.give(running.pages[keep:])
            running.pages = running.pages[:keep]

    def _register(self, slot, written):
        """Name the slot's full pages among its first `written` tokens in the prefix cache."""
        running = self._running[slot]
        if self._pool is None or not self._pool.prefix_cache:
            return
        if written // self.page_size > len(running.names):
            tokens = (list(running.request.prompt) + running.generated)[:written]
            running.names = self._pool.names(tokens, running.names)
            self._pool.register(running.pages, running.names)

    def _reuse_cached_pages(self, slot):
        """Extend a prefilling sequence, at a page boundary, with the cached pages that
        continue its context (never the page of its last token, whose logits it needs)."""
        running = self._running[slot]
        have = len(running.pages)
        if running.prefilled != have * self.page_size or len(running.names) != have:
            return  # mid-page: its own tokens come next
        pages = self._pool.lookup(running.wanted[have:])
        if pages:
            running.pages += pages
            running.names = running.wanted[: have + len(pages)]
            self._table[slot, have : have + len(pages)] = pages
            running.prefilled += len(pages) * self.page_size
            if not running.generated:
                running.cached_tokens += len(pages) * self.page_size

    def _prefilled_by_older(self, slot) -> bool:
        """Whether the next page of a prefilling sequence is being prefilled by an older
        one: it waits and then reuses that page rather than computing it again."""
        running = self._running[slot]
        have = len(running.pages)
        if running.prefilled != have * self.page_size or have >= len(running.wanted):
            return False
        name = running.wanted[have]
        return any(
            other is not None
            and not other.decoding
            and other.request_id < running.request_id
            and name in other.wanted[len(other.names) :]
            for other in self._running
        )

    def _reserve_decode_pages(self):
        """Each decoding sequence's page for this step's token, oldest first; while none is
        free, the newest request holding pages gives them back (this one, if newest)."""
        decoding = [
            (r.request_id, slot) for slot, r in enumerate(self._running) if r and r.decoding
        ]
        for _, slot in sorted(decoding):
            running = self._running[slot]
            if running is None:  # preempted for an older one
                continue
            index = len(running.request.prompt) + len(running.generated) - 1
            while not self._reserve(slot, index + 1):
                victim = self._newest_running(holding_pages=True)
                self._preempt(victim)
                if victim == slot:
                    break

    def _newest_running(self, *, holding_pages=False) -> int:
        """The slot of the most recently submitted running request (holding pages)."""
        running = [
            (r.request_id, slot)
            for slot, r in enumerate(self._running)
            if r is not None and (r.pages or not holding_pages)
        ]
        return max(running)[1]

    def _preempt(self, slot):
        """Free the slot's pages and queue its request again, ahead of newer ones; it will be
        prefilled anew with what it has generated (recomputation, as vLLM preempts)."""
        running = self._running[slot]
        running.context = list(running.request.prompt) + running.generated
        running.prefilled, running.names = 0, []
        self._preempted[running.request_id] = running
        at = sum(queued_id < running.request_id for queued_id, _ in self._queue)
        self._queue.insert(at, (running.request_id, running.request))
        self._release(slot)
        self.preemptions += 1

    def _release(self, slot):
        """Empty the slot, returning its pages."""
        running = self._running[slot]
        if self._pool is not None and running.pages:
            self._pool.give(running.pages)
            running.pages = []
        self._running[slot] = None


def _prompt_lookup(sequence, n_most, room) -> list[int]:
    """At most `room` tokens that followed the latest earlier occurrence of the sequence's
    last n tokens, for n = n_most, ..., 1 (prompt lookup decoding); none if none occurs."""
    for n in range(min(n_most, len(sequence) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(sequence[:-1], n)
        found = np.flatnonzero((windows == sequence[-n:]).all(axis=1))
        if found.size:
            start = int(found[-1]) + n
            return sequence[start : start + room].tolist()
    return []


@functools.lru_cache(maxsize=64)
def _jitted_step(graphdef, attend_cache, out_shardings):
    """The jitted step of a model graph, shared by every engine of that graph."""
    return jax.jit(
        functools.partial(_forward_and_sample, graphdef, attend_cache),
        donate_argnums=1,
        out_shardings=out_shardings,
    )


def _param_shardings(state, mesh, rules):
    """NamedShardings of the parameters from their logical axis names; a mesh axis that
    does not divide its dimension is dropped there, with one warning naming each."""
    from lcx.runtime.sharding import logical_to_sharding

    specs = nnx.get_partition_spec(state)
    wanted = logical_to_sharding(specs, mesh, rules)
    fitted = logical_to_sharding(specs, mesh, rules, state)
    dropped = [
        f"{jax.tree_util.keystr(path)} {tuple(x.shape)}: {want.spec[i]!r} on dimension {i}"
        for (path, want), got, x in zip(
            jax.tree_util.tree_flatten_with_path(wanted)[0],
            jax.tree.leaves(fitted),
            jax.tree.leaves(state),
            strict=True,
        )
        for i in range(len(x.shape))
        if i < len(want.spec) and want.spec[i] is not None and got.spec[i] is None
    ]
    if dropped:
        warnings.warn(
            f"serving engine: mesh {dict(mesh.shape)} does not divide these parameter "
            f"dimensions; each is replicated over the mesh axes named: {'; '.join(dropped)}",
            UserWarning,
            stacklevel=3,
        )
    return fitted


def _cache_sharding(cache, mesh):
    """Slots over `data`; an attention cache's kv heads over `tensor`; where sizes divide.
    A page pool is shared by every slot: only its kv heads are sharded."""
    if isinstance(cache[0], PagedAttentionCache):
        return tuple(_pool_sharding(c, mesh) for c in cache)
    slots = "data" if cache[0].slots % mesh.shape["data"] == 0 else None

    def by_slot(x):
        """Slots sharded, the rest replicated."""
        return NamedSharding(mesh, PartitionSpec(slots, *([None] * (x.ndim - 1))))

    def attention(c: AttentionCache):
        """[S, L, K, D] with K over tensor."""
        heads = "tensor" if c.k.shape[2] % mesh.shape["tensor"] == 0 else None
        sharding = NamedSharding(mesh, PartitionSpec(slots, None, heads, None))
        return AttentionCache(sharding, sharding)

    def layer(c):
        """One layer's cache: attention, or LaCT state holding an attention cache."""
        if isinstance(c, AttentionCache):
            return attention(c)
        return jax.tree.map(by_slot, c)._replace(attention=attention(c.attention))

    return tuple(layer(c) for c in cache)


def _pool_sharding(pool: PagedAttentionCache, mesh) -> PagedAttentionCache:
    """[pages, page, K, D] with K over `tensor` where it divides."""
    heads = "tensor" if pool.k.shape[2] % mesh.shape["tensor"] == 0 else None
    sharding = NamedSharding(mesh, PartitionSpec(None, None, heads, None))
    return PagedAttentionCache(sharding, sharding)


def _replicated(mesh):
    """Replicated on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())
