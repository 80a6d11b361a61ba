"""benchmarks/generate.py at tiny size: the three comparisons run and report sane numbers."""

import math

import numpy as np

from benchmarks import generate as bench


def test_trace_rounds_give_each_variants_median_run_and_the_rounds_ratios():
    # Three rounds: the median run of each variant, and the median of the rounds' own
    # ratios (2, 2.5, 0.8: 2x), not the ratio of the medians (20 / 12).
    rounds = [
        {"engine": {"tokens_per_sec": a, "round": i}, "static": {"tokens_per_sec": b}}
        for i, (a, b) in enumerate([(10, 5), (30, 12), (20, 25)])
    ]
    out = bench.summarize_rounds(rounds, {"ratio": ("engine", "static")})
    assert out["repeats"] == 3 and out["engine"]["round"] == 2
    assert out["engine"]["tokens_per_sec_spread"] == {"median": 20, "min": 10, "max": 30}
    assert out["static"]["tokens_per_sec"] == 12
    assert out["ratio"] == 2.0 and out["ratio_spread"] == {"median": 2.0, "min": 0.8, "max": 2.5}
    # An even count: the upper middle run.
    assert bench.summarize_rounds(rounds[:2], {})["engine"]["round"] == 1


def test_generate_benchmark_runs(capsys):
    result = bench.main(["--smoke", "--repeats=1", "--short_caps=0.3"])
    prefill = result["prefill"]
    assert prefill["padded"]["rows"] == 8 and prefill["ffd"]["rows"] <= 8
    for name in ("padded", "ffd"):
        seconds = prefill[name]["seconds"]
        assert 0 < seconds["min"] <= seconds["median"] <= seconds["max"]
        assert prefill[name]["temp_mib"] > 0
    decode = result["decode"]
    for name in ("naive", "shared"):
        assert decode[name]["tokens_per_sec"]["median"] > 0
    trace = result["trace"]
    names = ("static", "static_ragged_reads", "continuous_chunked", "continuous_whole_prompt",
             "continuous_paged")  # fmt: skip
    tokens = {trace[name]["tokens"] for name in names}
    assert len(tokens) == 1  # every variant generates the trace's tokens exactly
    # Paged decode reads each slot's own pages: at most one part-filled page each over;
    # so does the one-stretch cache's on the CPU, a page being a run of its stretch (the
    # smoke cache is small: its decodes read it whole, the dense product).
    for name in ("continuous_paged", "continuous_chunked", "static_ragged_reads"):
        assert 1 <= trace[name]["decode_reads_over_own_lengths"] < 16
    # The paged TPU kernel's grid, counted over the paged run: fewer steps than pages.
    grid = trace["continuous_paged"]["tpu_grid_steps"]
    assert 0 < grid["now"] < grid["items"] <= grid["before"] and grid["pages_per_step"] > 1
    # Static padded batching reads every slot up to the batch's longest, in 128-entry tiles.
    padded_reads = trace["static"]["decode_reads_over_own_lengths"]
    assert padded_reads > trace["static_ragged_reads"]["decode_reads_over_own_lengths"]
    for name in names:
        row = trace[name]
        assert row["seconds"] > 0 and row["tokens_per_sec"] > 0
        assert 0 <= row["itl_median_ms"] <= row["itl_p99_ms"]
        rates = row["tokens_per_sec_spread"]  # of the rounds; this variant's median run
        assert rates["min"] <= row["tokens_per_sec"] <= rates["max"]
    ratio = trace["paged_throughput_ratio_spread"]  # per round: the paged over static
    assert ratio["min"] <= trace["paged_throughput_ratio"] == ratio["median"] <= ratio["max"]
    assert all(math.isfinite(result[k]["speedup"]) for k in ("prefill", "decode"))
    chat = result["chat"]  # the second turns find the first turns' pages
    assert chat["no_cache"]["cached_tokens"] == 0 < chat["prefix_cache"]["cached_tokens"]
    assert chat["prefix_cache"]["turns"] == chat["no_cache"]["turns"] == 4
    admission = result["admission"]
    assert admission["fcfs"]["tokens"] == admission["past_future"]["tokens"]
    assert admission["past_future"]["preemptions"] <= admission["fcfs"]["preemptions"]
    requests = result["settings"]["requests"]
    for name in ("fcfs", "past_future"):
        run = admission[name]
        assert 0 <= run["goodput_requests"] <= requests
        assert (
            0 <= run["late_first_token"] <= requests and 0 <= run["slow_later_tokens"] <= requests
        )
    speculative = result["speculative"]
    assert speculative["same_outputs"] and 0 <= speculative["ngram"]["acceptance"] <= 1
    assert 0 <= speculative["draft"]["acceptance"] <= 1 and 0 <= speculative["quoted"] <= 1
    assert speculative["draft"]["steps"] <= speculative["plain"]["steps"]
    assert speculative["ngram"]["steps"] <= speculative["plain"]["steps"]
    printed = capsys.readouterr().out
    assert "python benchmarks/generate.py --smoke" in printed
    assert printed.count("| static |") == 1
    assert "; 30% of requests capped at 4)" in printed


def test_sla_misses_count_each_half_from_the_timestamps():
    """Request 0: first token 0.5 s after submission, then 0.1 s a token; request 1: 5 s
    to its first token, then 0.5 s; request 2: one token, on time."""
    token_times = {0: [1.0, 1.1, 1.2], 1: [5.0, 5.5], 2: [0.3]}
    submitted = {0: 0.5, 1: 0.0, 2: 0.0}
    misses = bench._sla_misses(token_times, submitted, (2.0, 0.2))
    met = misses.pop("met_by_sla_scale")
    assert misses == {"late_first_token": 1, "slow_later_tokens": 1}
    # Both halves at 0.25x (0.5 s, 0.05 s): request 2 only; 0.5x to 2x: requests 0 and 2.
    assert met == {0.25: 1, 0.5: 2, 1.0: 2, 2.0: 2}
    misses = bench._sla_misses(token_times, submitted, (6.0, 0.05))
    assert misses["late_first_token"] == 0 and misses["slow_later_tokens"] == 2
    assert bench._sla_misses(token_times, submitted, None) == {}


def test_lact_grid_benchmark_runs(capsys):
    from benchmarks import lact_grid

    result = lact_grid.main(["--smoke", "--repeats=1"])
    for grid in ("row", "document"):
        assert 0 < result[grid]["min"] <= result[grid]["median"] <= result[grid]["max"]
    assert result["document_over_row"] > 0
    assert "| document |" in capsys.readouterr().out


def test_admission_answers_by_prompt_length():
    # "by_prompt": questions (under 64 tokens) stop on 3 of 384 ids (mean 128), documents
    # on 24 (mean 16); "alike": one set of 6 (mean 64) for all.
    rng = np.random.default_rng(0)
    stops = bench.admission_stop_ids("by_prompt", 384, 64, 64, rng)
    assert len(stops(63)) == 3 and len(stops(64)) == 24
    assert len(bench.admission_stop_ids("alike", 384, 64, 64, rng)) == 6
    # --short_caps: that share of the requests asks for at most --short_cap tokens.
    trace = [(float(i), bench.Request([1, 2], 256)) for i in range(1000)]
    capped = bench.short_capped(trace, 0.3, 16, rng)
    caps = [request.max_new_tokens for _, request in capped]
    assert set(caps) == {16, 256} and 250 < caps.count(16) < 350
    assert [arrival for arrival, _ in capped] == [arrival for arrival, _ in trace]


def test_tpu_grid_steps_count_what_the_kernel_runs():
    # Slot 0 decodes at 100 (7 pages of 16), slot 2 at 0 (1 page), slot 1 prefills 40-59
    # in two blocks of 16 queries (4 pages each): before, the host's lists padded to 8
    # items each; now a step per group (32 pages a step), the kernel's own step lists.
    from types import SimpleNamespace

    import jax.numpy as jnp

    from lcx.attention.ragged_paged_tpu import step_pages
    from lcx.paged_cache import ragged_work

    seg = np.array([1, 0, 3] + [2] * 20 + [0] * 12, np.int32)
    pos = np.array([100, 0, 0] + list(range(40, 60)) + [0] * 12, np.int32)
    cfg = SimpleNamespace(num_kv_heads=2, head_dim=128, dtype="bfloat16", attention_window=None)
    row = {"segment_ids": seg[None], "positions": pos[None]}
    grid = bench.tpu_grid_steps([row], 3, 16, cfg)["tpu_grid_steps"]
    assert grid == {"items": 16, "before": 16, "pages_per_step": 32, "now": 4}
    lists, _ = ragged_work(seg, pos, 3, np.zeros(3, np.int32), 16)
    table = jnp.zeros((3, 8), jnp.int32)
    slot_G = (jnp.arange(3), jnp.array([1, 1]))  # decode groups; slot 1's two blocks
    extents = [
        step_pages(jnp.asarray(group), jnp.asarray(page), slots, table, jnp.zeros(3, jnp.int32),
                   16, 32)[1]
        for group, page, slots in zip(lists[0::2], lists[1::2], slot_G, strict=True)
    ]  # fmt: skip
    assert sum(int(e) for e in extents) == grid["now"]
