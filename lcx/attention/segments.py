"""The segment layout of an attention call: defaults, argument checks, host validation.

Every implementation sees the same `Segments`: query and key segment ids and positions.
`kv_ids=None` means self-attention (keys carry the queries' ids) and `None` positions
mean "index in the row"; the block schedule uses those to stay O(T) on the common path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Segments(NamedTuple):
    """Segment ids and positions of the queries [B, Tq] and keys [B, Tk] (int32)."""

    q_ids: jax.Array
    kv_ids: jax.Array | None = None  # None: self-attention, the keys are the queries' ids
    q_positions: jax.Array | None = None  # None: the index in the row
    kv_positions: jax.Array | None = None

    @property
    def kv_ids_or_q(self):
        """The keys' segment ids (the queries' ids for self-attention)."""
        return self.q_ids if self.kv_ids is None else self.kv_ids

    def positions(self):
        """(q_positions, kv_positions) with the defaults filled in.

        A missing side is the index in the row, except in self-attention, where keys are
        the queries: there the side given stands for both.
        """
        (b, tq), tk = self.q_ids.shape, self.kv_ids_or_q.shape[1]
        q_pos, kv_pos = self.q_positions, self.kv_positions
        if self.kv_ids is None:
            q_pos = kv_pos if q_pos is None else q_pos
            kv_pos = q_pos if kv_pos is None else kv_pos
        if q_pos is None:
            q_pos = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq))
        if kv_pos is None:
            kv_pos = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (b, tk))
        return q_pos, kv_pos

    def filled(self) -> Segments:
        """Every field as an array (kernels that take all four)."""
        return Segments(self.q_ids, self.kv_ids_or_q, *self.positions())


def _shape_error(name, value, want):
    """A ValueError for an argument of the wrong shape."""
    return ValueError(f"{name} must be {want}; got {name}.shape={tuple(np.shape(value))}")


def check_attention_args(
    q,
    k,
    v,
    segment_ids=None,
    *,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
    window=None,
):
    """ValueError, naming the argument and the shapes, for calls attention cannot serve."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape=} {k.shape=} {v.shape=}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape=} {v.shape=}")
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q and k disagree on batch or head dim: {q.shape=} {k.shape=}")
    if hq % k.shape[2]:
        raise ValueError(f"query heads must be a multiple of kv heads: {q.shape=} {k.shape=}")
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError(
            "kv_segment_ids was given with segment_ids=None: pass the queries' segment_ids "
            f"[B, Tq] = {(b, tq)} too"
        )
    if kv_segment_ids is None and tq != tk:
        raise ValueError(
            f"queries and keys differ in length ({q.shape=} {k.shape=}): pass segment_ids "
            f"[B, Tq] = {(b, tq)} and kv_segment_ids [B, Tk] = {(b, tk)}"
        )
    for name, value, length in [
        ("segment_ids", segment_ids, tq),
        ("kv_segment_ids", kv_segment_ids, tk),
        ("q_positions", q_positions, tq),
        ("kv_positions", kv_positions, tk),
    ]:
        if value is not None and tuple(np.shape(value)) != (b, length):
            raise _shape_error(name, value, f"[B, T] = {(b, length)} for {q.shape=} {k.shape=}")
    if window is not None and window <= 0:
        raise ValueError(f"window must be a positive number of tokens or None; got {window=}")


def segments_of(q, k, segment_ids, kv_segment_ids, q_positions, kv_positions) -> Segments:
    """The call's Segments as int32 arrays; segment_ids=None is one document per row."""
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    return Segments(
        *(
            None if x is None else jnp.asarray(x, jnp.int32)
            for x in (segment_ids, kv_segment_ids, q_positions, kv_positions)
        )
    )


def validate_segments(segments: Segments) -> None:
    """Host check: each side's segments are contiguous runs with non-decreasing positions.

    Raises ValueError naming the argument, the row and the index. Needs concrete arrays
    (not under jit) and is not free.
    """
    filled = segments.filled()
    sides = [("segment_ids", "q_positions", filled.q_ids, filled.q_positions)]
    if segments.kv_ids is not None or segments.kv_positions is not None:
        sides.append(("kv_segment_ids", "kv_positions", filled.kv_ids, filled.kv_positions))
    for ids_name, pos_name, ids, positions in sides:
        ids, positions = np.asarray(jax.device_get(ids)), np.asarray(jax.device_get(positions))
        for row in range(ids.shape[0]):
            _check_row(ids[row], positions[row], row, ids_name, pos_name)


def _check_row(ids, positions, row, ids_name, pos_name):
    """ValueError at the first reappearing segment or decreasing position of one row."""
    starts = np.flatnonzero(np.diff(ids, prepend=ids[0] - 1))
    run_ids = ids[starts]
    seen = set()
    for start, run_id in zip(starts, run_ids, strict=True):
        if run_id != 0 and run_id in seen:
            raise ValueError(
                f"{ids_name} row {row}, index {start}: segment {run_id} reappears after another "
                "run; each document must be one contiguous run"
            )
        seen.add(run_id)
    same = (ids[1:] == ids[:-1]) & (ids[1:] != 0)
    bad = np.flatnonzero(same & (positions[1:] < positions[:-1]))
    if bad.size:
        i = int(bad[0]) + 1
        raise ValueError(
            f"{pos_name} row {row}, index {i}: position {positions[i]} after {positions[i - 1]} "
            f"inside segment {ids[i]}; positions must not decrease within a segment"
        )
