"""Pictures of what lcx does, for notebooks and scripts (matplotlib).

Each helper draws on `ax` (a matplotlib Axes; None: a new Figure's) and returns the Axes,
so notebooks pass `plt.subplots()` axes and scripts call `save(ax, path)`. No helper
touches pyplot or the backend: they build `matplotlib.figure.Figure`s directly, so they
run headless and never change a notebook's inline backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from lcx.attention.layout import block_schedule as kernel_block_schedule

DOCUMENT_COLORS = ListedColormap(
    ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f"]
)
PADDING_COLOR = "#f0f0f0"


def _axes(ax, size=(6, 3.5)):
    """`ax`, or the Axes of a new Figure of `size` inches."""
    if ax is not None:
        return ax
    return Figure(figsize=size).subplots()


def save(ax, path: str, *, dpi: int = 100) -> str:
    """Write the figure of `ax` as a PNG (or any format matplotlib knows by suffix)."""
    figure = ax.get_figure()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def _document_image(segment_ids) -> np.ma.MaskedArray:
    """Segment ids [R, T] as colour indices, padding masked (drawn in PADDING_COLOR)."""
    seg = np.asarray(segment_ids)
    starts = np.diff(seg, axis=1, prepend=-1) != 0  # colour by the order of runs in the row
    runs = (np.cumsum(starts, axis=1) - 1) % DOCUMENT_COLORS.N
    return np.ma.masked_where(seg == 0, runs)


def packed_rows(segment_ids, *, ax=None, title="Packed rows: one colour per document"):
    """Rows [R, T] (or one row [T]) as coloured document runs; padding is light grey."""
    seg = np.atleast_2d(np.asarray(segment_ids))
    ax = _axes(ax, (8, 0.5 + 0.35 * len(seg)))
    cmap = DOCUMENT_COLORS.with_extremes(bad=PADDING_COLOR)
    ax.imshow(
        _document_image(seg),
        aspect="auto",
        cmap=cmap,
        vmin=0,
        vmax=cmap.N - 1,
        interpolation="nearest",
    )
    ax.set_xlabel("token index in the row")
    ax.set_ylabel("row")
    ax.set_yticks(range(len(seg)))
    ax.set_title(title)
    return ax


def attention_mask(segment_ids, *, causal=True, ax=None):
    """The [T, T] mask of one packed row: query t sees key s (same document, s <= t)."""
    seg = np.asarray(segment_ids).reshape(-1)
    same = (seg[:, None] == seg[None, :]) & (seg[:, None] != 0)
    if causal:
        same &= np.tri(len(seg), dtype=bool)
    ax = _axes(ax, (4, 4))
    ax.imshow(same, cmap="Greys", interpolation="nearest")
    ax.set_xlabel("key index")
    ax.set_ylabel("query index")
    ax.set_title(f"Attention mask ({same.sum() / same.size:.1%} of T^2 visible)")
    return ax


def visited_blocks(segment_ids, *, block_q: int, block_kv: int, causal=True) -> np.ndarray:
    """bool [Tq / block_q, Tk / block_kv] of one row: the blocks the kernels visit."""
    seg = np.asarray(segment_ids).reshape(1, -1)
    sched = kernel_block_schedule(seg, block_q=block_q, block_kv=block_kv, causal=causal)
    lo, hi = np.asarray(sched.kv_lo)[0], np.asarray(sched.kv_hi)[0]
    kv = np.arange(seg.shape[1] // block_kv)
    return (kv[None, :] >= lo[:, None]) & (kv[None, :] <= hi[:, None])


def block_schedule(segment_ids, *, block_q: int, block_kv: int, causal=True, ax=None):
    """The kernels' block grid of one row: visited blocks dark, skipped ones light; the
    title gives the work ratio against a dense causal row."""
    visited = visited_blocks(segment_ids, block_q=block_q, block_kv=block_kv, causal=causal)
    n_q, n_kv = visited.shape
    dense = np.tri(n_q, n_kv, dtype=bool) if causal else np.ones_like(visited)
    ax = _axes(ax, (4, 4))
    ax.imshow(
        np.where(visited, 2, np.where(dense, 1, 0)),
        cmap="Blues",
        vmin=0,
        vmax=2,
        interpolation="nearest",
    )
    ax.set_xlabel(f"kv block ({block_kv} keys)")
    ax.set_ylabel(f"q block ({block_q} queries)")
    ax.set_title(f"Blocks visited: {visited.sum()} of {dense.sum()} dense causal")
    return ax


def length_histogram(lengths, *, edges=None, ax=None, title="Document lengths"):
    """Histogram of lengths on log-spaced bins; `edges` (e.g. bucket bounds) as lines."""
    lengths = np.asarray(lengths)
    lengths = lengths[lengths > 0]
    ax = _axes(ax)
    bins = np.geomspace(1, max(2, lengths.max()) * 1.01, 40)
    ax.hist(lengths, bins=bins, color=DOCUMENT_COLORS(0))
    for edge in edges if edges is not None else ():
        ax.axvline(edge, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("documents")
    ax.set_title(title)
    return ax


def bars(values: Mapping[str, float], *, ylabel: str, ax=None, title=""):
    """One bar per name (e.g. padding or attention work per packing strategy)."""
    ax = _axes(ax)
    names = list(values)
    colours = [DOCUMENT_COLORS(i % DOCUMENT_COLORS.N) for i in range(len(names))]
    ax.bar(names, [values[n] for n in names], color=colours)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    return ax


def curves(
    x,
    ys: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    ax=None,
    title="",
    logx=False,
    logy=False,
    marker=None,
):
    """One line per name over a shared x (schedules, batch sizes, throughput)."""
    ax = _axes(ax)
    for name, y in ys.items():
        ax.plot(x, y, label=name, marker=marker)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(ys) > 1:
        ax.legend()
    return ax


def loss_curve(records: Sequence[Mapping], *, ax=None, title="Loss"):
    """Training loss by step and eval loss points, from `read_metrics(workdir)` records."""
    ax = _axes(ax)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.legend()
    return ax


def loss_by_position(curves_by_name: Mapping[str, Sequence[Mapping]], *, ax=None):
    """Mean loss against token position, one line per name (`lcx.evals.loss_by_position`)."""
    ax = _axes(ax)
    for name, buckets in curves_by_name.items():
        kept = [b for b in buckets if b["loss"] is not None]
        middles = [max(1, (b["start"] + b["end"]) / 2) for b in kept]
        ax.plot(middles, [b["loss"] for b in kept], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("token position in the document (bucket middle)")
    ax.set_ylabel("mean loss (nats per token)")
    ax.set_title("Loss by position")
    ax.legend()
    return ax


def engine_timeline(rows: Sequence, *, ax=None):
    """Serving steps as stacked packed rows: step i's query tokens coloured by slot.

    `rows`: per step, the segment ids [W] of the engine's row (`Engine.last_row`); slot
    s + 1 is a colour, padding grey. Decode tokens sit in the first `slots` places,
    prompt chunks after them.
    """
    width = max(len(np.asarray(r).reshape(-1)) for r in rows)
    image = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        row = np.asarray(row).reshape(-1)
        image[i, : len(row)] = row
    ax = _axes(ax, (8, 4))
    cmap = DOCUMENT_COLORS.with_extremes(bad=PADDING_COLOR)
    shown = np.ma.masked_where(image == 0, (image - 1) % cmap.N)
    ax.imshow(shown, aspect="auto", cmap=cmap, vmin=0, vmax=cmap.N - 1, interpolation="nearest")
    ax.set_xlabel("query token in the step's row (decodes first, then prompt chunks)")
    ax.set_ylabel("engine step")
    ax.set_title("Engine timeline: one colour per slot")
    return ax
