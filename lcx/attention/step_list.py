"""Compacted work lists for the TPU kernels: one grid step per scheduled block, in windows.

A grid over every (q block, kv block) pair pays a grid step for each skipped pair (2x to
284x the computed blocks on packed rows). Instead, the kernels walk a list of the
scheduled pairs only, the pattern of tokamax's dynamic splash attention: entry e names a
group (row b and the block whose output it accumulates, flattened as b * n + i), the
block it visits, and flags (first / last step of the group, compute or not, full or
masked tile). A group's entries are consecutive, so its output block is written once.
A group with nothing to visit (padding) keeps one entry that computes nothing, so its
output is still written (zeros, lse -inf).

The list is built from the block schedule's intervals, O(entries), and never stored
whole: scalar-prefetched arrays live in the TPU's SMEM (1 MiB per core on v4 to v6e),
too small for the pairs of a long row (a 1M-token document at block 128 has 33.5M). The
kernels therefore run over windows of at most `capacity` entries cut at group
boundaries, one `pallas_call` each with a dynamic grid extent (the window's length),
inside a `lax.while_loop`; outputs are aliased through the windows, each of which writes
whole groups.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

FIRST, LAST, COMPUTE, FULL = 1, 2, 4, 8  # flag bits of an entry
# 3 int32 per entry: 16,384 entries are 192 KiB of SMEM.
DEFAULT_CAPACITY = 16_384


class StepList(NamedTuple):
    """One window of the work list: int32 [capacity] each; entries past `length` unused."""

    group: jax.Array
    block: jax.Array
    flags: jax.Array
    length: jax.Array  # int32 [1], the grid extent


class Groups(NamedTuple):
    """A schedule's intervals flattened over (row, block): int32 [G] each, offsets [G + 1]."""

    lo: jax.Array
    hi: jax.Array
    full_lo: jax.Array
    full_hi: jax.Array
    offsets: jax.Array  # exclusive prefix sum of each group's entries


def groups_of(lo, hi, full_lo, full_hi) -> Groups:
    """Groups of a [B, n] schedule: one entry per block visited, at least one per group."""
    flat = [x.reshape(-1).astype(jnp.int32) for x in (lo, hi, full_lo, full_hi)]
    entries = jnp.maximum(flat[1] - flat[0] + 1, 1)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(entries, dtype=jnp.int32)])
    return Groups(*flat, offsets)


def grid_steps(lo, hi):
    """Grid steps per row of the compacted kernel: visited blocks, or 1 for empty groups."""
    return jnp.sum(jnp.maximum(hi - lo + 1, 1), axis=-1)


def step_window(groups: Groups, first_group, capacity: int):
    """(StepList of the groups from `first_group` that fit `capacity`, next first group)."""
    offsets = groups.offsets
    n_groups = groups.lo.shape[0]
    start = offsets[first_group]
    # Groups [first_group, end) end within the window: offsets[end] <= start + capacity.
    end = jnp.searchsorted(offsets, start + capacity, side="right").astype(jnp.int32) - 1
    end = jnp.minimum(end, n_groups)
    entry = start + jnp.arange(capacity, dtype=jnp.int32)
    group = jnp.searchsorted(offsets, entry, side="right").astype(jnp.int32) - 1
    group = jnp.clip(group, first_group, jnp.maximum(end - 1, first_group))
    k = entry - offsets[group]
    lo, hi = groups.lo[group], groups.hi[group]
    computes = hi >= lo
    block = jnp.where(computes, lo + k, 0)
    full = (block >= groups.full_lo[group]) & (block <= groups.full_hi[group])
    last = entry == offsets[group + 1] - 1
    flags = (
        jnp.where(k == 0, FIRST, 0)
        | jnp.where(last, LAST, 0)
        | jnp.where(computes, COMPUTE, 0)
        | jnp.where(computes & full, FULL, 0)
    )
    length = (offsets[end] - start).reshape(1)
    return StepList(group, block, flags.astype(jnp.int32), length), end


def run_windows(groups: Groups, capacity: int, call, outputs, *, longest_group: int):
    """outputs = call(step_list, outputs) over every window of the list, in order.

    `longest_group`: an upper bound on any group's entries (the number of blocks on the
    other side); windows hold at least that many entries, so every window makes progress.
    """
    capacity = max(capacity, longest_group)

    def body(state):
        first_group, outs = state
        steps, next_group = step_window(groups, first_group, capacity)
        return next_group, tuple(call(steps, outs))

    def more(state):
        return state[0] < groups.lo.shape[0]

    _, outputs = jax.lax.while_loop(more, body, (jnp.int32(0), tuple(outputs)))
    return outputs
