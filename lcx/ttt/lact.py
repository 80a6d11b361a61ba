"""The LaCT layer: large-chunk test-time training beside sliding-window attention, in NNX.

Zhang et al., "Test-Time Training Done Right" (arXiv 2505.23884); reference
a1600012888/LaCT (`lact_llm/lact_model/layer_lact_swiglu.py`,
`minimal_implementations/causal_lact_with_sliding_window_attn.py`).

One shared projection gives q, k, v. The attention branch applies RoPE and runs
causal sliding-window attention through `lcx.attention.packed_attention` (causality
inside a chunk comes from it; window >= chunk is recommended). The fast-weight branch
rescales q and k per channel, applies SiLU to q, k, v, L2-normalises q and k per head,
applies RoPE, and runs `lact_chunk_scan` with per-token learning rates
`softplus(x W_lr + softplus^-1(base_lr))` and optional momentum `sigmoid(x W_m + b)`.
Output: `o_proj(o_swa + RMSNorm(o_lact) * silu(x W_g + b_g))`, the gate per head.

Packed rows: segment ids restart the fast weights at every document (see
`lcx.ttt.fast_weights`) and bound the attention; positions drive RoPE.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lcx.attention import packed_attention
from lcx.cache import AttentionCache, cache_attention
from lcx.errors import UserError
from lcx.layers import DTYPES, apply_rope, constant_param, param, rms_normalise
from lcx.ttt.fast_weights import GRIDS, FastWeights, lact_chunk_scan, safe_norm
from lcx.ttt.state import LaCTCache, fast_weight_step


@dataclasses.dataclass(frozen=True)
class LaCTSettings:
    """`config.model.lact`: the LaCT layers' own knobs (defaults: the reference's minimal
    layer); the rest of a LaCTConfig comes from the model."""

    fw_heads: int = 2  # fast-weight heads; fast-weight head dim = d_model // fw_heads
    chunk_size: int = 2048
    window: int = 2048  # sliding window of the attention branch
    inter_multi: float = 1.0  # fast-weight hidden width = head dim * inter_multi
    momentum: bool = True
    muon: bool = True
    base_lr: float = 1e-2
    grid: str = "document"  # chunks counted from each document's start, or "row"

    @classmethod
    def of(cls, values) -> LaCTSettings:
        """A LaCTSettings from itself or a mapping (config.model.lact), keys checked."""
        if isinstance(values, cls):
            return values
        values = dict(values)
        valid = {f.name for f in dataclasses.fields(cls)}
        if set(values) - valid:
            raise UserError(
                f"model.lact: unknown {sorted(set(values) - valid)}; valid: {sorted(valid)}"
            )
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class LaCTConfig:
    """Hyper-parameters of one LaCT layer (defaults: the reference's minimal layer)."""

    d_model: int
    num_heads: int = 4  # sliding-window attention heads
    fw_heads: int = 2  # fast-weight heads; fast-weight head dim = d_model // fw_heads
    chunk_size: int = 2048
    window: int = 2048  # sliding window of the attention branch
    inter_multi: float = 1.0  # fast-weight hidden width = head dim * inter_multi
    use_momentum: bool = True
    use_muon: bool = True
    base_lr: float = 1e-2
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    num_layers: int = 1  # scales the output projection's initialisation
    dtype: str = "float32"
    attention_implementation: str | None = None
    grid: str = "document"  # chunks counted from each document's start, or "row"

    def __post_init__(self):
        if self.chunk_size <= 0:
            raise UserError(f"lact chunk_size={self.chunk_size} must be positive")
        if self.window < 1:
            raise UserError(f"lact window={self.window} must be >= 1")
        for name in ("num_heads", "fw_heads"):
            heads = getattr(self, name)
            if heads <= 0 or self.d_model % heads:
                raise UserError(
                    f"lact {name}={heads} must divide d_model={self.d_model} (head dim)"
                )
        if (self.d_model // self.num_heads) % 2 or (self.d_model // self.fw_heads) % 2:
            raise UserError(f"lact head dims of d_model={self.d_model} must be even for RoPE")
        if not self.base_lr > 0:
            raise UserError(f"lact base_lr={self.base_lr} must be positive")
        if self.inter_multi <= 0:
            raise UserError(f"lact inter_multi={self.inter_multi} must be positive")
        if self.dtype not in DTYPES:
            raise UserError(f"lact dtype={self.dtype!r}; valid: {sorted(DTYPES)}")
        if self.grid not in GRIDS:
            raise UserError(f"lact grid={self.grid!r}; valid: {GRIDS}")

    @property
    def fw_head_dim(self) -> int:
        return self.d_model // self.fw_heads

    @property
    def fw_hidden(self) -> int:
        return int(self.fw_head_dim * self.inter_multi)


def _l2_normalise(x):
    """x / (||x|| + 1e-5) over the last axis, as in the reference."""
    norm = safe_norm(x.astype(jnp.float32), axis=-1)
    return (x / (norm + 1e-5)).astype(x.dtype)


def _inverse_softplus(y: float) -> float:
    """softplus^-1(y) for y > 0."""
    return y + math.log(-math.expm1(-y))


class LaCTLayer(nnx.Module):
    """LaCT + sliding-window attention: `layer(x, segment_ids, positions) -> [B, T, E]`."""

    def __init__(self, cfg: LaCTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e, hf, d, f = cfg.d_model, cfg.fw_heads, cfg.fw_head_dim, cfg.fw_hidden
        std = e**-0.5
        self.w_qkv = param(rngs.params(), (e, 3, e), std, ("embed", None, "mlp"))
        self.qk_scale = constant_param(jnp.ones((2, e)), (None, "mlp"))
        self.qk_offset = constant_param(jnp.zeros((2, e)), (None, "mlp"))
        self.w_lr = param(rngs.params(), (e, hf, 3), std, ("embed", "heads", None))
        self.w_gate = param(rngs.params(), (e, hf), std, ("embed", "heads"))
        self.b_gate = constant_param(jnp.zeros((hf,)), ("heads",))
        if cfg.use_momentum:
            self.w_momentum = param(rngs.params(), (e, hf), std, ("embed", "heads"))
            self.b_momentum = constant_param(jnp.zeros((hf,)), ("heads",))
        # The fast weights' initial values are slow parameters.
        self.fw_w0 = param(rngs.params(), (hf, f, d), d**-0.5, ("heads", None, "head_dim"))
        self.fw_w1 = param(rngs.params(), (hf, d, f), f**-0.5, ("heads", "head_dim", None))
        self.fw_w2 = param(rngs.params(), (hf, f, d), d**-0.5, ("heads", None, "head_dim"))
        self.o_norm_scale = constant_param(jnp.ones((d,)), ("head_dim",))
        out_std = e**-0.5 / (2 * cfg.num_layers) ** 0.5
        self.w_o = param(rngs.params(), (e, e), out_std, ("mlp", "embed"))

    def __call__(
        self,
        x_BxTxE,
        segment_ids_BxT=None,
        positions_BxT=None,
        cache=None,
        *,
        attend_cache=True,
        prefixes=(),
        offset_S=None,
        decode_rows=0,
    ):
        """[B, T, E]; with `cache` (one row, an engine step), (output, the updated cache)."""
        if prefixes:
            raise NotImplementedError("LaCT layers take no shared prefix: its state is per slot")
        if cache is not None:
            if not attend_cache:
                raise NotImplementedError(
                    "LaCT layers prefill through engine steps (chunks that end on their "
                    "chunk grid), not prepacked rows"
                )
            return self._cached(x_BxTxE, segment_ids_BxT, positions_BxT, cache, decode_rows)
        cfg = self.cfg
        dt = DTYPES[cfg.dtype]
        b, t, e = x_BxTxE.shape
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones((b, t), jnp.int32)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = x_BxTxE.astype(dt)
        q, k, v = jnp.moveaxis(jnp.einsum("bte,ekf->btkf", x, self.w_qkv[...].astype(dt)), 2, 0)

        o_swa = self._sliding_window_attention(q, k, v, segment_ids_BxT, positions_BxT)
        o_lact = self._fast_weight_branch(x, q, k, v, segment_ids_BxT, positions_BxT)
        return (o_swa + o_lact) @ self.w_o[...].astype(dt)

    def init_cache(self, slots: int, length: int, dtype=None) -> LaCTCache:
        """Empty per-slot state: attention cache, fast weights, momentum, chunk buffer."""
        cfg = self.cfg
        hf, c, d = cfg.fw_heads, cfg.chunk_size, cfg.fw_head_dim
        per_slot = lambda x: jnp.broadcast_to(x, (slots, *x.shape))  # noqa: E731
        w = jax.tree.map(per_slot, self._initial_weights())
        zeros = lambda *shape: jnp.zeros((slots, hf, c, *shape), jnp.float32)  # noqa: E731
        head_dim = cfg.d_model // cfg.num_heads
        return LaCTCache(
            attention=AttentionCache.zeros(
                slots, length, cfg.num_heads, head_dim, dtype or DTYPES[cfg.dtype]
            ),
            w=w,
            momentum=jax.tree.map(jnp.zeros_like, w) if cfg.use_momentum else None,
            k=zeros(d),
            v=zeros(d),
            lr=zeros(3),
            momentum_rates=zeros(),
        )

    def _cached(self, x_BxTxE, segment_ids, positions, cache: LaCTCache, decode_rows):
        """One engine row: attention against the cache, fast weights per slot (see LaCTCache)."""
        cfg = self.cfg
        dt = DTYPES[cfg.dtype]
        b, t, e = x_BxTxE.shape
        x = x_BxTxE.astype(dt)
        q, k, v = jnp.moveaxis(jnp.einsum("bte,ekf->btkf", x, self.w_qkv[...].astype(dt)), 2, 0)
        heads = lambda a: a.reshape(b, t, cfg.num_heads, e // cfg.num_heads)  # noqa: E731
        qh = apply_rope(heads(q), positions, cfg.rope_theta)
        kh = apply_rope(heads(k), positions, cfg.rope_theta)
        attention = cache.attention.write(kh, heads(v), segment_ids, positions)
        o_swa, _ = cache_attention(
            qh,
            segment_ids,
            positions,
            attention,
            decode_rows=decode_rows,
            window=cfg.window,
            implementation=cfg.attention_implementation,
        )

        qf, kf, vf, lr, momentum = self._fast_weight_inputs(x, q, k, v, positions)
        state, out_TxHxD = fast_weight_step(
            cache,
            self._initial_weights(),
            qf[0],
            kf[0],
            vf[0],
            lr[0],
            None if momentum is None else momentum[0],
            segment_ids[0],
            positions[0],
            decode_rows=decode_rows,
            use_muon=cfg.use_muon,
        )
        o_lact = self._fast_weight_output(x, out_TxHxD[None].astype(jnp.float32))
        out = (o_swa.reshape(b, t, e) + o_lact) @ self.w_o[...].astype(dt)
        return out, state._replace(attention=attention)

    def _sliding_window_attention(self, q, k, v, segment_ids, positions):
        """Causal windowed attention of the shared q, k, v; [B, T, E]."""
        cfg = self.cfg
        b, t, e = q.shape
        heads = lambda x: x.reshape(b, t, cfg.num_heads, e // cfg.num_heads)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
        o = packed_attention(
            q,
            k,
            v,
            segment_ids,
            causal=True,
            window=cfg.window,
            implementation=cfg.attention_implementation,
        )
        return o.reshape(b, t, e)

    def _fast_weight_inputs(self, x, q, k, v, positions):
        """Fast-weight q, k, v [B, H, T, D], learning rates [B, H, T, 3], momentum [B, H, T]."""
        cfg = self.cfg
        dt = x.dtype
        b, t, e = x.shape
        hf, d = cfg.fw_heads, cfg.fw_head_dim
        scale, offset = self.qk_scale[...].astype(dt), self.qk_offset[...].astype(dt)
        q = jax.nn.silu(q * scale[0] + offset[0]).reshape(b, t, hf, d)
        k = jax.nn.silu(k * scale[1] + offset[1]).reshape(b, t, hf, d)
        v = jax.nn.silu(v).reshape(b, t, hf, d)
        q = apply_rope(_l2_normalise(q), positions, cfg.rope_theta)
        k = apply_rope(_l2_normalise(k), positions, cfg.rope_theta)

        x32 = x.astype(jnp.float32)
        lr_logits = jnp.einsum("bte,ehk->bhtk", x32, self.w_lr[...])
        lr = jax.nn.softplus(lr_logits + _inverse_softplus(cfg.base_lr))
        momentum = None
        if cfg.use_momentum:
            m = jnp.einsum("bte,eh->bht", x32, self.w_momentum[...]) + self.b_momentum[...][:, None]
            momentum = jax.nn.sigmoid(m)
        to_bhtd = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
        return to_bhtd(q), to_bhtd(k), to_bhtd(v), lr, momentum

    def _initial_weights(self) -> FastWeights:
        """The fast weights every sequence starts from (slow parameters)."""
        return FastWeights(self.fw_w0[...], self.fw_w1[...], self.fw_w2[...])

    def _fast_weight_output(self, x, out_BxTxHxD):
        """Normalised, gated fast-weight outputs [B, T, E] in x's dtype."""
        cfg = self.cfg
        b, t, e = x.shape
        normed = rms_normalise(out_BxTxHxD, cfg.norm_eps) * self.o_norm_scale[...]
        x32 = x.astype(jnp.float32)
        gate = jax.nn.silu(jnp.einsum("bte,eh->bth", x32, self.w_gate[...]) + self.b_gate[...])
        return (normed * gate[..., None]).astype(x.dtype).reshape(b, t, e)

    def _fast_weight_branch(self, x, q, k, v, segment_ids, positions):
        """Gated, normalised fast-weight outputs; [B, T, E]."""
        cfg = self.cfg
        q, k, v, lr, momentum = self._fast_weight_inputs(x, q, k, v, positions)
        out = lact_chunk_scan(
            self._initial_weights(),
            q,
            k,
            v,
            lr,
            momentum,
            segment_ids,
            chunk_size=cfg.chunk_size,
            use_muon=cfg.use_muon,
            grid=cfg.grid,
        )
        return self._fast_weight_output(x, jnp.swapaxes(out, 1, 2))
