"""Decoder-only Transformer in Flax NNX for packed rows.

RMSNorm, rotary position embeddings (RoFormer, arXiv 2104.09864) driven by per-document
`positions`, SwiGLU feed-forward (Shazeer, arXiv 2002.05202), grouped-query attention
(arXiv 2305.13245) through `lcx.attention.packed_attention`.

Shape letters: B batch, T time, H query heads, K kv heads, D head dim, E model width,
F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lcx.attention import packed_attention

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Model hyper-parameters; built as `TransformerConfig(**config.model)`."""

    vocab_size: int = 384
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    mlp_dim: int = 768
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype; parameters stay float32
    attention_implementation: str | None = None  # None = best for the backend
    attention_window: int | None = None

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; valid: {sorted(_DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of "
                f"model.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
        for name in ("vocab_size", "d_model", "num_layers", "head_dim", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]


def _param(key, shape, stddev, names):
    """A normally initialised parameter tagged with logical axis names.

    Sharding is applied by the caller's jit out_shardings (lcx.train.sharding), so
    eager sharding, which would need a mesh at construction time, is off.
    """
    value = nnx.initializers.normal(stddev)(key, shape, jnp.float32)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def apply_rope(x_BxTxHxD, positions_BxT, theta):
    """Rotate channel pairs (first half, second half) by position-dependent angles."""
    d = x_BxTxHxD.shape[-1]
    freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) / (d // 2))
    angle_BxTx1xF = (positions_BxT[..., None].astype(jnp.float32) * freq)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxTx1xF), jnp.cos(angle_BxTx1xF)
    x1, x2 = jnp.split(x_BxTxHxD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxD.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale, computed in float32."""

    def __init__(self, dim, *, eps, rngs):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(
            jnp.ones((dim,), jnp.float32), out_sharding=("embed",), eager_sharding=False
        )

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...]).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention over packed rows."""

    def __init__(self, cfg: TransformerConfig, *, rngs):
        self.cfg = cfg
        e, h, k, d = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = e**-0.5
        self.w_q = _param(rngs.params(), (e, h, d), std, ("embed", "heads", "head_dim"))
        self.w_k = _param(rngs.params(), (e, k, d), std, ("embed", "kv_heads", "head_dim"))
        self.w_v = _param(rngs.params(), (e, k, d), std, ("embed", "kv_heads", "head_dim"))
        out_std = (h * d) ** -0.5 / (2 * cfg.num_layers) ** 0.5
        self.w_o = _param(rngs.params(), (h, d, e), out_std, ("heads", "head_dim", "embed"))

    def __call__(self, x_BxTxE, segment_ids_BxT, positions_BxT):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        q = jnp.einsum("bte,ehd->bthd", x_BxTxE, self.w_q[...].astype(dt))
        k = jnp.einsum("bte,ekd->btkd", x_BxTxE, self.w_k[...].astype(dt))
        v = jnp.einsum("bte,ekd->btkd", x_BxTxE, self.w_v[...].astype(dt))
        q = apply_rope(q, positions_BxT, cfg.rope_theta)
        k = apply_rope(k, positions_BxT, cfg.rope_theta)
        o_BxTxHxD = packed_attention(
            q,
            k,
            v,
            segment_ids_BxT,
            causal=True,
            window=cfg.attention_window,
            implementation=cfg.attention_implementation,
        )
        return jnp.einsum("bthd,hde->bte", o_BxTxHxD, self.w_o[...].astype(dt))


class SwiGLU(nnx.Module):
    """Gated feed-forward: W_down (silu(x W_gate) * x W_up)."""

    def __init__(self, cfg: TransformerConfig, *, rngs):
        self.dtype = cfg.compute_dtype
        e, f = cfg.d_model, cfg.mlp_dim
        self.w_gate = _param(rngs.params(), (e, f), e**-0.5, ("embed", "mlp"))
        self.w_up = _param(rngs.params(), (e, f), e**-0.5, ("embed", "mlp"))
        down_std = f**-0.5 / (2 * cfg.num_layers) ** 0.5
        self.w_down = _param(rngs.params(), (f, e), down_std, ("mlp", "embed"))

    def __call__(self, x_BxTxE):
        dt = self.dtype
        gate = jax.nn.silu(x_BxTxE @ self.w_gate[...].astype(dt))
        return (gate * (x_BxTxE @ self.w_up[...].astype(dt))) @ self.w_down[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm residual block: attention then SwiGLU."""

    def __init__(self, cfg: TransformerConfig, *, rngs):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x_BxTxE, segment_ids_BxT, positions_BxT):
        x_BxTxE = x_BxTxE + self.attn(self.attn_norm(x_BxTxE), segment_ids_BxT, positions_BxT)
        return x_BxTxE + self.mlp(self.mlp_norm(x_BxTxE))


class Transformer(nnx.Module):
    """Decoder-only LM: `model(tokens, segment_ids, positions) -> logits [B, T, V]`."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs.params(), (cfg.vocab_size, cfg.d_model), 1.0, ("vocab", "embed"))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.unembed = _param(
            rngs.params(), (cfg.d_model, cfg.vocab_size), cfg.d_model**-0.5, ("embed", "vocab")
        )

    def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None):
        b, t = tokens_BxT.shape
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones((b, t), jnp.int32)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return self.logits_from_embeddings(
            self.embed_tokens(tokens_BxT), segment_ids_BxT, positions_BxT
        )

    def embed_tokens(self, tokens_BxT):
        """Token embeddings [B, T, E] in the compute dtype."""
        return jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.cfg.compute_dtype)

    def logits_from_embeddings(self, x_BxTxE, segment_ids_BxT, positions_BxT):
        """The decoder stack and unembedding; float32 logits [B, T, V]."""
        for block in self.blocks:
            x_BxTxE = block(x_BxTxE, segment_ids_BxT, positions_BxT)
        x_BxTxE = self.final_norm(x_BxTxE)
        unembed = self.unembed[...].astype(self.cfg.compute_dtype)
        return jnp.einsum("bte,ev->btv", x_BxTxE, unembed).astype(jnp.float32)
