"""Serving on the CPU, each comparison side by side in one run, with the tiny LM's shape.

    python benchmarks/generate.py            # the BENCHMARKS.md run
    python benchmarks/generate.py --smoke    # seconds

1. `prefill`: 64 prompts cut from the embedded corpus's documents at random points,
   log-uniform in [16, 1024] tokens (long-tailed: most short, a few long): one prompt per
   row padded to the longest, vs prepacked
   (`first_fit_decreasing` rows as long as the longest prompt). Time (median of repeats)
   and the compiled step's temporary memory.
2. `decode`: 32 sequences continuing one shared prefix with short suffixes; decode
   tokens/s when each sequence attends its own copy of the prefix in its cache (naive)
   vs the prefix stored once and attended by all queries in one product (Hydragen).
3. `trace`: requests with Poisson arrivals and long-tailed prompt and output lengths:
   static batches padded to the longest (their attention reading the padded batch, as
   static padded batching does; and again with the engine's ragged reads) vs the
   continuous-batching engine with chunked prefill piggybacked on decodes, and the engine
   prefilling whole prompts in one step.
   Total time, output tokens/s, median and p99 time between a request's tokens; each
   variant runs the trace once to compile, then `--repeats` rounds of the variants in
   turn: each variant's run of median throughput, and the rounds' ratios. The
   paged engine runs beside them, and each reports its decodes' cache reads over the
   slots' own lengths; the paged run's rows also give the paged TPU kernel's grid
   steps, counted (`tpu_grid_steps`).
4. `chat`: conversations whose every turn resends the conversation so far (a long first
   turn, short later ones): mean time to first token with and without the prefix cache.
5. `speculative`: greedy decoding of copy-heavy prompts (a passage quoted twice) by a
   model trained for `--copy_steps` steps to quote, without speculation, with n-gram
   speculation and with a small draft model trained the same way (`--draft_layers`,
   `--draft_width`):
   decode tokens/s, engine steps, acceptance, the same tokens, how much the answers
   quote.
6. `admission`: a trace with long-tailed output lengths on a paged engine whose pool
   holds a fraction of the slots' full-length sequences: first come first served vs
   Past-Future admission: goodput (requests meeting the SLA per second), preemptions.
   Its requests are sampled until a stop id (`open_ended`), so their lengths are
   unknown to the engine, with `max_new_tokens` a cap; with `--answers by_prompt`,
   short prompts answer long and long ones short; with `--short_caps F`, a fraction F
   of the requests ask for at most `--short_cap` tokens (`short_capped`). Goodput is
   also counted at scaled SLAs (`SLA_SCALES`).

The model has lm_tiny's shape in float32 (`--dtype`); weights are random (the timing does
not depend on them); greedy decoding runs to `max_new_tokens` (no stop ids), so every
variant generates the same token counts; the admission trace's seeded sampling gives
both sides the same tokens too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lcx.attention.ragged_paged_tpu import pages_per_step  # noqa: E402
from lcx.attention.xla_chunked import DEFAULT_BLOCK_SIZES  # noqa: E402
from lcx.cache import DENSE_DECODE_CACHE, ragged_page  # noqa: E402
from lcx.config_loading import load_config  # noqa: E402
from lcx.generate import Engine, Request  # noqa: E402
from lcx.generate.sampling import SamplingParams  # noqa: E402
from lcx.model import Transformer, TransformerConfig  # noqa: E402
from lcx.paged_cache import ragged_work  # noqa: E402
from lcx.settings import resolve  # noqa: E402
from lcx.train.input import load_split  # noqa: E402


def spread(values) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def build_model(smoke: bool, implementation=None, dtype="float32"):
    """The tiny LM of configs/lm_tiny.py (its smoke shape with --smoke), random weights."""
    config = load_config(os.path.join(ROOT, "configs", "lm_tiny.py"), "smoke" if smoke else None)
    fields = dict(config.model, attention_implementation=implementation, dtype=dtype)
    return Transformer(TransformerConfig(**fields), rngs=nnx.Rngs(0)), config


def corpus_documents(config):
    """The embedded corpus's training documents, as token arrays."""
    corpus, _ = load_split(resolve(config).data, "train", None)
    return [corpus.document(i) for i in range(corpus.num_documents)]


def cut_prompts(documents, rng, n, cap, shortest=16):
    """n prompts: random documents cut at a log-uniform point in [shortest, cap] tokens.

    Log-uniform lengths are long-tailed: most prompts short, a few near `cap`.
    """
    prompts = []
    for i in rng.choice(len(documents), n, replace=len(documents) < n):
        doc = documents[i]
        length = int(np.exp(rng.uniform(np.log(shortest), np.log(cap))))
        prompts.append(doc[: max(1, min(length, len(doc)))].astype(np.int32).tolist())
    return prompts


def timed(fn, repeats):
    """Seconds of each of `repeats` calls of fn (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# ---- 1. prefill ----------------------------------------------------------------------


def bench_prefill(model, prompts, repeats):
    """Padded vs prepacked prefill of one static batch: time and temporary memory."""
    requests = [Request(p, 1) for p in prompts]
    slots, longest = len(prompts), max(map(len, prompts))
    out = {}
    for packing in ("padded", "ffd"):

        def run(packing=packing):
            engine = Engine(model, slots=slots, max_length=longest + 8, token_budget=slots + 1)
            engine.prefill(requests, packing=packing)

        engine = Engine(model, slots=slots, max_length=longest + 8, token_budget=slots + 1)
        memory = engine.compiled_prefill(requests, packing=packing).memory_analysis()
        rows = engine._pack_prefill(requests, packing)[0]["tokens"].shape
        out[packing] = {
            "seconds": spread(timed(run, repeats)),
            "temp_mib": memory.temp_size_in_bytes / 2**20,
            "rows": rows[0],
            "row_length": rows[1],
        }
    out["speedup"] = out["padded"]["seconds"]["median"] / out["ffd"]["seconds"]["median"]
    out["prompt_tokens"] = sum(map(len, prompts))
    return out


# ---- 2. shared-prefix decode ---------------------------------------------------------


def bench_decode(model, prefix, suffixes, new_tokens, repeats):
    """Decode tokens/s: each sequence's own prefix copy vs one shared copy (Hydragen)."""
    slots = len(suffixes)
    longest = max(map(len, suffixes))
    variants = {
        "naive": dict(prompts=[prefix + s for s in suffixes], shared_prefix=None,
                      max_length=len(prefix) + longest + new_tokens),
        "shared": dict(prompts=suffixes, shared_prefix=prefix,
                       max_length=longest + new_tokens),
    }  # fmt: skip
    out = {}
    for name, v in variants.items():
        rates = []
        for _ in range(repeats + 1):  # the first compiles
            engine = Engine(
                model, slots=slots, max_length=v["max_length"], token_budget=slots + 8,
                shared_prefix=v["shared_prefix"],
            )  # fmt: skip
            engine.prefill([Request(p, new_tokens) for p in v["prompts"]])
            start, events = time.perf_counter(), 0
            while not engine.idle:
                events += len(engine.step())
            rates.append(events / (time.perf_counter() - start))
        out[name] = {"tokens_per_sec": spread(rates[1:])}
    out["speedup"] = (
        out["shared"]["tokens_per_sec"]["median"] / out["naive"]["tokens_per_sec"]["median"]
    )
    return out


# ---- 3. request trace ----------------------------------------------------------------


# On TPU and GPU the one-stretch cache's decodes read every slot in kv tiles up to the
# longest slot; on the CPU each slot's own pages (`lcx.cache.ragged_page` rows each), or
# a small cache whole (`lcx.cache.DENSE_DECODE_CACHE`).
CACHE_TILE = DEFAULT_BLOCK_SIZES.block_kv


def one_stretch_reads(decode_positions, slots: int, max_length: int, cfg) -> int:
    """The cache entries a one-stretch engine's decodes at these positions read (`cfg`:
    the model's `TransformerConfig`, for the cache's size and attention implementation)."""
    if cfg.attention_implementation == "xla":  # the dense product: the whole cache
        return slots * max_length
    if cfg.attention_implementation is not None or jax.default_backend() != "cpu":
        # Tiled kernels: every slot up to the longest slot's position, in whole kv tiles.
        return slots * -(-(int(decode_positions.max()) + 1) // CACHE_TILE) * CACHE_TILE
    if slots * max_length * cfg.num_kv_heads * cfg.head_dim <= DENSE_DECODE_CACHE:
        return slots * max_length  # a small cache's decodes: the dense product, all of it
    page = ragged_page(max_length)  # each slot's pages up to its own last token
    return int((-(-(decode_positions + 1) // page) * page).sum())


def _decode_reads(engine, slots, max_length, cfg):
    """(the last step's decode tokens' own lengths, the one-stretch cache entries they
    read): (0, 0) for a step without decodes."""
    row = engine.last_row
    decodes = row["positions"][0, :slots][row["segment_ids"][0, :slots] > 0]
    if not decodes.size:
        return 0, 0
    return int((decodes + 1).sum()), one_stretch_reads(decodes, slots, max_length, cfg)


def make_trace(documents, rng, n, rate, prompt_cap, output_mean, output_cap):
    """(arrival seconds, Request) for n requests: Poisson arrivals, long-tailed lengths."""
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    prompts = cut_prompts(documents, rng, n, prompt_cap)
    outputs = np.minimum(1 + rng.exponential(output_mean, n).astype(int), output_cap)
    return [
        (float(a), Request(p, int(o))) for a, p, o in zip(arrivals, prompts, outputs, strict=True)
    ]


def open_ended(trace, stop_ids, cap, first_seed=0):
    """The trace's requests sampled (temperature 1, a seed each) until one of `stop_ids`
    (a tuple, or a function of the prompt's length giving one) or `cap` tokens: with the
    random model's near-uniform distributions, k stop ids of a vocabulary of V end a
    request after about V / k tokens, geometrically (memoryless, as the trace's
    exponential draws are), and nothing in a request tells the engine when (the drawn
    lengths as max_new_tokens would tell it exactly)."""
    stops = stop_ids if callable(stop_ids) else lambda _: stop_ids
    return [
        (arrival, dataclasses.replace(request, max_new_tokens=cap,
                                      stop_ids=stops(len(request.prompt)),
                                      sampling=SamplingParams(temperature=1.0, seed=seed)))
        for seed, (arrival, request) in enumerate(trace, start=first_seed)
    ]  # fmt: skip


def short_capped(trace, fraction, cap, rng):
    """The trace with `fraction` of its requests (drawn by `rng`) asking for at most `cap`
    new tokens, as a classifier's or a title generator's would, the rest unchanged: they
    nearly always stop at the cap, which says only that their output would run at least
    that long."""
    picked = rng.random(len(trace)) < fraction
    return [
        (arrival, dataclasses.replace(request, max_new_tokens=cap) if short else request)
        for (arrival, request), short in zip(trace, picked, strict=True)
    ]


def admission_stop_ids(answers, vocab, output_mean, short_prompt, rng):
    """The admission trace's stop ids: `answers="alike"`, one set for every request (mean
    output `output_mean`); "by_prompt", prompts under `short_prompt` tokens (questions)
    answering long (mean 2 * output_mean) and the others (documents) short (mean
    output_mean / 4), as a function of the prompt's length."""
    draw = lambda mean: tuple(int(t) for t in rng.choice(vocab, max(1, round(vocab / mean)), False))  # noqa: E731
    if answers == "alike":
        return draw(output_mean)
    long, short = draw(2 * output_mean), draw(output_mean / 4)
    return lambda prompt_length: long if prompt_length < short_prompt else short


def _trace_stats(token_times, total):
    """Total time, tokens/s and inter-token gaps from per-request token timestamps."""
    gaps = [b - a for times in token_times.values() for a, b in zip(times, times[1:], strict=False)]
    tokens = sum(map(len, token_times.values()))
    lengths = [len(times) for times in token_times.values()]
    return {
        "seconds": total,
        "tokens_per_sec": tokens / total,
        "output_length": {
            "mean": float(np.mean(lengths)),
            "p99": float(np.percentile(lengths, 99)),
        },
        "itl_median_ms": 1e3 * float(np.median(gaps)) if gaps else 0.0,
        "itl_p99_ms": 1e3 * float(np.percentile(gaps, 99)) if gaps else 0.0,
        "tokens": tokens,
    }


def run_continuous(
    model, trace, *, slots, max_length, token_budget, page_size=None, warmup=(),
    **engine_settings,
):  # fmt: skip
    """The engine fed as requests arrive; token timestamps per request, the cache entries
    its decode tokens read against their own lengths, preemptions, goodput and the
    requests missing each half of the SLA. The engine first serves `warmup` (another
    trace), uncounted: a server's history of finished requests, as admission uses it."""
    engine = Engine(model, slots=slots, max_length=max_length, token_budget=token_budget,
                    page_size=page_size, **engine_settings)  # fmt: skip
    counters = lambda: (engine.preemptions, engine.goodput_requests, engine.decode_pages_read)  # noqa: E731
    _feed(engine, warmup, slots, max_length, model.cfg)
    before = counters()
    rows = [] if page_size else None
    token_times, submitted, seconds, own, contiguous = _feed(
        engine, trace, slots, max_length, model.cfg, rows
    )
    stats = _trace_stats(token_times, seconds)
    preemptions, goodput, pages_read = (a - b for a, b in zip(counters(), before, strict=True))
    read = contiguous if page_size is None else pages_read * page_size
    return {
        **stats,
        "decode_reads_over_own_lengths": read / own,
        "preemptions": preemptions,
        "goodput_per_sec": goodput / stats["seconds"],
        "goodput_requests": goodput,
        **_sla_misses(token_times, submitted, engine_settings.get("sla")),
        **({} if rows is None else tpu_grid_steps(rows, slots, page_size, model.cfg)),
    }


def tpu_grid_steps(rows, slots, page_size, cfg) -> dict:
    """The paged TPU kernel's grid steps over the paged engine's rows, counted on the
    host after the timed run, per layer: each step calls the kernel for its decodes, and
    for its prompt chunks where it has some. Before, the grid was the host's list of the
    call's items padded to a power of two (`ragged_work`); now it is runs of up to
    `pages_per_step` pages of one group, at least one step a call (`step_pages`).

    The counts depend on the pages alone. lm_tiny's 2 kv heads of 64 share one
    128-lane tile, which the kernel reads for each (`ragged_paged_tpu.lane_span`); at
    head_dim 128 it takes the same 32 pages of 16 a step."""
    page_bytes = page_size * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    per_step = pages_per_step(page_size, page_bytes)
    items = before = now = 0
    for row in rows:
        offset = np.zeros(slots, np.int32)
        where = (row["segment_ids"][0], row["positions"][0], slots, offset, page_size)
        lists, counts = ragged_work(*where, cfg.attention_window)
        for call, (group, real) in enumerate(zip(lists[0::2], counts, strict=True)):
            if call and not real:
                continue  # no prompt chunks: no chunk call
            items += real
            before += len(group)
            now += max(int((-(-np.bincount(group[:real]) // per_step)).sum()), 1)
    counts = {"items": items, "before": before, "pages_per_step": per_step, "now": now}
    return {"tpu_grid_steps": counts}


def _feed(engine, trace, slots, max_length, cfg, rows=None):
    """Submit the trace's requests as they arrive and step the engine until it is idle:
    (token timestamps per request, submission times, seconds, decode tokens' own lengths,
    entries the one-stretch cache reads for them); each step's row appended to `rows`."""
    token_times, submitted, pending = {}, {}, list(trace)
    own = contiguous = 0
    start = time.perf_counter()
    while pending or not engine.idle:
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            submitted[engine.submit(pending.pop(0)[1])] = time.perf_counter()
        if engine.idle:
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        steps = engine.steps
        for event in engine.step():
            token_times.setdefault(event.request_id, []).append(time.perf_counter())
        if rows is not None and engine.steps > steps:
            rows.append(engine.last_row)
        step_own, step_read = _decode_reads(engine, slots, max_length, cfg)
        own, contiguous = own + step_own, contiguous + step_read
    return token_times, submitted, time.perf_counter() - start, own, contiguous


# SLA scales at which goodput is also counted from the token timestamps (DistServe's
# "SLO scale", Zhong et al., OSDI 2024): both halves of the SLA times each.
SLA_SCALES = (0.25, 0.5, 1.0, 2.0)


def _sla_misses(token_times, submitted, sla) -> dict:
    """How many requests missed each half of `sla` (first token, time per later token),
    and how many met both at each of SLA_SCALES, from the token timestamps; {} without an
    SLA."""
    if sla is None:
        return {}
    first = np.array([times[0] - submitted[r] for r, times in token_times.items()])
    later = np.array([
        (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        for times in token_times.values()
    ])  # fmt: skip
    return {
        "late_first_token": int((first > sla[0]).sum()),
        "slow_later_tokens": int((later > sla[1]).sum()),
        "met_by_sla_scale": {
            scale: int(((first <= scale * sla[0]) & (later <= scale * sla[1])).sum())
            for scale in SLA_SCALES
        },
    }


def run_static(model, trace, *, slots, max_length):
    """Batches of `slots` requests in arrival order, each prefilled padded, decoded to the
    end (every slot's row computed until the batch's last request finishes); its decodes'
    cache reads over their own lengths."""
    engine = Engine(model, slots=slots, max_length=max_length, token_budget=slots + 1)
    token_times, own, read = {}, 0, 0
    start = time.perf_counter()
    for first in range(0, len(trace), slots):
        batch = trace[first : first + slots]
        time.sleep(max(0.0, batch[-1][0] - (time.perf_counter() - start)))  # wait for it
        events = engine.prefill([r for _, r in batch], packing="padded")
        while True:
            now = time.perf_counter()
            for event in events:
                token_times.setdefault(event.request_id, []).append(now)
            if engine.idle:
                break
            events = engine.step()
            step_own, step_read = _decode_reads(engine, slots, max_length, model.cfg)
            own, read = own + step_own, read + step_read
    stats = _trace_stats(token_times, time.perf_counter() - start)
    return {**stats, "decode_reads_over_own_lengths": read / own}


def bench_trace(model, padded_reads_model, trace, *, slots, token_budget, page_size, repeats=1):
    """Static batching vs the engine with chunked prefill (one stretch per slot, and
    paged) vs whole-prompt prefill: after one run of each (it compiles), `repeats`
    rounds of the variants in turn; `summarize_rounds`.

    Static batching runs twice: as static padded batching does (transformers' padded
    batch; `padded_reads_model`, whose attention reads every slot up to the batch's
    longest position in whole kv tiles, what lcx's engine did before its CPU reads went
    ragged), and with the engine's own ragged reads, each slot up to its own length (a
    stronger baseline than static padded batching).
    """
    longest_prompt = max(len(r.prompt) for _, r in trace)
    max_length = longest_prompt + max(r.max_new_tokens for _, r in trace)
    max_length = -(-max_length // 8) * 8
    whole_budget = slots + longest_prompt  # any prompt fits one step
    runs = {
        "static": lambda t: run_static(padded_reads_model, t, slots=slots, max_length=max_length),
        "static_ragged_reads": lambda t: run_static(model, t, slots=slots, max_length=max_length),
        "continuous_chunked": lambda t: run_continuous(
            model, t, slots=slots, max_length=max_length, token_budget=token_budget
        ),
        "continuous_whole_prompt": lambda t: run_continuous(
            model, t, slots=slots, max_length=max_length, token_budget=whole_budget
        ),
        "continuous_paged": lambda t: run_continuous(
            model,
            t,
            slots=slots,
            max_length=max_length,
            token_budget=token_budget,
            page_size=page_size,
        ),  # fmt: skip
    }
    for run in runs.values():
        run(trace)  # compiles every shape this variant meets (static: one per batch width)
    rounds = [{name: run(trace) for name, run in runs.items()} for _ in range(repeats)]
    return summarize_rounds(rounds, TRACE_RATIOS)


# The trace's throughput ratios: name -> (engine variant, baseline).
TRACE_RATIOS = {
    "throughput_ratio": ("continuous_chunked", "static"),
    "paged_throughput_ratio": ("continuous_paged", "static"),
    "throughput_ratio_ragged_static": ("continuous_chunked", "static_ragged_reads"),
    "paged_throughput_ratio_ragged_static": ("continuous_paged", "static_ragged_reads"),
}


def summarize_rounds(rounds, ratios) -> dict:
    """From rounds of runs ({variant: its run's results}): each variant's run of median
    throughput (the upper middle run for an even count) with the spread of its
    throughput, and for each of `ratios` the median (min-max) of the rounds' own ratios
    (a round's variants run minutes apart at most, so its ratio rides out the machine's
    slower hours better than times from different rounds)."""
    out = {"repeats": len(rounds)}
    for name in rounds[0]:
        done = sorted((r[name] for r in rounds), key=lambda r: r["tokens_per_sec"])
        out[name] = {**done[len(done) // 2], "tokens_per_sec_spread": spread(
            [r["tokens_per_sec"] for r in done])}  # fmt: skip
    for name, (variant, baseline) in ratios.items():
        paired = spread([r[variant]["tokens_per_sec"] / r[baseline]["tokens_per_sec"]
                         for r in rounds])  # fmt: skip
        out[name], out[f"{name}_spread"] = paired["median"], paired
    return out


def bench_admission(
    model, trace, warmup, *, slots, token_budget, page_size, pool_fraction, sla, repeats
):
    """FCFS vs Past-Future admission on a paged engine whose pool holds `pool_fraction` of
    `slots` full-length sequences, `repeats` times, the two alternating; each run's
    engine first serves `warmup` (it compiles, and Past-Future learns the lengths, as a
    server that has been up a while has). Each side's run of median goodput (the upper
    middle run for an even count), the spread of its goodput and preemptions, and the
    paired runs' goodput ratios (one overloaded run to the next swings by tens of
    percent on a 2-core CPU)."""
    longest = max(len(r.prompt) + r.max_new_tokens for _, r in [*trace, *warmup])
    max_length = -(-longest // 8) * 8
    per_sequence = -(-max_length // page_size)
    num_pages = max(per_sequence, int(pool_fraction * slots * per_sequence))
    runs = {"fcfs": [], "past_future": []}

    def run(admission):
        return run_continuous(
            model, trace, slots=slots, max_length=max_length, token_budget=token_budget,
            page_size=page_size, num_pages=num_pages, admission=admission, sla=sla,
            warmup=warmup,
        )  # fmt: skip

    for _ in range(repeats):
        for admission, done in runs.items():
            done.append(run(admission))
    out = {"num_pages": num_pages, "repeats": repeats}
    for admission, done in runs.items():
        median = sorted(done, key=lambda r: r["goodput_per_sec"])[len(done) // 2]
        out[admission] = {
            **median,
            "goodput_spread": spread([r["goodput_per_sec"] for r in done]),
            "preemptions_spread": spread([r["preemptions"] for r in done]),
        }
    ratios = [
        p["goodput_per_sec"] / max(f["goodput_per_sec"], 1e-9)
        for f, p in zip(runs["fcfs"], runs["past_future"], strict=True)
    ]
    out["goodput_ratio_spread"] = spread(ratios)
    out["goodput_ratio"] = out["goodput_ratio_spread"]["median"]
    # The same paired ratio with the SLA scaled, counted on the benchmark's clocks.
    rate = lambda r, scale: r["met_by_sla_scale"][scale] / r["seconds"]  # noqa: E731
    out["goodput_ratio_by_sla_scale"] = {
        scale: spread([
            rate(p, scale) / max(rate(f, scale), 1e-9)
            for f, p in zip(runs["fcfs"], runs["past_future"], strict=True)
        ])
        for scale in SLA_SCALES
    }  # fmt: skip
    return out


# ---- 4. multi-turn chat ----------------------------------------------------------------


def make_chats(documents, rng, conversations, turns, first_turn, later_turn):
    """Each conversation's user turns (token lists): a long first one (a system prompt and
    a question), then short ones."""
    lengths = [first_turn] + [later_turn] * (turns - 1)
    return [
        [cut_prompts(documents, rng, 1, n, shortest=n)[0] for n in lengths]
        for _ in range(conversations)
    ]


def run_chat(model, chats, *, answer, slots, max_length, token_budget, page_size, prefix_cache):
    """Every conversation at once, each turn sent (the whole conversation so far plus the
    new user turn) when its previous answer ends: time to first token per turn."""
    engine = Engine(model, slots=slots, max_length=max_length, token_budget=token_budget,
                    page_size=page_size, prefix_cache=prefix_cache)  # fmt: skip
    history, turn, sent, ttft, cached = [[] for _ in chats], [0] * len(chats), {}, [], 0

    def send(c):
        """Conversation c's next turn."""
        history[c] = history[c] + chats[c][turn[c]]
        sent[engine.submit(Request(history[c], answer))] = (c, time.perf_counter())

    for c in range(len(chats)):
        send(c)
    while not engine.idle:
        for event in engine.step():
            c, at = sent[event.request_id]
            if at is not None:  # the turn's first token
                ttft.append(time.perf_counter() - at)
                cached += event.cached_tokens
                sent[event.request_id] = (c, None)
            if event.done:
                history[c] = history[c] + engine.results[event.request_id]
                turn[c] += 1
                if turn[c] < len(chats[c]):
                    send(c)
    return {"ttft_mean_ms": 1e3 * float(np.mean(ttft)), "turns": len(ttft),
            "cached_tokens": cached}  # fmt: skip


def bench_chat(model, chats, *, answer, slots, token_budget, page_size):
    """The chat trace with and without the prefix cache (both paged), second of two runs."""
    longest = max(sum(map(len, chat)) + answer * len(chat) for chat in chats)
    common = dict(answer=answer, slots=slots, max_length=-(-longest // 8) * 8,
                  token_budget=token_budget, page_size=page_size)  # fmt: skip
    out = {}
    for name, prefix_cache in (("no_cache", False), ("prefix_cache", True)):
        run_chat(model, chats, prefix_cache=prefix_cache, **common)  # compiles
        out[name] = run_chat(model, chats, prefix_cache=prefix_cache, **common)
    out["ttft_ratio"] = out["prefix_cache"]["ttft_mean_ms"] / out["no_cache"]["ttft_mean_ms"]
    return out


# ---- 5. speculative decoding ----------------------------------------------------------


def passages(documents, rng, n, shortest, longest):
    """n passages of [shortest, longest] tokens cut from random documents at random places."""
    out = []
    for i in rng.choice(len(documents), n):
        doc = documents[i]
        length = min(int(rng.integers(shortest, longest + 1)), len(doc))
        start = int(rng.integers(0, len(doc) - length + 1))
        out.append(doc[start : start + length].astype(np.int32).tolist())
    return out


def train_to_quote(cfg, documents, rng, *, steps, length, batch=16, copies=3):
    """A model of `cfg`'s shape trained for `steps` AdamW steps on passages of `length`
    tokens written `copies` times, so that after a prompt quoting a passage twice its
    greedy answer quotes it again, as a copy-heavy trace needs: a model that has learned
    to copy (induction heads, Olsson et al., 2022), which random weights have not. (With
    passages of mixed lengths 150 steps were not enough.)"""
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3, weight_decay=0.0), wrt=nnx.Param)
    for _ in range(steps):
        tokens, segment_ids = np.zeros((2, batch, copies * length + 1), np.int32)
        for row, passage in enumerate(passages(documents, rng, batch, length, length)):
            quoted = passage * copies
            tokens[row, : len(quoted)], segment_ids[row, : len(quoted)] = quoted, 1
        _quote_step(model, optimizer, jnp.asarray(tokens), jnp.asarray(segment_ids))
    return model


@nnx.jit
def _quote_step(model, optimizer, tokens, segment_ids):
    """One AdamW step on next-token cross-entropy inside each row's passage."""

    def loss_fn(model):
        logits = model(tokens[:, :-1], segment_ids[:, :-1])
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
        real = segment_ids[:, 1:] > 0
        return jnp.sum(nll * real) / jnp.sum(real)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def bench_speculative(model, draft, prompts, *, new_tokens, k, n, repeats):
    """Greedy decoding of copy-heavy prompts (each a passage quoted twice, by a model that
    quotes) without speculation, with n-gram speculation and with a small draft model:
    decode tokens/s (the prompts prefilled first, prepacked, and not timed), engine
    steps, acceptance. The variants take turns, one run each per round, so drift in the
    machine's speed falls on all of them."""
    max_length = -(-(max(map(len, prompts)) + new_tokens) // 8) * 8
    methods = {
        "plain": None,
        "ngram": {"method": "ngram", "k": k, "n": n},
        "draft": {"method": "draft", "k": k, "draft": draft},
    }

    def run(speculative):
        """One batch prefilled, then decoded to the end: (outputs, engine, seconds of the
        decode steps)."""
        engine = Engine(model, slots=len(prompts), max_length=max_length,
                        token_budget=len(prompts) * 17, speculative=speculative)  # fmt: skip
        engine.prefill([Request(p, new_tokens) for p in prompts])
        start = time.perf_counter()
        results = engine.run()
        seconds = time.perf_counter() - start
        return [results[i] for i in range(len(prompts))], engine, seconds

    for speculative in methods.values():
        run(speculative)  # compiles
    runs = {name: [] for name in methods}
    for _ in range(repeats):
        for name, speculative in methods.items():
            runs[name].append(run(speculative))
    out = {}
    for name, done in runs.items():
        seconds = spread([r[2] for r in done])
        outputs, engine, _ = done[-1]
        out[name] = {
            "seconds": seconds,
            "tokens_per_sec": len(prompts) * (new_tokens - 1) / seconds["median"],
            "steps": engine.steps,
            "acceptance": engine.accepted_tokens / max(engine.drafted_tokens, 1),
            "outputs": outputs,
        }
    plain = out["plain"].pop("outputs")
    out["same_outputs"] = all(out[name].pop("outputs") == plain for name in ("ngram", "draft"))
    out["quoted"] = float(np.mean([_quoted(p, o) for p, o in zip(prompts, plain, strict=True)]))
    out["speedup"] = out["ngram"]["tokens_per_sec"] / out["plain"]["tokens_per_sec"]
    out["draft_speedup"] = out["draft"]["tokens_per_sec"] / out["plain"]["tokens_per_sec"]
    return out


def _quoted(prompt, output) -> float:
    """The share of an answer's tokens that continue the prompt's quote: the prompt is a
    passage twice, and quoting goes on with the passage from its start."""
    passage = prompt[: len(prompt) // 2]
    expected = (passage * (len(output) // max(len(passage), 1) + 1))[: len(output)]
    return float(np.mean(np.asarray(expected) == np.asarray(output)))


# ---- driver --------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefill_prompts", type=int, default=64)
    parser.add_argument("--prompt_cap", type=int, default=1024)
    parser.add_argument("--decode_batch", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=100.0, help="arrivals per second")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--token_budget", type=int, default=128)
    parser.add_argument("--output_mean", type=float, default=32)
    parser.add_argument("--page_size", type=int, default=16, help="the paged engine's")
    parser.add_argument("--json", default="")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--first_turn", type=int, default=512, help="tokens")
    parser.add_argument("--later_turn", type=int, default=32, help="tokens")
    parser.add_argument("--answer", type=int, default=16, help="tokens per chat answer")
    parser.add_argument(
        "--pool_fraction", type=float, default=0.35, help="admission: slots x max_length's"
    )
    parser.add_argument(
        "--answers", default="alike", choices=("alike", "by_prompt"),
        help="admission: every request's output length drawn alike, or by its prompt's "
        "length (questions answer long, documents short)",
    )  # fmt: skip
    parser.add_argument("--short_prompt", type=int, default=64, help="tokens: a question's")
    parser.add_argument(
        "--short_caps", type=float, default=0.0,
        help="admission: the fraction of requests asking for at most --short_cap new tokens",
    )  # fmt: skip
    parser.add_argument("--short_cap", type=int, default=4, help="admission: new tokens")
    parser.add_argument("--sla_ttft", type=float, default=2.0, help="seconds")
    parser.add_argument("--sla_per_token", type=float, default=0.05, help="seconds")
    parser.add_argument("--spec_batch", type=int, default=8)
    parser.add_argument("--spec_tokens", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--spec_k", type=int, default=6, help="drafts per step")
    parser.add_argument("--spec_n", type=int, default=5, help="n-gram: the longest match")
    parser.add_argument("--spec_passage", type=int, default=64, help="tokens, quoted twice")
    parser.add_argument("--draft_layers", type=int, default=2, help="the draft model's")
    parser.add_argument("--draft_width", type=int, default=128, help="the draft's d_model")
    parser.add_argument(
        "--copy_steps", type=int, default=150, help="training the speculative model to quote"
    )
    parser.add_argument(
        "--only",
        default="prefill,decode,trace,chat,speculative,admission",
        help="comparisons to run",
    )
    parser.add_argument("--implementation", default=None, help="model.attention_implementation")
    # float32: on a CPU, XLA's bfloat16 matmuls at serving sizes run about 2x slower.
    parser.add_argument("--dtype", default="float32", help="model.dtype")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats = min(args.repeats, 2)  # --repeats=1 stays 1
        args.prefill_prompts, args.prompt_cap = 8, 64
        args.decode_batch, args.prefix, args.new_tokens = 4, 32, 3
        args.requests, args.slots, args.token_budget, args.output_mean = 10, 3, 16, 4
        args.rate = 200.0
        args.conversations, args.turns, args.first_turn, args.later_turn = 2, 2, 40, 8
        args.answer = 4
        args.spec_batch, args.spec_tokens, args.copy_steps = 2, 8, 1
        args.draft_layers, args.draft_width = 2, 32  # the smoke model's shape: one compile
        args.spec_passage = 16

    model, config = build_model(args.smoke, args.implementation, args.dtype)
    documents = corpus_documents(config)
    only = set(args.only.split(","))
    results = {"settings": vars(args)}
    if "prefill" in only:
        rng = np.random.default_rng(args.seed)
        prompts = cut_prompts(documents, rng, args.prefill_prompts, args.prompt_cap)
        results["prefill"] = bench_prefill(model, prompts, args.repeats)
    if "decode" in only:
        rng = np.random.default_rng(args.seed + 1)
        prefix = max(documents, key=len)[: args.prefix].astype(np.int32).tolist()
        suffixes = cut_prompts(documents, rng, args.decode_batch, 32, shortest=4)
        results["decode"] = bench_decode(model, prefix, suffixes, args.new_tokens, args.repeats)
    if "trace" in only:
        rng = np.random.default_rng(args.seed + 2)
        trace = make_trace(
            documents, rng, args.requests, args.rate, args.prompt_cap // 2, args.output_mean,
            4 * args.output_mean,
        )  # fmt: skip
        padded_reads_model, _ = build_model(args.smoke, "xla_chunked", args.dtype)
        results["trace"] = bench_trace(
            model, padded_reads_model, trace, slots=args.slots,
            token_budget=args.token_budget, page_size=args.page_size, repeats=args.repeats,
        )  # fmt: skip
    if "chat" in only:
        rng = np.random.default_rng(args.seed + 3)
        chats = make_chats(documents, rng, args.conversations, args.turns, args.first_turn,
                           args.later_turn)  # fmt: skip
        results["chat"] = bench_chat(
            model, chats, answer=args.answer, slots=args.slots, token_budget=args.token_budget,
            page_size=args.page_size,
        )  # fmt: skip
    if "admission" in only:
        rng = np.random.default_rng(args.seed + 5)
        trace = make_trace(
            documents, rng, args.requests, args.rate, args.prompt_cap // 4, 2 * args.output_mean,
            8 * args.output_mean,
        )  # fmt: skip
        warmup = make_trace(
            documents, np.random.default_rng(args.seed + 6), args.requests, args.rate,
            args.prompt_cap // 4, 2 * args.output_mean, 8 * args.output_mean,
        )  # fmt: skip
        stop_ids = admission_stop_ids(
            args.answers, model.cfg.vocab_size, 2 * args.output_mean, args.short_prompt, rng
        )
        trace = open_ended(trace, stop_ids, 8 * args.output_mean)
        warmup = open_ended(warmup, stop_ids, 8 * args.output_mean, first_seed=len(trace))
        if args.short_caps:
            trace = short_capped(trace, args.short_caps, args.short_cap, rng)
            warmup = short_capped(warmup, args.short_caps, args.short_cap, rng)
        results["admission"] = bench_admission(
            model, trace, warmup, slots=args.slots, token_budget=args.token_budget,
            page_size=args.page_size, pool_fraction=args.pool_fraction,
            sla=(args.sla_ttft, args.sla_per_token), repeats=args.repeats,
        )  # fmt: skip
    if "speculative" in only:
        rng = np.random.default_rng(args.seed + 4)
        length = args.spec_passage
        quoted = passages(documents, rng, args.spec_batch, length, length)
        prompts = [p + p for p in quoted]  # an answer that quotes its prompt can be drafted
        train = dict(steps=args.copy_steps, length=length)
        quoting = train_to_quote(model.cfg, documents, rng, **train)
        width = args.draft_width
        mlp = model.cfg.mlp_dim * width // model.cfg.d_model
        small = dataclasses.replace(
            model.cfg, num_layers=args.draft_layers, d_model=width, mlp_dim=mlp
        )
        # The smoke run's draft has the model's shape: the model itself serves.
        draft = quoting if small == model.cfg else train_to_quote(small, documents, rng, **train)
        results["speculative"] = bench_speculative(
            quoting, draft, prompts, new_tokens=args.spec_tokens, k=args.spec_k, n=args.spec_n,
            repeats=args.repeats,
        )  # fmt: skip
    report(results, argv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _short_caps(settings) -> str:
    """The admission trace's short max_new_tokens, if any requests have them."""
    if not settings["short_caps"]:
        return ""
    return f"; {settings['short_caps']:.0%} of requests capped at {settings['short_cap']}"


def report(results, argv):
    """Markdown tables of the comparisons that ran, with the command."""
    print(f"\n`python benchmarks/generate.py {' '.join(argv or sys.argv[1:])}`".rstrip() + "\n")
    for name, table in REPORTS.items():
        if name in results:
            table(results)


def _report_prefill(results):
    """The prefill table."""
    p = results["prefill"]
    print(
        f"Prefill of {results['settings']['prefill_prompts']} prompts ({p['prompt_tokens']} tokens)"
    )
    print("| packing | rows x length | seconds (median, min-max) | temp MiB |")
    print("|---|---|---|---|")
    for name in ("padded", "ffd"):
        r = p[name]
        s = r["seconds"]
        print(f"| {name} | {r['rows']} x {r['row_length']} | {s['median']:.3f} "
              f"({s['min']:.3f}-{s['max']:.3f}) | {r['temp_mib']:.1f} |")  # fmt: skip
    print(f"prepacked speed-up: {p['speedup']:.2f}x\n")


def _report_decode(results):
    """The shared-prefix decode table."""
    d = results["decode"]
    print("| decode | tokens/s (median, min-max) |")
    print("|---|---|")
    for name in ("naive", "shared"):
        s = d[name]["tokens_per_sec"]
        print(f"| {name} | {s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f}) |")
    print(f"shared-prefix speed-up: {d['speedup']:.2f}x\n")


def _report_trace(results):
    """The request-trace table."""
    t = results["trace"]
    print("| trace | seconds | output tokens/s | ITL median ms | ITL p99 ms | decode reads "
          "/ own lengths |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    names = ("static", "static_ragged_reads", "continuous_chunked", "continuous_whole_prompt",
             "continuous_paged")  # fmt: skip
    for name in names:
        r = t[name]
        rate = r["tokens_per_sec_spread"]
        print(f"| {name} | {r['seconds']:.2f} | {r['tokens_per_sec']:.0f} "
              f"({rate['min']:.0f}-{rate['max']:.0f}) | "
              f"{r['itl_median_ms']:.1f} | {r['itl_p99_ms']:.1f} | "
              f"{r['decode_reads_over_own_lengths']:.2f} |")  # fmt: skip
    x = lambda name: "{median:.2f}x ({min:.2f}-{max:.2f})".format(**t[f"{name}_spread"])  # noqa: E731
    print(f"each variant's run of median throughput of {t['repeats']} (min-max); per round, "
          f"median (min-max): continuous / static throughput: {x('throughput_ratio')} "
          f"(paged: {x('paged_throughput_ratio')}); over static with ragged reads: "
          f"{x('throughput_ratio_ragged_static')} (paged: "
          f"{x('paged_throughput_ratio_ragged_static')})")  # fmt: skip
    grid = t["continuous_paged"]["tpu_grid_steps"]
    fewer = grid["before"] / max(grid["now"], 1)
    print(f"the paged TPU kernel's grid steps over the paged run, per layer (counted): "
          f"{grid['items']} pages read, {grid['before']} steps at a page a step (padded "
          f"lists), {grid['now']} at up to "
          f"{grid['pages_per_step']} pages a step ({fewer:.1f}x fewer)")  # fmt: skip


def _report_chat(results):
    """The multi-turn chat table."""
    c, settings = results["chat"], results["settings"]
    print(f"\nMulti-turn chat: {settings['conversations']} conversations x {settings['turns']} "
          f"turns (first {settings['first_turn']} tokens, then {settings['later_turn']}; "
          f"answers {settings['answer']}), each turn resending the conversation")  # fmt: skip
    print("| prefix cache | turns | mean TTFT ms | prompt tokens from the cache |")
    print("|---|---|---|---|")
    for name in ("no_cache", "prefix_cache"):
        r = c[name]
        print(f"| {name} | {r['turns']} | {r['ttft_mean_ms']:.1f} | {r['cached_tokens']} |")
    print(f"TTFT with / without the prefix cache: {c['ttft_ratio']:.2f}")


def _report_speculative(results):
    """The speculative decoding table."""
    r, settings = results["speculative"], results["settings"]
    print(f"\nSpeculative decoding: {settings['spec_batch']} sequences (a passage quoted "
          f"twice), {settings['spec_tokens']} greedy tokens each, k={settings['spec_k']}, "
          f"n-gram n={settings['spec_n']}; "
          f"draft model: {settings['draft_layers']} layers of width {settings['draft_width']}, "
          f"trained as the model was")  # fmt: skip
    print("| decoding | seconds (median, min-max) | tokens/s | steps | acceptance |")
    print("|---|---|---|---|---|")
    for name in ("plain", "ngram", "draft"):
        x, s = r[name], r[name]["seconds"]
        print(f"| {name} | {s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) | "
              f"{x['tokens_per_sec']:.0f} | {x['steps']} | {x['acceptance']:.2f} |")  # fmt: skip
    print(f"n-gram / plain: {r['speedup']:.2f}x; draft model / plain: "
          f"{r['draft_speedup']:.2f}x; same tokens: {r['same_outputs']}; answers quoting "
          f"the prompt: {r['quoted']:.2f}")  # fmt: skip


def _report_admission(results):
    """The admission table: each side's run of median goodput, and the spreads."""
    a, settings = results["admission"], results["settings"]
    lengths = a["fcfs"]["output_length"]
    print(f"\nAdmission under a pool of {a['num_pages']} pages of {settings['page_size']} "
          f"(outputs ended by stop ids or caps: mean {lengths['mean']:.0f}, "
          f"p99 {lengths['p99']:.0f}, "
          f"cap {8 * settings['output_mean']:.0f}{_short_caps(settings)}); SLA: first token "
          f"<= {settings['sla_ttft']} s, later tokens <= {settings['sla_per_token']} s; "
          f"the run of median goodput of {a['repeats']}")  # fmt: skip
    print("| admission | seconds | output tokens/s | preemptions | first token late | later "
          "tokens slow | met the SLA | goodput req/s | goodput, all runs | preemptions, "
          "all runs |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("fcfs", "past_future"):
        r = a[name]
        g, p = r["goodput_spread"], r["preemptions_spread"]
        print(f"| {name} | {r['seconds']:.2f} | {r['tokens_per_sec']:.0f} | {r['preemptions']} | "
              f"{r['late_first_token']} | {r['slow_later_tokens']} | "
              f"{r['goodput_requests']} | {r['goodput_per_sec']:.2f} | "
              f"{g['min']:.2f}-{g['max']:.2f} | {p['min']}-{p['max']} |")  # fmt: skip
    ratio = a["goodput_ratio_spread"]
    print(f"goodput, past_future / fcfs, paired runs: median {ratio['median']:.2f}x "
          f"({ratio['min']:.2f}-{ratio['max']:.2f}x)")  # fmt: skip
    scaled = ", ".join(
        f"{scale:g}x SLA: {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}x)"
        for scale, r in a["goodput_ratio_by_sla_scale"].items()
    )
    print(f"the same at scaled SLAs (both halves; benchmark clocks): {scaled}")


# comparison -> its table, in the order they print
REPORTS = {
    "prefill": _report_prefill,
    "decode": _report_decode,
    "trace": _report_trace,
    "chat": _report_chat,
    "speculative": _report_speculative,
    "admission": _report_admission,
}


if __name__ == "__main__":
    main()
