"""`packed_attention`: one entry point, implementations chosen from a plain dict.

The Pallas TPU and GPU kernels register themselves in IMPLEMENTATIONS beside "xla";
`implementation=None` tries the best for the current backend and falls back on
NotImplementedError.
"""

from __future__ import annotations

import jax

from lcx.attention.kernel_common import check_runs_contiguous
from lcx.attention.pallas_gpu import gpu_implementation
from lcx.attention.pallas_tpu import tpu_implementation
from lcx.attention.reference import check_attention_args, reference_attention


def _xla(q, k, v, segment_ids, *, causal, window, scale, block_sizes, interpret):
    """The XLA implementation: the jnp reference."""
    del block_sizes, interpret
    return reference_attention(q, k, v, segment_ids, causal=causal, window=window, scale=scale)


IMPLEMENTATIONS = {
    "xla": _xla,
    "pallas_tpu": tpu_implementation,
    "pallas_gpu": gpu_implementation,
}

# Preference order per backend; names missing from IMPLEMENTATIONS are skipped.
PREFERENCE = {"tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla"), "cpu": ("xla",)}


def packed_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    causal=True,
    window=None,
    scale=None,
    implementation=None,
    block_sizes=None,
    interpret=False,
    validate=False,
):
    """Attention within documents of packed rows, [B, T, H, D] layout (see DESIGN.md).

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with Hq % Hkv == 0.
      segment_ids: int [B, T], 0 = padding, each document one contiguous run.
      causal, window, scale: masking and logit scale, as in `reference_attention`.
      implementation: a key of IMPLEMENTATIONS, or None for the best on this backend.
      block_sizes: kernel block sizes, passed to Pallas implementations.
      interpret: run Pallas kernels in interpret mode (CPU tests).
      validate: check on the host that no segment id reappears after another run
        (needs concrete segment_ids, so not under jit; it is not free).

    Returns:
      [B, T, Hq, D]; padding queries are 0.
    """
    check_attention_args(q, k, v, segment_ids, window)
    if validate and segment_ids is not None:
        check_runs_contiguous(segment_ids)
    kwargs = dict(
        causal=causal, window=window, scale=scale, block_sizes=block_sizes, interpret=interpret
    )
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation={implementation!r} is unknown; valid: {sorted(IMPLEMENTATIONS)}"
            )
        return IMPLEMENTATIONS[implementation](q, k, v, segment_ids, **kwargs)
    candidates = PREFERENCE.get(jax.default_backend(), ("xla",))
    for name in candidates:
        if name not in IMPLEMENTATIONS:
            continue
        try:
            return IMPLEMENTATIONS[name](q, k, v, segment_ids, **kwargs)
        except NotImplementedError:
            continue
    return IMPLEMENTATIONS["xla"](q, k, v, segment_ids, **kwargs)
