"""Hugging Face model directories in and out: `load_hf` and `save_hf`.

A directory is `config.json` plus one `*.safetensors` file or several listed by
`model.safetensors.index.json` (the layout `transformers` writes and reads). Loading
checks every tensor's name, shape and dtype from the files' headers first, then reads
each parameter one tensor at a time straight into its sharded layout: every device
reads only the block of the tensor it holds (`safetensors`' sliced reads), and no
random initialisation is made and thrown away (the module is built abstractly and
filled). Saving writes shards under a temporary name and renames the directory into
place, so an interrupted export leaves no directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from lcx.checkpoints.hf_config import family_of, read_config, write_config_dict
from lcx.checkpoints.hf_layout import tensor_layouts
from lcx.errors import UserError
from lcx.lora import merge_adapters
from lcx.model import Transformer, TransformerConfig
from lcx.runtime.params import abstract_model, param_shardings
from lcx.runtime.sharding import DEFAULT_RULES

INDEX = "model.safetensors.index.json"
DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")  # fmt: skip


def _tensor_files(directory: str) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(directory, shard)):
                raise UserError(f"{index}: lists the shard {shard!r}, which is not in {directory}")
        return {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"{directory}: no *.safetensors file (and no {INDEX})")
    where = {}
    for name in files:
        path = os.path.join(directory, name)
        with safe_open(path, "numpy") as f:
            where.update(dict.fromkeys(f.keys(), path))
    return where


def _check_tensors(directory, layouts, where) -> None:
    """One-line errors for a missing, misshapen or unsupported-dtype tensor."""
    by_file = {}
    for layout in layouts.values():
        if layout.name not in where:
            raise UserError(
                f"{directory}: the tensor {layout.name!r} is missing (config.json implies "
                f"shape {list(layout.hf_shape)})"
            )
        by_file.setdefault(where[layout.name], []).append(layout)
    for path, file_layouts in by_file.items():
        with safe_open(path, "numpy") as f:
            for layout in file_layouts:
                tensor = f.get_slice(layout.name)
                shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
                if shape != layout.hf_shape:
                    raise UserError(
                        f"{path}: the tensor {layout.name!r} has shape {list(shape)}; "
                        f"config.json implies {list(layout.hf_shape)}"
                    )
                if dtype not in DTYPES:
                    raise UserError(
                        f"{path}: the tensor {layout.name!r} is {dtype}; supported: "
                        f"{sorted(DTYPES)}"
                    )


def _param_shardings(abstract, mesh, rules):
    """Each parameter's sharding: from its logical axes on `mesh`, else one device."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, nnx.to_pure_dict(abstract))
    return param_shardings(abstract, mesh, rules or DEFAULT_RULES)


def hf_model_config(directory: str, **overrides) -> TransformerConfig:
    """The TransformerConfig of a Hugging Face directory; `overrides` change run fields
    (dtype, param_dtype, attention_implementation, remat, rope_theta, ...)."""
    fields, _ = read_config(directory)
    return TransformerConfig(**{**fields, **overrides})


def load_params(directory: str, cfg: TransformerConfig, shardings) -> dict:
    """The parameters (`nnx.to_pure_dict` layout) of `cfg` read from `directory`, placed
    with `shardings` (a matching tree) and cast to `cfg.param_dtype`."""
    layouts = tensor_layouts(cfg)
    where = _tensor_files(directory)
    _check_tensors(directory, layouts, where)
    dtype = np.dtype(cfg.parameter_dtype)
    params = {}
    for path, layout in layouts.items():

        def block(index, layout=layout):
            """This device's block, read from the file (and only that block); the file is
            opened per block so its mapped pages are released before the next tensor."""
            with safe_open(where[layout.name], "numpy") as f:
                data = layout.read(f.get_slice(layout.name), index)
            return data.astype(dtype, copy=False)

        sharding = _lookup(shardings, path)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.make_array_from_callback(layout.shape, sharding, block)
    return params


def _lookup(tree, path):
    """tree[path[0]][path[1]]..."""
    for key in path:
        tree = tree[key]
    return tree


def load_hf(directory: str, *, mesh=None, param_dtype=None, rules=None, **overrides) -> Transformer:
    """An lcx Transformer holding a local Hugging Face checkpoint's weights.

    `mesh`: place each parameter sharded by `rules` (logical axis -> mesh axes, default
    `lcx.runtime.sharding.DEFAULT_RULES`); None: on the first device. `param_dtype`:
    "float32" (default) or "bfloat16" storage. `overrides`: other TransformerConfig
    fields that change how the model runs, not its parameters (dtype,
    attention_implementation, remat, scan_layers, rope_theta for continued training).
    """
    if not os.path.isdir(directory):
        raise UserError(f"{directory}: not a directory (a Hugging Face model directory)")
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    cfg = hf_model_config(directory, **overrides)
    if cfg.lora is not None:
        raise UserError(
            "load_hf(lora=...): a Hugging Face directory holds no adapters; train them with "
            "config.model.lora and init.hf_checkpoint"
        )
    graphdef, abstract = abstract_model(cfg)
    params = load_params(directory, cfg, _param_shardings(abstract, mesh, rules))
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)


def _host(array) -> np.ndarray:
    """A parameter's full value on this host (gathered across processes if needed)."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def save_hf(
    model: Transformer,
    directory: str,
    *,
    architecture: str | None = None,
    max_shard_bytes: int = 2 << 30,
    tokenizer_dir: str | None = None,
    **special_ids,
) -> str:
    """Write `model` as a Hugging Face directory; returns its path.

    A model with LoRA adapters is written merged, W + (alpha / rank) A B in the base
    layout. The architecture is the one that computes the same function (Qwen3 with qk_norm,
    Qwen2 with attention biases, Mistral with a window, else Llama) unless given.
    Tensors go in the parameters' dtype into shards of at most `max_shard_bytes`, one
    tensor at a time on the host. `tokenizer_dir`: its tokenizer files are copied beside
    the weights. `special_ids`: bos_token_id, eos_token_id, pad_token_id for config.json.
    `directory` must not exist or be empty; in a multi-process run every process
    gathers each tensor and process 0 writes.
    """
    cfg = model.cfg
    architecture = architecture or family_of(cfg)
    if os.path.isdir(directory) and os.listdir(directory):
        raise UserError(f"export.dir={directory!r} is not empty; give a new directory")
    layouts = tensor_layouts(cfg)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if cfg.lora is not None:  # adapters folded in: a Hugging Face loader sees a plain model
        params = merge_adapters(params, cfg.lora)
    sizes = {p: _lookup(params, p).nbytes for p in layouts}
    shards, current, used = [], [], 0
    for path in layouts:
        if current and used + sizes[path] > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(path)
        used += sizes[path]
    shards.append(current)
    writer = jax.process_index() == 0
    parent = os.path.dirname(os.path.abspath(directory))
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent) if writer else None
    try:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        if len(shards) == 1:
            names = ["model.safetensors"]
        weight_map = {}
        for name, paths in zip(names, shards, strict=True):
            tensors = {layouts[p].name: layouts[p].to_hf(_host(_lookup(params, p))) for p in paths}
            if writer:
                save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors
        if writer:
            _write_metadata(
                tmp, cfg, architecture, names, weight_map, sizes, tokenizer_dir, special_ids
            )
            if os.path.isdir(directory):
                os.rmdir(directory)  # empty (checked above)
            os.replace(tmp, directory)
            tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _write_metadata(tmp, cfg, architecture, names, weight_map, sizes, tokenizer_dir, special_ids):
    """config.json, the shard index (several shards) and the tokenizer's files."""
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(write_config_dict(cfg, architecture, **special_ids), f, indent=2)
    if len(names) > 1:
        index = {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": weight_map}
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump(index, f, indent=2)
    for name in TOKENIZER_FILES if tokenizer_dir else ():
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
