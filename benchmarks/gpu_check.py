"""On a GPU: the packed attention kernels checked against float64 and timed against cuDNN.

    python benchmarks/gpu_check.py --out "$OUT"    # the device run (a few minutes)
    python benchmarks/gpu_check.py --smoke         # any machine, interpret mode, tiny sizes

On the device tool's lent GPU (JAX 0.11 with CUDA there; this script needs only jax and
numpy): one `run` of `PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT`
with timeout_s=540. The timing stops starting new cases after `--timing_budget_s`
(240 s), so the whole run fits one call and leaves device time to rerun it once.

One process in three parts; the tables come last, everything is in OUT/gpu_check.json.

1. `correctness`: `pallas_gpu` and `xla_chunked` on the device against the float64
   reference on the host (`lcx.attention.testing`): values, log-sum-exp and the gradients
   of q, k and v, in float32 and bfloat16, on fresh random packed rows with padding, 8
   query / 2 kv heads (GQA), causal, with a window, and a chunk of queries against a
   longer key row. Relative error ||got - want|| / ||want||: float32 must stay under
   1e-4 (TF32 lands near 3e-4), bfloat16 under 2e-2 (its operands' rounding). Then the
   serving engine's ragged paged read (`lcx.paged_cache`, issue 30) by its `pallas_gpu`
   kernel against the XLA path in float64, with one query per slot and with verify rows
   of a token and 4 drafts per slot, its work lists listed on the host and built in the
   step (as the engine on a GPU builds them: padded past the real items).
2. `ceilings`: a bf16 matrix product and a device-to-device copy, measured, for the two
   floors of each timed case (METHOD.md of the device tool): useful FLOPs over the
   product's rate, and bytes over the copy's bandwidth (each input read once, each output
   written once).
3. `timing`: forward and forward+backward in bf16, head dim 128, 32 query / 8 kv heads,
   one row of 4K, 16K, 32K and 64K tokens holding documents of exponential length (mean
   512, mean 4K) or one document: `pallas_gpu`; `xla_chunked` (up to 16K: its scan runs
   one XLA loop step per tile); JAX's bundled Pallas attention with segment ids (kv heads
   repeated, since it has no GQA); cuDNN's dense causal attention over the same length
   (it cannot skip documents, so one timing per length serves every layout). Each is
   warmed up, then run over rotating sets of fresh random inputs until a time budget;
   median (min-max) ms. Useful TFLOP/s counts visible score entries only: 4 * D * Hq per
   entry forward, 3.5 times that forward+backward (five products backward, two forward).

Targets (issue 15): `pallas_gpu` on one document at least 50% of cuDNN's throughput; on
32K rows of mean-512 documents at least 5x faster than cuDNN's dense causal.
A case that fails (a lowering error on a new JAX, say) is recorded with its error and
the run goes on; the exit status is 1 if a correctness check failed or errored.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lcx.attention import BlockSizes, packed_attention, pallas_gpu  # noqa: E402
from lcx.attention import testing as checks  # noqa: E402
from lcx.paged_cache import (  # noqa: E402
    PagedAttentionCache,
    PageLayout,
    paged_cache_attention,
    ragged_work,
)

LIMITS = {"float32": 1e-4, "bfloat16": 2e-2}  # relative error, every output and gradient
CHECKED = ("pallas_gpu", "xla_chunked")
SIZES = {  # the device run, and the smoke run's (interpret mode on a CPU)
    "full": dict(
        dtypes=("float32", "bfloat16"), check_len=1024, check_heads=(8, 2, 128),
        lengths=(4096, 16384, 32768, 65536), means=(512, 4096, 0), heads=(32, 8, 128),
        chunked_up_to=16384, matmul=8192, copy_mib=1024, budget_s=1.0, max_repeats=30,
        blocks=None, paged_widths=(1, 5),
    ),
    "smoke": dict(
        dtypes=("float32",), check_len=32, check_heads=(2, 1, 16), lengths=(128,),
        means=(32, 0), heads=(2, 1, 16), chunked_up_to=128, matmul=256, copy_mib=1,
        budget_s=0.0, max_repeats=1, blocks=BlockSizes(block_q=16, block_kv=16),
        paged_widths=(5,),  # tests/test_paged_kernel.py checks the kernels at both
    ),
}  # fmt: skip
PRIORITY = ((32768, 512), (32768, 0))  # the two targets' cases run first


def _one_line(error: BaseException) -> str:
    """`Type: first line of the message`, for the JSON and the table."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0][:300] if message else ''}"


def _attempt(fn):
    """fn() or {"error": ...}; the traceback goes to stderr."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - one broken case must not end the run
        traceback.print_exc()
        return {"error": _one_line(error)}


# ---- 1. correctness ----------------------------------------------------------------


def _graded(record, result, dtype) -> dict:
    """`record` with an attempt's relative errors (ok: under dtype's limit) or its error."""
    if "error" in result:
        return {**record, **result, "ok": False}
    worst = max(result.values())
    return {**record, "errors": result, "worst": worst, "ok": bool(worst < LIMITS[dtype])}


def check_cases(rng, t):
    """(name, packed_attention keyword arguments, Tq, Tk) of the checked layouts."""
    seg = checks.random_layout(rng, 2, t)
    pos = checks.document_positions(seg)
    causal = dict(segment_ids=seg, q_positions=pos, kv_positions=pos)
    chunk, tq = checks.chunk_against_earlier_chunks(rng, 2, t, t // 4)
    return [
        ("packed rows, causal", causal, t, t),
        (f"packed rows, window {t // 8}", dict(causal, window=t // 8), t, t),
        (f"{tq} queries against a {t}-token row", chunk, tq, t),
    ]


def _errors(got, want):
    """Relative error of out, lse (where a key was seen) and dq, dk, dv."""
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = got, want
    seen = np.isfinite(ref_lse)
    errors = {"out": checks.relative_error(out, ref_out)}
    same_seen = np.array_equal(np.isfinite(lse), seen)
    errors["lse"] = checks.relative_error(lse[seen], ref_lse[seen]) if same_seen else float("inf")
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        errors[name] = checks.relative_error(g, ref)
    return errors


def check_correctness(size, interpret, seed):
    """Every checked implementation, dtype and layout against the float64 reference."""
    rng = np.random.default_rng(seed)
    hq, hkv, d = size["check_heads"]
    host = jax.devices("cpu")[0]
    records = []
    for dtype in size["dtypes"]:
        for case, call, tq, tk in check_cases(rng, size["check_len"]):
            q, k, v = checks.qkv(rng, 2, tq, hq, hkv, d, jnp.dtype(dtype), tk=tk)
            w = checks.weights(rng, q)
            with jax.default_device(host):
                want = checks.reference_values_and_grads(q, k, v, w, **call)
            for name in CHECKED:
                kernel = dict(interpret=interpret, block_sizes=size["blocks"])
                extra = kernel if name == "pallas_gpu" else {}

                def fn(q, k, v, name=name, call=call, extra=extra):
                    return packed_attention(q, k, v, implementation=name, return_lse=True,
                                            **call, **extra)  # fmt: skip

                record = dict(dtype=dtype, implementation=name, case=case)
                args = (fn, q, k, v, w)
                result = _attempt(
                    lambda a=args, want=want: _errors(checks.values_and_grads(*a), want)
                )
                records.append(_graded(record, result, dtype))
    return records


def check_paged(size, interpret, seed):
    """The serving engine's ragged paged read (`lcx.paged_cache`) by the `pallas_gpu`
    kernel against its XLA path in float64 on the host: decode rows of one query per
    slot and of a token and 4 drafts per slot, prompt-chunk blocks, shuffled pages; the
    kernel's work lists from the host (`ragged_work`) and from the step (`work_in_graph`,
    what the engine passes it on a GPU)."""
    rng = np.random.default_rng(seed + 1)
    hq, hkv, d = size["check_heads"]
    slots, page, per_slot, blocks = 4, 16, 8, 2
    pages = slots * per_slot
    table = rng.permutation(pages).reshape(slots, per_slot).astype(np.int32)
    host = jax.devices("cpu")[0]
    records = []
    for dtype, width, listed in itertools.product(
        size["dtypes"], size["paged_widths"], ("host", "step")
    ):
        # Slots 0-2 decode at lengths up to the table's reach; slot 3 prefills a chunk.
        decode = slots * width
        seg = np.zeros(decode + blocks * 16, np.int32)
        pos = np.zeros_like(seg)
        for s, last in enumerate(rng.integers(width, per_slot * page - 1, 3)):
            seg[s * width : (s + 1) * width] = s + 1
            pos[s * width : (s + 1) * width] = np.arange(last - width + 1, last + 1)
        seg[decode : decode + 24], pos[decode : decode + 24] = 4, np.arange(40, 64)
        lists, _ = ragged_work(seg, pos, slots, np.zeros(slots), page, None, decode)
        lists = lists if listed == "host" else (None,) * 4
        k, v = (rng.standard_normal((pages, page, hkv, d)) for _ in range(2))
        q = rng.standard_normal((1, len(seg), hq, d))

        def read(q, k, v, implementation, dtype, seg=seg, pos=pos, lists=lists, decode=decode):
            layout = PageLayout(
                jnp.asarray(table), *(x if x is None else jnp.asarray(x) for x in lists)
            )
            cache = PagedAttentionCache(jnp.asarray(k, dtype), jnp.asarray(v, dtype))
            return paged_cache_attention(
                jnp.asarray(q, dtype), jnp.asarray(seg)[None], jnp.asarray(pos)[None],
                cache, layout, decode_rows=decode, implementation=implementation,
                interpret=interpret and implementation != "xla",
            )  # fmt: skip

        with jax.enable_x64(True), jax.default_device(host):
            want = [np.asarray(x) for x in read(q, k, v, "xla", jnp.float64)]
        rows = "decode rows" if width == 1 else f"verify rows of {width}"
        case = f"paged read, {rows}, lists from the {listed}"
        record = dict(dtype=dtype, implementation="pallas_gpu", case=case)

        def errors(q=q, k=k, v=v, want=want, dtype=dtype):
            out, lse = (np.asarray(x, np.float64) for x in read(q, k, v, "pallas_gpu", dtype))
            seen = np.isfinite(want[1])
            return {"out": checks.relative_error(out, want[0]),
                    "lse": checks.relative_error(lse[seen], want[1][seen])}  # fmt: skip

        records.append(_graded(record, _attempt(errors), dtype))
    return records


# ---- 2. ceilings -------------------------------------------------------------------


def _median_seconds(fn, args_sets, budget_s, max_repeats, min_repeats=3):
    """Seconds per call: median, min, max over rotating argument sets after a warm-up."""
    for args in args_sets[:2]:  # compile, then one warm call on another set
        jax.block_until_ready(fn(*args))
    times, start = [], time.perf_counter()
    while len(times) < max(1, max_repeats) and (
        len(times) < min(min_repeats, max_repeats) or time.perf_counter() - start < budget_s
    ):
        args = args_sets[len(times) % len(args_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "repeats": len(times)}  # fmt: skip


def measure_ceilings(size, rng):
    """The bf16 product rate (FLOP/s) and the copy bandwidth (bytes/s) of this device."""
    n = size["matmul"]
    mats = [[jnp.asarray(rng.standard_normal((n, n)), jnp.bfloat16) for _ in range(2)]
            for _ in range(2)]  # fmt: skip
    product = _median_seconds(jax.jit(jnp.matmul), mats, size["budget_s"], 20)
    elements = size["copy_mib"] * 2**20 // 2
    arrays = [(jnp.asarray(rng.standard_normal(elements), jnp.bfloat16),) for _ in range(2)]
    copy = _median_seconds(jax.jit(lambda x: x + 1), arrays, size["budget_s"], 20)
    return {
        "matmul_flops_per_s": 2 * n**3 / product["median"],
        "copy_bytes_per_s": 2 * 2 * elements / copy["median"],  # read and write, 2 B each
        "matmul_n": n,
        "copy_mib": size["copy_mib"],
    }


# ---- 3. timing ---------------------------------------------------------------------


def layout(row_len, mean, seed):
    """Segment ids [1, T]: exponential documents of `mean` tokens, or one (mean 0)."""
    if mean == 0:
        return np.ones((1, row_len), np.int32)
    return checks.exponential_rows(row_len, 1, mean, seed=seed)


def visible_entries(seg) -> float:
    """Causal (query, key) pairs inside documents: sum of L (L + 1) / 2."""
    _, lengths = np.unique(seg[seg != 0], return_counts=True)
    return float(np.sum(lengths.astype(np.float64) * (lengths + 1) / 2))


def _kernels(hq, hkv, size, interpret, on_gpu):
    """name -> fn(q, k, v, segment ids) -> out of every timed implementation."""
    blocks = size["blocks"]
    kernels = {
        "pallas_gpu": lambda q, k, v, ids: packed_attention(
            q, k, v, ids, implementation="pallas_gpu", interpret=interpret, block_sizes=blocks
        ),
        "xla_chunked": lambda q, k, v, ids: packed_attention(
            q, k, v, ids, implementation="xla_chunked"
        ),
    }
    try:
        from jax.experimental.pallas.ops.gpu.attention import mha
    except ImportError:  # pragma: no cover - depends on the installed JAX
        mha = None
    if mha is not None:
        group = hq // hkv

        def bundled(q, k, v, ids):
            """JAX's Pallas GPU attention: no GQA, so the kv heads are repeated."""
            k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
            return mha(q, k, v, ids, sm_scale=q.shape[-1] ** -0.5, causal=True,
                       interpret=interpret)  # fmt: skip

        kernels["jax_pallas_mha"] = bundled
    dense = "cudnn" if on_gpu else "xla"  # on a CPU the same call path, without cuDNN
    kernels[f"dense_causal_{dense}"] = lambda q, k, v, ids: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=dense
    )
    return kernels


def _passes(fn):
    """Jitted forward, and forward+backward (gradients of q, k, v against a cotangent).

    The segment ids are an argument, so one compilation per length serves every layout.
    """

    def loss(q, k, v, ids, w):
        return jnp.sum(fn(q, k, v, ids).astype(jnp.float32) * w)

    grads = jax.grad(loss, argnums=(0, 1, 2))
    forward = jax.jit(lambda q, k, v, ids, w: fn(q, k, v, ids))
    return {"forward": forward, "forward+backward": jax.jit(grads)}


def _floors(seg, row_len, hq, hkv, d, ceilings):
    """Per pass: useful FLOPs, bytes moved at least, and the floor time (their larger)."""
    flops_fwd = 4.0 * d * hq * visible_entries(seg)
    q_bytes, kv_bytes, lse_bytes = row_len * hq * d * 2, row_len * hkv * d * 2, row_len * hq * 4
    fwd_bytes = 2 * q_bytes + 2 * kv_bytes + lse_bytes  # q, k, v in; out, lse out
    # Backward: q, k, v, out, dout, lse in; dq, dk, dv out.
    bwd_bytes = 3 * q_bytes + 2 * kv_bytes + lse_bytes + q_bytes + 2 * kv_bytes
    out = {}
    both = fwd_bytes + bwd_bytes
    for name, flops, moved in (("forward", flops_fwd, fwd_bytes),
                               ("forward+backward", 3.5 * flops_fwd, both)):  # fmt: skip
        flop_floor = flops / ceilings["matmul_flops_per_s"]
        byte_floor = moved / ceilings["copy_bytes_per_s"]
        out[name] = dict(flops=flops, bytes=moved, flop_floor_s=flop_floor,
                         byte_floor_s=byte_floor, floor_s=max(flop_floor, byte_floor))  # fmt: skip
    return out


def time_cases(size, interpret, on_gpu, ceilings, rng, budget_s):
    """Every (length, layout) case: each implementation's time per pass, with its floor."""
    hq, hkv, d = size["heads"]
    cases = [(t, m) for t in size["lengths"] for m in size["means"]]
    cases = [c for c in PRIORITY if c in cases] + [c for c in cases if c not in PRIORITY]
    kernels = _kernels(hq, hkv, size, interpret, on_gpu)
    jitted = {name: _passes(fn) for name, fn in kernels.items()}
    dense_times, records, start = {}, [], time.perf_counter()
    for row_len, mean in cases:
        seg = layout(row_len, mean, seed=row_len + mean)
        record = dict(row_len=row_len, layout=f"mean {mean}" if mean else "one document",
                      documents=int(len(np.unique(seg))), visible=visible_entries(seg),
                      floors=_floors(seg, row_len, hq, hkv, d, ceilings), times={})  # fmt: skip
        records.append(record)
        if time.perf_counter() - start > budget_s:
            record["not_run"] = f"the timing budget of {budget_s:.0f} s was spent"
            continue
        ids = jnp.asarray(seg)
        inputs = []
        for _ in range(2):
            q, k, v, w = (jnp.asarray(rng.standard_normal((1, row_len, h, d)), jnp.bfloat16)
                          for h in (hq, hkv, hkv, hq))  # fmt: skip
            inputs.append((q, k, v, ids, w))
        for name in kernels:
            if name == "xla_chunked" and row_len > size["chunked_up_to"]:
                record["times"][name] = {"not_run": f"above {size['chunked_up_to']} tokens"}
                continue
            if name.startswith("dense_causal") and row_len in dense_times:
                record["times"][name] = dense_times[row_len]  # the layout does not matter
                continue
            passes = {}
            for pass_name, program in jitted[name].items():
                timed = functools.partial(_median_seconds, program, inputs, size["budget_s"],
                                          size["max_repeats"])  # fmt: skip
                passes[pass_name] = _attempt(timed)
            record["times"][name] = passes
            if name.startswith("dense_causal"):
                dense_times[row_len] = passes
    return records


def targets(records, dense):
    """The issue's two targets, per case that ran: ratios against the dense causal time."""
    out = []
    for r in records:
        ours, theirs = r["times"].get("pallas_gpu", {}), r["times"].get(dense, {})
        for pass_name in ("forward", "forward+backward"):
            a, b = ours.get(pass_name, {}), theirs.get(pass_name, {})
            if "median" not in a or "median" not in b:
                continue
            speedup = b["median"] / a["median"]
            if r["layout"] == "one document":  # throughput ratio = time ratio, same FLOPs
                out.append(dict(target=f"one document: >= 50% of {dense}", row_len=r["row_len"],
                                pass_=pass_name, ratio=speedup, met=speedup >= 0.5))  # fmt: skip
            elif r["layout"] == "mean 512" and r["row_len"] == 32768:
                out.append(dict(target=f"32K, mean 512: >= 5x faster than {dense}",
                                row_len=r["row_len"], pass_=pass_name, ratio=speedup,
                                met=speedup >= 5.0))  # fmt: skip
    return out


# ---- report ------------------------------------------------------------------------


def _ms(entry) -> str:
    """`median (min-max)` ms, or why there is none."""
    if "median" in entry:
        return f"{1e3 * entry['median']:.3g} ({1e3 * entry['min']:.3g}-{1e3 * entry['max']:.3g})"
    return entry.get("error", entry.get("not_run", "-"))[:60]


def report(results) -> str:
    """Markdown: correctness, ceilings, timing and targets."""
    lines = ["", f"{results['device']}, jax {results['jax']}, `{results['command']}`", ""]
    lines += [
        "| dtype | implementation | case | worst relative error | ok |",
        "|---|---|---|---|---|",
    ]
    for r in results["correctness"] + results["paged"]:
        worst = f"{r['worst']:.2e}" if "worst" in r else r["error"][:80]
        lines.append(f"| {r['dtype']} | {r['implementation']} | {r['case']} | {worst} | "
                     f"{'yes' if r['ok'] else '**NO**'} |")  # fmt: skip
    c = results["ceilings"]
    rate, bandwidth = c["matmul_flops_per_s"] / 1e12, c["copy_bytes_per_s"] / 1e12
    lines += ["", f"Ceilings: bf16 product {rate:.3g} TFLOP/s ({c['matmul_n']}^3), copy "
              f"{bandwidth:.3g} TB/s.", ""]  # fmt: skip
    names = results["implementations"]
    header = " | ".join(f"{n} ms" for n in names)
    lines.append(f"| T | layout | pass | floor ms (flop / byte) | {header} | "
                 "pallas_gpu useful TFLOP/s |")  # fmt: skip
    lines.append("|---" * (5 + len(names)) + "|")
    for r in results["timing"]:
        for pass_name in ("forward", "forward+backward"):
            f = r["floors"][pass_name]
            floor = (f"{1e3 * f['floor_s']:.3g} ({1e3 * f['flop_floor_s']:.3g} / "
                     f"{1e3 * f['byte_floor_s']:.3g})")  # fmt: skip
            cells = [
                _ms(r["times"].get(n, {}).get(pass_name, r["times"].get(n, {}))) for n in names
            ]
            ours = r["times"].get("pallas_gpu", {}).get(pass_name, {})
            useful = f"{f['flops'] / ours['median'] / 1e12:.3g}" if "median" in ours else "-"
            if "not_run" in r:
                cells, useful = [r["not_run"]] * len(names), "-"
            lines.append(f"| {r['row_len']} | {r['layout']} | {pass_name} | {floor} | "
                         + " | ".join(cells) + f" | {useful} |")  # fmt: skip
    lines += ["", "| target | T | pass | ratio | met |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['row_len']} | {t['pass_']} | {t['ratio']:.2f}x | "
                     f"{'yes' if t['met'] else '**no**'} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (interpret on a CPU)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of the JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing_budget_s", type=float, default=240.0,
                        help="cases not started by then are recorded as not run")  # fmt: skip
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    interpret = not on_gpu  # the kernels' arithmetic in Pallas' interpreter on a CPU
    size = SIZES["smoke" if args.smoke else "full"]
    rng = np.random.default_rng(args.seed)
    results = {
        "command": "python benchmarks/gpu_check.py " + " ".join(argv or sys.argv[1:]),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "pallas_triton": pallas_gpu.plgpu is not None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"{results['device']}, jax {results['jax']}, Pallas Triton {results['pallas_triton']}",
          flush=True)  # fmt: skip
    t0 = time.perf_counter()
    results["correctness"] = check_correctness(size, interpret, args.seed)
    results["paged"] = check_paged(size, interpret, args.seed)
    results["correctness_s"] = time.perf_counter() - t0
    checked = results["correctness"] + results["paged"]
    ok = sum(r["ok"] for r in checked)
    print(f"correctness: {ok} of {len(checked)} ok "
          f"({results['correctness_s']:.0f} s)", flush=True)  # fmt: skip
    results["ceilings"] = measure_ceilings(size, rng)
    t0 = time.perf_counter()
    results["timing"] = time_cases(size, interpret, on_gpu, results["ceilings"], rng,
                                   args.timing_budget_s)  # fmt: skip
    results["timing_s"] = time.perf_counter() - t0
    results["implementations"] = list(dict.fromkeys(
        n for r in results["timing"] for n in r["times"]))  # fmt: skip
    dense = next((n for n in results["implementations"] if n.startswith("dense_causal")), "")
    results["targets"] = targets(results["timing"], dense)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(report(results), flush=True)
    return results


if __name__ == "__main__":
    done = main()
    sys.exit(0 if all(r["ok"] for r in done["correctness"] + done["paged"]) else 1)
