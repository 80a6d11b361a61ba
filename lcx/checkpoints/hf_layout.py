"""Where each lcx parameter lives in a Hugging Face checkpoint, and how to read a slice of it.

An lcx parameter is a Hugging Face tensor with some axes split and then transposed:
`lcx = hf.reshape(split).transpose(perm)` (q_proj.weight [H*D, E] -> w_q [E, H, D]). A
device's block of the lcx parameter is read as the smallest block of the Hugging Face
tensor that covers it, so a sharded load never reads a whole tensor per device.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lcx.model import TransformerConfig


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """lcx parameter = Hugging Face tensor `name`, reshaped to `split`, transposed by `perm`."""

    name: str
    hf_shape: tuple[int, ...]
    split: tuple[int, ...]
    perm: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """The lcx parameter's shape."""
        return tuple(self.split[p] for p in self.perm)

    def groups(self) -> list[list[int]]:
        """For each Hugging Face axis, the split axes it becomes."""
        groups, axis = [], 0
        for size in self.hf_shape:
            group, product = [axis], self.split[axis]
            while product < size:
                axis += 1
                group.append(axis)
                product *= self.split[axis]
            groups.append(group)
            axis += 1
        return groups

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        """The Hugging Face tensor of an lcx parameter (host array)."""
        # Contiguous: safetensors writes the buffer as it lies in memory, not by strides.
        return np.ascontiguousarray(
            np.transpose(array, np.argsort(self.perm)).reshape(self.hf_shape)
        )

    def read(self, tensor_slice, index) -> np.ndarray:
        """The block `index` (slices of the lcx shape) from a safetensors slice handle."""
        index = tuple(index) + (slice(None),) * (len(self.perm) - len(tuple(index)))
        split_index = [None] * len(self.split)
        for axis, p in enumerate(self.perm):
            split_index[p] = range(*index[axis].indices(self.split[p]))
        hf_index, block_shape, inner = [], [], []
        for group in self.groups():
            first, rest = split_index[group[0]], [self.split[g] for g in group[1:]]
            stride = math.prod(rest)
            hf_index.append(slice(first.start * stride, first.stop * stride))
            block_shape += [len(first), *rest]
            inner += [slice(None)] + [
                slice(r.start, r.stop) for r in (split_index[g] for g in group[1:])
            ]
        block = tensor_slice[tuple(hf_index)].reshape(block_shape)[tuple(inner)]
        return np.transpose(block, self.perm)


def _plain(name, shape):
    """A tensor stored as lcx stores it."""
    return TensorLayout(name, tuple(shape), tuple(shape), tuple(range(len(shape))))


def _linear(name, out_dims, in_dims):
    """A torch Linear weight [out, in] as lcx's [in..., out...]."""
    out_dims, in_dims = tuple(out_dims), tuple(in_dims)
    split = out_dims + in_dims
    perm = tuple(range(len(out_dims), len(split))) + tuple(range(len(out_dims)))
    return TensorLayout(name, (math.prod(out_dims), math.prod(in_dims)), split, perm)


def tensor_layouts(cfg: TransformerConfig) -> dict[tuple, TensorLayout]:
    """lcx parameter path (as in `nnx.to_pure_dict`) -> its Hugging Face tensor."""
    e, h, k, d, f, v = (
        cfg.d_model,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.mlp_dim,
        cfg.vocab_size,
    )
    layouts = {("embed",): _plain("model.embed_tokens.weight", (v, e))}
    for i in range(cfg.num_layers):
        at, mlp, blk = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", ("blocks", i)
        layer = {
            ("attn_norm", "scale"): _plain(f"model.layers.{i}.input_layernorm.weight", (e,)),
            ("mlp_norm", "scale"): _plain(
                f"model.layers.{i}.post_attention_layernorm.weight", (e,)
            ),
            ("attn", "w_q"): _linear(at + "q_proj.weight", (h, d), (e,)),
            ("attn", "w_k"): _linear(at + "k_proj.weight", (k, d), (e,)),
            ("attn", "w_v"): _linear(at + "v_proj.weight", (k, d), (e,)),
            ("attn", "w_o"): _linear(at + "o_proj.weight", (e,), (h, d)),
            ("mlp", "w_gate"): _linear(mlp + "gate_proj.weight", (f,), (e,)),
            ("mlp", "w_up"): _linear(mlp + "up_proj.weight", (f,), (e,)),
            ("mlp", "w_down"): _linear(mlp + "down_proj.weight", (e,), (f,)),
        }
        if cfg.attention_bias:
            for name, heads in (("q", h), ("k", k), ("v", k)):
                bias = TensorLayout(f"{at}{name}_proj.bias", (heads * d,), (heads, d), (0, 1))
                layer[("attn", f"b_{name}")] = bias
        if cfg.qk_norm:
            layer[("attn", "q_norm", "scale")] = _plain(at + "q_norm.weight", (d,))
            layer[("attn", "k_norm", "scale")] = _plain(at + "k_norm.weight", (d,))
        layouts.update({blk + path: layout for path, layout in layer.items()})
    layouts[("final_norm", "scale")] = _plain("model.norm.weight", (e,))
    if not cfg.tie_embeddings:
        layouts[("unembed",)] = _linear("lm_head.weight", (v,), (e,))
    return layouts
