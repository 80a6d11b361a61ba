"""The single-device implementations of packed attention and the choice among them.

`IMPLEMENTATIONS` maps a name to `fn(q, k, v, segments, *, causal, window, scale,
block_sizes, interpret) -> (out, lse)`; `attend_segments` runs the named one, or with
`implementation=None` the backend's preferred ones in order (`PREFERENCE`), falling
back to the next on NotImplementedError. `packed_attention` (lcx.attention.api) and each
step of ring attention (lcx.attention.ring) call it, so the ring needs nothing from api.
"""

from __future__ import annotations

import jax

from lcx.attention.pallas_gpu import gpu_implementation
from lcx.attention.pallas_tpu import tpu_implementation
from lcx.attention.reference import reference_attention
from lcx.attention.xla_chunked import xla_chunked_implementation


def _xla(q, k, v, segments, *, causal, window, scale, block_sizes, interpret):
    """The XLA reference: the whole Tq x Tk score matrix."""
    del block_sizes, interpret
    return reference_attention(
        q,
        k,
        v,
        segments.q_ids,
        kv_segment_ids=segments.kv_ids,
        q_positions=segments.q_positions,
        kv_positions=segments.kv_positions,
        causal=causal,
        window=window,
        scale=scale,
        return_lse=True,
    )


IMPLEMENTATIONS = {
    "xla": _xla,
    "xla_chunked": xla_chunked_implementation,
    "pallas_tpu": tpu_implementation,
    "pallas_gpu": gpu_implementation,
}

# Preference order per backend; names missing from IMPLEMENTATIONS are skipped.
PREFERENCE = {
    "tpu": ("pallas_tpu", "xla_chunked"),
    "gpu": ("pallas_gpu", "xla_chunked"),
    "cpu": ("xla_chunked",),
}
FALLBACK = "xla_chunked"


def attend_segments(q, k, v, segments, *, implementation=None, **kwargs):
    """(out, lse) of `IMPLEMENTATIONS[implementation]`, or of the first that serves.

    `kwargs`: causal, window, scale, block_sizes, interpret.
    """
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation={implementation!r} is unknown; valid: {sorted(IMPLEMENTATIONS)}"
            )
        return IMPLEMENTATIONS[implementation](q, k, v, segments, **kwargs)
    for name in PREFERENCE.get(jax.default_backend(), ()):
        if name in IMPLEMENTATIONS:
            try:
                return IMPLEMENTATIONS[name](q, k, v, segments, **kwargs)
            except NotImplementedError:
                continue
    return IMPLEMENTATIONS[FALLBACK](q, k, v, segments, **kwargs)
