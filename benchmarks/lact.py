"""A LaCT layer against a full causal attention layer of the same width, by row length.

    python benchmarks/lact.py                    # the BENCHMARKS.md run: T = 2K, 8K, 32K
    python benchmarks/lact.py --smoke            # seconds

Both layers take [1, T, d_model] and return the same shape; each is timed jitted,
forward alone and forward+backward (gradients of every parameter and of the input),
median of `--repeats` runs after a compile run, with the spread. The attention layer is
`lcx.model.Attention` (causal, RoPE, same width); on the CPU its attention runs through
the backend's default, `xla_chunked` (flash attention in XLA over the block schedule:
only the causal half, or the window's band, is computed; the reference's T x T scores
would need 16 GB at 32K). The LaCT layer is `lcx.ttt.LaCTLayer` with its sliding-window
branch (window = chunk, the paper's setting; its attention through the same
implementation). Reported: tokens/s, the scaling exponent p fitted to
time ~ T^p over the lengths, and the crossover length where the fits meet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from lcx.model import Attention, TransformerConfig  # noqa: E402
from lcx.ttt import FastWeights, LaCTConfig, LaCTLayer, lact_chunk_scan  # noqa: E402
from lcx.ttt.fast_weights import INNER_GRADIENTS  # noqa: E402


def make_layers(d_model: int, heads: int, chunk: int, seed: int = 0):
    """(attention layer, LaCT layer) of width d_model."""
    attn_cfg = TransformerConfig(
        d_model=d_model, num_heads=heads, num_kv_heads=heads, head_dim=d_model // heads
    )
    lact_cfg = LaCTConfig(
        d_model=d_model, num_heads=heads, fw_heads=max(1, heads // 2), chunk_size=chunk,
        window=chunk,
    )  # fmt: skip
    rngs = nnx.Rngs(seed)
    return {"attention": Attention(attn_cfg, rngs=rngs), "lact": LaCTLayer(lact_cfg, rngs=rngs)}


def _timed_fns(layer):
    """Jitted forward and forward+backward of a layer on (x, segment_ids, positions)."""
    graphdef, params = nnx.split(layer)

    def forward(params, x, seg, pos):
        return nnx.merge(graphdef, params)(x, seg, pos)

    def loss(params, x, seg, pos):
        return jnp.mean(jnp.square(forward(params, x, seg, pos)))

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return params, {"forward": fwd, "forward+backward": fwd_bwd}


def _spread_ms(fn, args, repeats: int) -> dict:
    """Median, min and max wall time in ms after one compile run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - t0))
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def fit_power_law(lengths, times) -> tuple[float, float]:
    """(p, c) of time = c * T^p, least squares in log-log."""
    p, log_c = np.polyfit(np.log(lengths), np.log(times), 1)
    return float(p), float(np.exp(log_c))


def crossover(fit_a, fit_b) -> float:
    """T where c_a T^p_a = c_b T^p_b (inf when the exponents are equal)."""
    (pa, ca), (pb, cb) = fit_a, fit_b
    return float("inf") if pa == pb else float((cb / ca) ** (1.0 / (pa - pb)))


def run(*, lengths, d_model=256, heads=4, chunk=2048, repeats=3, seed=0) -> dict:
    """Time both layers at every length; returns per-layer, per-mode spreads and fits."""
    layers = make_layers(d_model, heads, chunk, seed)
    rng = np.random.default_rng(seed)
    results = {name: {"forward": {}, "forward+backward": {}} for name in layers}
    for t in lengths:
        x = jnp.asarray(rng.standard_normal((1, t, d_model)), jnp.float32)
        seg = jnp.ones((1, t), jnp.int32)
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        for name, layer in layers.items():
            params, fns = _timed_fns(layer)
            for mode, fn in fns.items():
                spread = _spread_ms(fn, (params, x, seg, pos), repeats)
                spread["tokens_per_sec"] = t / (spread["median"] / 1e3)
                results[name][mode][t] = spread
    fits = {}
    for mode in ("forward", "forward+backward"):
        for name in layers:
            times = [results[name][mode][t]["median"] for t in lengths]
            fits[(name, mode)] = fit_power_law(lengths, times)
    return {
        "settings": dict(d_model=d_model, heads=heads, chunk=chunk, window=chunk, repeats=repeats),
        "lengths": list(lengths),
        "results": results,
        "fits": fits,
        "crossover": {
            mode: crossover(fits[("attention", mode)], fits[("lact", mode)])
            for mode in ("forward", "forward+backward")
        },
    }


def inner_gradient_timing(t: int, *, heads=2, head_dim=128, chunk=2048, repeats=3, seed=0):
    """Forward+backward ms of the fast-weight scan with hand vs autodiff inner gradients."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    w = FastWeights(*(normal(heads, head_dim, head_dim) / head_dim**0.5 for _ in range(3)))
    q, k, v = (normal(1, heads, t, head_dim) for _ in range(3))
    lr = jnp.full((1, heads, t, 3), 0.01, jnp.float32)
    mom = jnp.full((1, heads, t), 0.5, jnp.float32)
    seg = jnp.ones((1, t), jnp.int32)
    timings = {}
    for name in INNER_GRADIENTS:

        def loss(w, q, k, v, name=name):
            out = lact_chunk_scan(
                w, q, k, v, lr, mom, seg, chunk_size=chunk, use_muon=True, inner_gradient=name
            )
            return jnp.mean(jnp.square(out))

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        timings[name] = _spread_ms(fn, (w, q, k, v), repeats)
    return timings


def markdown_table(result: dict) -> str:
    """Tokens/s per layer, mode and length; exponents and the crossover."""
    lengths = result["lengths"]
    head = " | ".join(f"T={t:,}" for t in lengths)
    lines = [f"| layer | pass | {head} | exponent p |", "|---" * (3 + len(lengths)) + "|"]
    for mode in ("forward", "forward+backward"):
        for name in ("attention", "lact"):
            cells = []
            for t in lengths:
                s = result["results"][name][mode][t]
                cells.append(f"{s['tokens_per_sec']:,.0f} tok/s ({s['min']:.0f}-{s['max']:.0f} ms)")
            p = result["fits"][(name, mode)][0]
            lines.append(f"| {name} | {mode} | {' | '.join(cells)} | {p:.2f} |")
    for mode, t_cross in result["crossover"].items():
        lines.append(f"\ncrossover ({mode}): LaCT faster beyond T = {t_cross:,.0f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="T = 64, 128; chunk 32")
    args = parser.parse_args(argv)
    lengths = [int(t) for t in args.lengths.split(",")]
    if args.smoke:
        lengths, args.d_model, args.heads, args.chunk, args.repeats = [64, 128], 32, 2, 32, 2
    result = run(
        lengths=lengths, d_model=args.d_model, heads=args.heads, chunk=args.chunk,
        repeats=args.repeats,
    )  # fmt: skip
    command = "python benchmarks/lact.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{command.strip()}` on {jax.devices()[0].device_kind}, {os.cpu_count()} cores\n")
    print(", ".join(f"{k}={v}" for k, v in result["settings"].items()) + "\n")
    print(markdown_table(result))
    t_inner = lengths[1] if len(lengths) > 1 else lengths[0]
    result["inner_gradient"] = inner_gradient_timing(
        t_inner, chunk=args.chunk, head_dim=args.d_model // max(1, args.heads // 2),
        repeats=args.repeats,
    )  # fmt: skip
    cells = ", ".join(
        f"{name} {s['median']:.0f} ms ({s['min']:.0f}-{s['max']:.0f})"
        for name, s in result["inner_gradient"].items()
    )
    print(f"\nfast-weight scan forward+backward at T={t_inner:,}, inner gradient: {cells}")
    return result


if __name__ == "__main__":
    main()
