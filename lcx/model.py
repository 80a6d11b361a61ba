"""Decoder-only Transformer in Flax NNX for packed rows.

RMSNorm, rotary position embeddings (RoFormer, arXiv 2104.09864) driven by per-document
`positions`, SwiGLU feed-forward (Shazeer, arXiv 2002.05202), grouped-query attention
(arXiv 2305.13245) through `lcx.attention.packed_attention`; `block_pattern` swaps
attention for LaCT layers (`lcx.ttt`, arXiv 2505.23884) in chosen layers.

Shape letters: B batch, T time, H query heads, K kv heads, D head dim, E model width,
F feed-forward width, V vocabulary.

The Hugging Face architectures lcx.checkpoints reads and writes differ from this
model only by the optional pieces `attention_bias` (Qwen2's q/k/v biases), `qk_norm`
(Qwen3's per-head RMSNorm of queries and keys before RoPE), `tie_embeddings` (the
unembedding is the embedding's transpose) and `rope_scaling` (Llama 3.1's frequencies).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lcx.attention import IMPLEMENTATIONS, merge_attention, packed_attention
from lcx.attention.ring import sequence_mesh
from lcx.attention.shared_prefix import prefix_attention
from lcx.cache import AttentionCache, cache_attention
from lcx.errors import UserError
from lcx.layers import DTYPES, ROPE_SCALINGS, apply_rope, constant_param, param, rms_normalise
from lcx.lora import LoRASettings, adapted, add_adapters
from lcx.paged_cache import PagedAttentionCache, paged_cache_attention
from lcx.ttt import LaCTConfig, LaCTLayer, LaCTSettings
from lcx.ttt.state import LaCTCache

# model.remat -> the jax.checkpoint policy of each block (None: save nothing, recompute all).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Model hyper-parameters; built from `config.model` (lcx.settings.ModelSettings.fields)."""

    vocab_size: int = 384
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    mlp_dim: int = 768
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype
    # Storage dtype of the attention, MLP, norm and embedding parameters (LaCT layers
    # keep float32): "bfloat16" halves a bf16 checkpoint's memory; the optimizer state
    # then follows it.
    param_dtype: str = "float32"
    # Hugging Face architecture pieces (lcx.checkpoints), each off by default.
    attention_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim of queries and keys before RoPE (Qwen3)
    tie_embeddings: bool = False  # unembedding = embedding transposed
    # None, or {"rope_type": "linear" | "llama3", "factor": ..., ...} (lcx.layers).
    rope_scaling: tuple | None = None
    attention_implementation: str | None = None  # None = best for the backend
    attention_window: int | None = None
    # Mixer of each layer, the pattern cycled over the layers: "attention" | "lact".
    block_pattern: tuple[str, ...] = ("attention",)
    # LaCT layers (lcx.ttt): a LaCTSettings, or a mapping of its fields (config.model.lact).
    lact: LaCTSettings = LaCTSettings()
    # Training memory and compile time: rematerialisation of each block in the backward
    # pass (none | full | dots: keep the matmul outputs | offload: keep them in host
    # memory), and the blocks under lax.scan (compile time flat in depth).
    remat: str = "none"
    scan_layers: bool = False
    # LoRA adapters (lcx.lora): a LoRASettings or a mapping of its fields
    # (config.model.lora); None or rank 0: none, the parameters are the plain model's.
    lora: LoRASettings | None = None

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UserError(f"model.{name}={getattr(self, name)!r}; valid: {sorted(DTYPES)}")
        if self.rope_scaling is not None:
            # A mapping in configs; stored as sorted (key, value) pairs to stay hashable.
            items = dict(self.rope_scaling).items()
            object.__setattr__(self, "rope_scaling", tuple(sorted(items)))
            kind = dict(self.rope_scaling).get("rope_type")
            if kind not in ROPE_SCALINGS:
                raise UserError(
                    f"model.rope_scaling rope_type={kind!r}; supported: {ROPE_SCALINGS}"
                )
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"model.num_heads={self.num_heads} must be a multiple of "
                f"model.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UserError(f"model.head_dim={self.head_dim} must be even for RoPE")
        object.__setattr__(self, "block_pattern", tuple(self.block_pattern))
        unknown = set(self.block_pattern) - set(MIXERS)
        if not self.block_pattern or unknown:
            raise UserError(
                f"model.block_pattern={self.block_pattern}: each entry one of {sorted(MIXERS)}"
            )
        object.__setattr__(self, "lact", LaCTSettings.of(self.lact))
        lora = None if self.lora is None else LoRASettings.of(self.lora)
        object.__setattr__(self, "lora", lora if lora and lora.rank else None)
        if "lact" in self.block_pattern:
            self.lact_config()  # validates model.lact
        if self.attention_implementation not in (None, *IMPLEMENTATIONS):
            raise UserError(
                f"model.attention_implementation={self.attention_implementation!r}; valid: "
                f"None (the best for the backend) or one of {sorted(IMPLEMENTATIONS)}"
            )
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"model.remat={self.remat!r}; valid: {sorted(REMAT_POLICIES)}")
        for name in ("vocab_size", "d_model", "num_layers", "head_dim", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name}={getattr(self, name)} must be positive")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def parameter_dtype(self):
        return DTYPES[self.param_dtype]

    def mixer(self, layer: int) -> str:
        """The sequence mixer of `layer`: block_pattern cycled."""
        return self.block_pattern[layer % len(self.block_pattern)]

    def mixers_without(self, feature: str) -> list[str]:
        """The mixers of `block_pattern` whose `Mixer` record lacks `feature`, in order."""
        names = dict.fromkeys(self.block_pattern)
        return [name for name in names if not getattr(MIXERS[name], feature)]

    def chunk_grid(self) -> int:
        """The grid prompt chunks must end on for every mixer of the model (0: any)."""
        grids = [MIXERS[name].chunk_grid(self) for name in dict.fromkeys(self.block_pattern)]
        grids = [grid for grid in grids if grid]
        return math.lcm(*grids) if grids else 0

    def lact_config(self) -> LaCTConfig:
        """The LaCT layer's config: model.lact and the model's sizes."""
        lact = self.lact
        return LaCTConfig(
            d_model=self.d_model,
            num_heads=self.num_heads,
            fw_heads=lact.fw_heads,
            chunk_size=lact.chunk_size,
            window=lact.window,
            inter_multi=lact.inter_multi,
            use_momentum=lact.momentum,
            use_muon=lact.muon,
            base_lr=lact.base_lr,
            grid=lact.grid,
            rope_theta=self.rope_theta,
            num_layers=self.num_layers,
            dtype=self.dtype,
            attention_implementation=self.attention_implementation,
        )


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale, computed in float32."""

    def __init__(self, dim, *, eps, rngs, axis="embed", dtype=jnp.float32):
        del rngs
        self.eps = eps
        self.scale = constant_param(jnp.ones((dim,)), (axis,), dtype)

    def __call__(self, x):
        normed = rms_normalise(x, self.eps)
        return (normed * self.scale[...]).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention over packed rows."""

    def __init__(self, cfg: TransformerConfig, *, rngs):
        self.cfg = cfg
        e, h, k, d = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std, pd = e**-0.5, cfg.parameter_dtype
        self.w_q = param(rngs.params(), (e, h, d), std, ("embed", "heads", "head_dim"), pd)
        self.w_k = param(rngs.params(), (e, k, d), std, ("embed", "kv_heads", "head_dim"), pd)
        self.w_v = param(rngs.params(), (e, k, d), std, ("embed", "kv_heads", "head_dim"), pd)
        out_std = (h * d) ** -0.5 / (2 * cfg.num_layers) ** 0.5
        self.w_o = param(rngs.params(), (h, d, e), out_std, ("heads", "head_dim", "embed"), pd)
        if cfg.attention_bias:
            self.b_q = constant_param(jnp.zeros((h, d)), ("heads", "head_dim"), pd)
            self.b_k = constant_param(jnp.zeros((k, d)), ("kv_heads", "head_dim"), pd)
            self.b_v = constant_param(jnp.zeros((k, d)), ("kv_heads", "head_dim"), pd)
        if cfg.qk_norm:
            norm = dict(eps=cfg.norm_eps, rngs=rngs, axis="head_dim", dtype=pd)
            self.q_norm, self.k_norm = RMSNorm(d, **norm), RMSNorm(d, **norm)

    def _qkv(self, x_BxTxE, positions_BxT):
        """Projected q [B,T,H,D], k, v [B,T,K,D], RoPE applied to q and k."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        q = jnp.einsum("bte,ehd->bthd", x_BxTxE, self.w_q[...].astype(dt))
        k = jnp.einsum("bte,ekd->btkd", x_BxTxE, self.w_k[...].astype(dt))
        v = jnp.einsum("bte,ekd->btkd", x_BxTxE, self.w_v[...].astype(dt))
        q, k, v = (adapted(self, n, y, x_BxTxE) for n, y in (("q", q), ("k", k), ("v", v)))
        if cfg.attention_bias:
            q, k, v = (
                x + b[...].astype(dt) for x, b in ((q, self.b_q), (k, self.b_k), (v, self.b_v))
            )
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions_BxT, cfg.rope_theta, cfg.rope_scaling)
        return q, apply_rope(k, positions_BxT, cfg.rope_theta, cfg.rope_scaling), v

    def _out(self, o_BxTxHxD):
        """The output projection [B, T, E] (and its adapter)."""
        # One product over heads x head_dim, flattened: with the 3-d einsum, XLA's CPU
        # layouts transposed w_o on every call instead of the (much smaller) activations.
        w_FxE = self.w_o[...].astype(self.cfg.compute_dtype).reshape(-1, self.w_o.shape[-1])
        o_BxTxF = o_BxTxHxD.reshape(*o_BxTxHxD.shape[:2], -1)
        out = jnp.einsum("btf,fe->bte", o_BxTxF, w_FxE)
        return adapted(self, "o", out, o_BxTxHxD)

    def init_cache(self, slots: int, length: int, dtype=None) -> AttentionCache:
        """An empty cache of `slots` sequences of `length` tokens (default compute dtype)."""
        cfg = self.cfg
        dtype = dtype or cfg.compute_dtype
        return AttentionCache.zeros(slots, length, cfg.num_kv_heads, cfg.head_dim, dtype)

    def init_paged_cache(self, num_pages: int, page_size: int, dtype=None) -> PagedAttentionCache:
        """An empty pool of `num_pages` pages of `page_size` tokens (default compute dtype)."""
        cfg = self.cfg
        dtype = dtype or cfg.compute_dtype
        return PagedAttentionCache.zeros(
            num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, dtype
        )

    def _attend(self, q, k, v, segment_ids, *, return_lse=True, **keys):
        """packed_attention with this layer's masking; (out, lse), or out."""
        cfg = self.cfg
        return packed_attention(
            q,
            k,
            v,
            segment_ids,
            causal=True,
            window=cfg.attention_window,
            implementation=cfg.attention_implementation,
            return_lse=return_lse,
            **keys,
        )

    def with_cache(
        self,
        x_BxCxE,
        segment_ids_BxC,
        positions_BxC,
        cache,
        *,
        cache_segment_ids,
        cache_positions,
        index,
    ):
        """A chunk's attention over a key/value buffer that first receives its keys/values.

        `cache`: (k, v) [B, S, K, D]; the chunk's keys/values are written at `index`, then
        its queries attend the whole buffer through `packed_attention`, which skips the
        blocks no query sees. `cache_segment_ids` [B, S] give each entry the segment
        id of the queries that may see it (0: nobody, e.g. other documents or later
        chunks) and must already hold the chunk's own ids at `index`; `cache_positions`
        [B, S] drive causality and the window. ChunkFlow passes its rows' buffer here.
        Returns (output [B, C, E], the chunk's (k, v)).
        """
        q, k, v = self._qkv(x_BxCxE, positions_BxC)
        k_all = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, 1)
        v_all = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, 1)
        o_BxCxHxD, _ = self._attend(
            q,
            k_all,
            v_all,
            segment_ids_BxC,
            kv_segment_ids=cache_segment_ids,
            q_positions=positions_BxC,
            kv_positions=cache_positions,
        )
        return self._out(o_BxCxHxD), (k, v)

    def __call__(
        self,
        x_BxTxE,
        segment_ids_BxT,
        positions_BxT,
        cache=None,
        *,
        attend_cache=True,
        prefixes=(),
        offset_S=None,
        decode_rows=0,
        pages=None,
    ):
        """Self-attention over packed rows; with `cache`, (output, the updated cache).

        With a cache (lcx.cache: a token's slot is its segment id - 1) the tokens'
        keys/values are stored first. `attend_cache`: the queries (one row) attend the
        whole cache, for decoding and chunked prefill; False: only their own row, for a
        prefill whose prompts lie whole in the rows. `prefixes`: (SharedPrefix, group of
        each slot [S]) per tree level, merged by log-sum-exp (Hydragen); `offset_S` [S]:
        the prefix length each slot's cache entries start after. `decode_rows`: the row's
        first `decode_rows` queries are slot by slot, decode_rows / slots each (a decode
        token, or one and its speculative drafts; or padding), attended slot by slot
        rather than against the whole cache. `pages`: a
        `lcx.paged_cache.PageLayout` for a `PagedAttentionCache` (its page table and this
        step's work items), read raggedly.
        """
        cfg = self.cfg
        q, k, v = self._qkv(x_BxTxE, positions_BxT)
        if cache is not None:
            paged = {} if pages is None else {"pages": pages}
            cache = cache.write(k, v, segment_ids_BxT, positions_BxT, offset_S, **paged)
        if cache is not None and attend_cache and pages is not None:
            parts = [
                paged_cache_attention(
                    q,
                    segment_ids_BxT,
                    positions_BxT,
                    cache,
                    pages,
                    offset_S=offset_S,
                    window=cfg.attention_window,
                    decode_rows=decode_rows or None,
                )
            ]
        elif cache is not None and attend_cache:
            parts = [
                cache_attention(
                    q,
                    segment_ids_BxT,
                    positions_BxT,
                    cache,
                    offset_S=offset_S,
                    decode_rows=decode_rows,
                    window=cfg.attention_window,
                    implementation=cfg.attention_implementation,
                )
            ]
        elif not prefixes:  # training and prepacked prefill: causal within the row's runs
            # Rows split over a `sequence` mesh axis may be permuted (ring layouts): the
            # ring then needs each token's position; otherwise the index in the row serves.
            where = {"q_positions": positions_BxT} if sequence_mesh() is not None else {}
            o_BxTxHxD = self._attend(q, k, v, segment_ids_BxT, return_lse=False, **where)
            out = self._out(o_BxTxHxD)
            return out if cache is None else (out, cache)
        else:
            parts = [self._attend(q, k, v, segment_ids_BxT)]
        slot = jnp.clip(segment_ids_BxT - 1, 0, None)
        for prefix, group_of_slot in prefixes:
            groups = jnp.where(segment_ids_BxT > 0, group_of_slot[slot], -1)
            parts.append(
                prefix_attention(
                    q,
                    prefix,
                    groups,
                    positions_BxT,
                    window=cfg.attention_window,
                    implementation=cfg.attention_implementation,
                )
            )
        o_BxTxHxD = merge_attention(parts)[0] if len(parts) > 1 else parts[0][0]
        out = self._out(o_BxTxHxD)
        return out if cache is None else (out, cache)


class SwiGLU(nnx.Module):
    """Gated feed-forward: W_down (silu(x W_gate) * x W_up)."""

    def __init__(self, cfg: TransformerConfig, *, rngs):
        self.dtype = cfg.compute_dtype
        e, f, pd = cfg.d_model, cfg.mlp_dim, cfg.parameter_dtype
        self.w_gate = param(rngs.params(), (e, f), e**-0.5, ("embed", "mlp"), pd)
        self.w_up = param(rngs.params(), (e, f), e**-0.5, ("embed", "mlp"), pd)
        down_std = f**-0.5 / (2 * cfg.num_layers) ** 0.5
        self.w_down = param(rngs.params(), (f, e), down_std, ("mlp", "embed"), pd)

    def __call__(self, x_BxTxE):
        dt = self.dtype
        gate = jax.nn.silu(adapted(self, "gate", x_BxTxE @ self.w_gate[...].astype(dt), x_BxTxE))
        h_BxTxF = gate * adapted(self, "up", x_BxTxE @ self.w_up[...].astype(dt), x_BxTxE)
        return adapted(self, "down", h_BxTxF @ self.w_down[...].astype(dt), h_BxTxF)


@dataclasses.dataclass(frozen=True)
class Mixer:
    """One sequence mixer of `model.block_pattern`: how to build it and what it supports.

    A mixer maps (x [B, T, E], segment_ids, positions, cache=None, **cache_args) to
    [B, T, E] (and, with a cache, the updated cache) and has `init_cache(slots, length)`
    returning its own `cache_type`. The serving engine and training ask these fields, not
    the mixer's name; a new mixer is its module plus one line in MIXERS.
    """

    build: Callable[[TransformerConfig, nnx.Rngs], nnx.Module]
    cache_type: type  # one layer's per-slot serving state (lcx.cache, lcx.ttt.state)
    # Prompts prefilled whole in packed rows, each attending only itself (Prepacking).
    prepacked_prefill: bool
    # A prefix stored once for every slot and merged into attention (Hydragen).
    shared_prefix: bool
    # Rows of one document attending earlier rows' keys/values (ChunkFlow's training).
    dependent_rows: bool
    # Rows split over the `sequence` mesh axis (ring attention).
    ring: bool
    # Its serving state in a pool of pages (`init_paged_cache`), read raggedly.
    paging: bool
    # A cached prefix's state can start another sequence (the engine's prefix cache).
    prefix_reuse: bool
    # Entries written for tokens later rejected (speculative drafts) can be taken back.
    rollback: bool
    # The prompt chunk grid: a chunk of a prompt must end on a multiple of this (0: any).
    chunk_grid: Callable[[TransformerConfig], int] = lambda cfg: 0


MIXERS: Mapping[str, Mixer] = types.MappingProxyType(
    {
        "attention": Mixer(
            build=lambda cfg, rngs: Attention(cfg, rngs=rngs),
            cache_type=AttentionCache,
            prepacked_prefill=True,
            shared_prefix=True,
            dependent_rows=True,
            ring=True,
            paging=True,
            prefix_reuse=True,
            # Entries past a sequence's end are masked by causality until overwritten.
            rollback=True,
        ),
        # LaCT's fast weights update once per chunk of a sequence and are per slot.
        "lact": Mixer(
            build=lambda cfg, rngs: LaCTLayer(cfg.lact_config(), rngs=rngs),
            cache_type=LaCTCache,
            prepacked_prefill=False,
            shared_prefix=False,
            dependent_rows=False,
            ring=False,
            paging=False,
            # Fast weights exist only at the chunk boundaries a request reached; none saved.
            prefix_reuse=False,
            # A chunk's fast-weight update cannot be undone for rejected drafts.
            rollback=False,
            chunk_grid=lambda cfg: cfg.lact.chunk_size,
        ),
    }
)


class Block(nnx.Module):
    """Pre-norm residual block: a sequence mixer (attention or LaCT) then SwiGLU."""

    def __init__(self, cfg: TransformerConfig, *, rngs, mixer: str = "attention"):
        norm = dict(eps=cfg.norm_eps, rngs=rngs, dtype=cfg.parameter_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, **norm)
        self.attn = MIXERS[mixer].build(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, **norm)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x_BxTxE, segment_ids_BxT, positions_BxT, cache=None, **cache_args):
        """The block; with a mixer cache, (output, the updated cache)."""
        h = self.attn(self.attn_norm(x_BxTxE), segment_ids_BxT, positions_BxT, cache, **cache_args)
        if cache is not None:
            h, cache = h
        x_BxTxE = x_BxTxE + h
        x_BxTxE = x_BxTxE + self.mlp(self.mlp_norm(x_BxTxE))
        return x_BxTxE if cache is None else (x_BxTxE, cache)

    def with_cache(self, x_BxCxE, segment_ids_BxC, positions_BxC, cache, **cache_layout):
        """The block on one chunk attending a key/value cache (ChunkFlow); see Attention."""
        if not isinstance(self.attn, Attention):
            raise NotImplementedError("dependent chunks need attention layers, not LaCT")
        h, kv = self.attn.with_cache(
            self.attn_norm(x_BxCxE), segment_ids_BxC, positions_BxC, cache, **cache_layout
        )
        x_BxCxE = x_BxCxE + h
        return x_BxCxE + self.mlp(self.mlp_norm(x_BxCxE)), kv


class Transformer(nnx.Module):
    """Decoder-only LM: `model(tokens, segment_ids, positions) -> logits [B, T, V]`."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        v, e, pd = cfg.vocab_size, cfg.d_model, cfg.parameter_dtype
        # Tied, the embedding is also the unembedding: scaled as the unembedding would be.
        embed_std = e**-0.5 if cfg.tie_embeddings else 1.0
        self.embed = param(rngs.params(), (v, e), embed_std, ("vocab", "embed"), pd)
        self.blocks = nnx.List(
            [Block(cfg, rngs=rngs, mixer=cfg.mixer(i)) for i in range(cfg.num_layers)]
        )
        self.final_norm = RMSNorm(e, eps=cfg.norm_eps, rngs=rngs, dtype=pd)
        if not cfg.tie_embeddings:
            self.unembed = param(rngs.params(), (e, v), e**-0.5, ("embed", "vocab"), pd)
        for block in self.blocks:  # last: the base's random init is the same with LoRA
            mixer = [block.attn] if isinstance(block.attn, Attention) else []  # not LaCT's
            for module in [*mixer, block.mlp]:
                add_adapters(module, cfg.lora, dtype=cfg.compute_dtype, rngs=rngs)

    def __call__(
        self,
        tokens_BxT,
        segment_ids_BxT=None,
        positions_BxT=None,
        *,
        cache=None,
        logits_at=None,
        **cache_args,
    ):
        """Logits [B, T, V] (float32); with `cache`, (logits, the updated cache).

        `cache`: from `init_cache`, one entry per layer (see lcx.cache: a token's slot is
        its segment id - 1); `cache_args` go to the mixers (`attend_cache`, `offset_S`),
        except `prefixes`: per layer, the (SharedPrefix, group of each slot) of each tree
        level. `logits_at` int [B, N]: only the logits at those indices, [B, N, V].
        """
        b, t = tokens_BxT.shape
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones((b, t), jnp.int32)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is None and not cache_args and logits_at is None:
            return self.logits_from_embeddings(
                self.embed_tokens(tokens_BxT), segment_ids_BxT, positions_BxT
            )
        x = self.embed_tokens(tokens_BxT)
        caches = [None] * len(self.blocks) if cache is None else cache
        prefixes = cache_args.pop("prefixes", None) or [()] * len(self.blocks)
        updated = []
        for block, layer_cache, layer_prefixes in zip(self.blocks, caches, prefixes, strict=True):
            x = block(
                x,
                segment_ids_BxT,
                positions_BxT,
                layer_cache,
                prefixes=layer_prefixes,
                **cache_args,
            )
            if layer_cache is not None:
                x, layer_cache = x
            updated.append(layer_cache)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        logits = self._unembed(x)
        return logits if cache is None else (logits, tuple(updated))

    def init_cache(self, slots: int, length: int, dtype=None) -> tuple:
        """Empty per-layer caches for `slots` sequences of up to `length` tokens."""
        return tuple(block.attn.init_cache(slots, length, dtype) for block in self.blocks)

    def init_paged_cache(self, num_pages: int, page_size: int, dtype=None) -> tuple:
        """Empty per-layer page pools (every mixer's record says `paging`)."""
        return tuple(
            block.attn.init_paged_cache(num_pages, page_size, dtype) for block in self.blocks
        )

    def _unembed(self, x_BxTxE):
        """Final norm and unembedding; float32 logits."""
        weights = self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]
        unembed = weights.astype(self.cfg.compute_dtype)
        return jnp.einsum("bte,ev->btv", self.final_norm(x_BxTxE), unembed).astype(jnp.float32)

    def embed_tokens(self, tokens_BxT):
        """Token embeddings [B, T, E] in the compute dtype."""
        return jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.cfg.compute_dtype)

    def chunk_logits(self, tokens_BxC, segment_ids_BxC, positions_BxC, caches, **cache_layout):
        """Logits of one chunk attending per-layer key/value caches (ChunkFlow).

        `caches`: per layer a (k, v) pair [B, S, K, D]; `cache_layout` (cache_segment_ids,
        cache_positions, index) as in `Attention.with_cache`. Returns (logits, this
        chunk's (k, v) per layer).
        """
        x = self.embed_tokens(tokens_BxC)
        kvs = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, kv = block.with_cache(x, segment_ids_BxC, positions_BxC, cache, **cache_layout)
            kvs.append(kv)
        return self._unembed(x), kvs

    def logits_from_embeddings(self, x_BxTxE, segment_ids_BxT, positions_BxT):
        """The decoder stack and unembedding; float32 logits [B, T, V].

        `model.remat` wraps each block in `nnx.remat`; `model.scan_layers` runs the
        blocks as a `lax.scan` over groups of `len(block_pattern)` layers, their
        parameters stacked per step (the stored parameters stay one module per layer).
        """
        run = _block_runner(self.cfg.remat)
        blocks = list(self.blocks)
        period = len(self.cfg.block_pattern)
        scanned = (len(blocks) // period) * period if self.cfg.scan_layers else 0
        if scanned > period:
            x_BxTxE = _scan_blocks(
                blocks[:scanned], period, run, x_BxTxE, segment_ids_BxT, positions_BxT
            )
            blocks = blocks[scanned:]
        for block in blocks:
            x_BxTxE = run(block, x_BxTxE, segment_ids_BxT, positions_BxT)
        return self._unembed(x_BxTxE)


def _block_runner(remat: str):
    """block, x, segment ids, positions -> x, rematerialised as `model.remat` says."""

    def run(block, x_BxTxE, segment_ids_BxT, positions_BxT):
        return block(x_BxTxE, segment_ids_BxT, positions_BxT)

    if remat == "none":
        return run
    return nnx.remat(run, policy=REMAT_POLICIES[remat])


def _scan_blocks(blocks, period, run, x_BxTxE, segment_ids_BxT, positions_BxT):
    """The blocks as a lax.scan over groups of `period` (one per pattern position)."""
    graphdefs, states = zip(*(nnx.split(block) for block in blocks), strict=True)
    stacked = [
        jax.tree.map(lambda *layers: jnp.stack(layers), *states[j::period]) for j in range(period)
    ]

    def group(x, group_states):
        """One group of `period` blocks."""
        for graphdef, state in zip(graphdefs[:period], group_states, strict=True):
            x = run(nnx.merge(graphdef, state), x, segment_ids_BxT, positions_BxT)
        return x, None

    return jax.lax.scan(group, x_BxTxE, stacked)[0]
