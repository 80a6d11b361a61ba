"""Hugging Face checkpoints in and out: logits equal transformers' on the same weights.

The reference is transformers itself (tests/hf_fixtures.py builds tiny random models of
each supported family with it and saves them with `save_pretrained`), run here.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from lcx.checkpoints import FAMILIES, load_hf, save_hf, tensor_layouts
from tests import hf_fixtures
from tests.hf_fixtures import VARIANTS, build, hf_logits, max_relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _packed_row(rng, lengths, vocab):
    """tokens, segment ids, positions [1, T] of documents of `lengths`, and the documents."""
    docs = [rng.integers(0, vocab, n) for n in lengths]
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    positions = np.concatenate([np.arange(n) for n in lengths])
    return (np.concatenate(docs)[None], segment_ids[None], positions[None]), docs


def _params(model):
    """Host copies of a model's parameters, by path."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.torch
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_equal_transformers_whole_and_packed(variant, rng, tmp_path):
    torch_model = build(str(tmp_path), variant, int(rng.integers(1 << 30)))
    model = load_hf(str(tmp_path))
    tokens = rng.integers(0, 128, (2, 24))
    error = max_relative_error(model(jnp.asarray(tokens)), hf_logits(torch_model, tokens))
    assert error <= 1e-5, (variant, error)
    # A packed row: each document equals that document run alone through transformers.
    (row, segment_ids, positions), docs = _packed_row(rng, [11, 6, 7], 128)
    packed = np.asarray(model(jnp.asarray(row), jnp.asarray(segment_ids), jnp.asarray(positions)))
    start = 0
    for doc in docs:
        alone = hf_logits(torch_model, doc[None])[0]
        error = max_relative_error(packed[0, start : start + len(doc)], alone)
        assert error <= 1e-5, (variant, len(doc), error)
        start += len(doc)


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["llama3.1", "qwen2", "qwen3", "mistral"])
def test_round_trip_is_bit_identical_and_the_export_loads_in_transformers(variant, rng, tmp_path):
    import transformers

    build(str(tmp_path / "hf"), variant, int(rng.integers(1 << 30)))
    model = load_hf(str(tmp_path / "hf"))
    # Small shards: the export is several files and an index, as large models are.
    save_hf(model, str(tmp_path / "out"), max_shard_bytes=40_000, eos_token_id=2)
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and len(files) > 3, files
    again = load_hf(str(tmp_path / "out"))
    assert again.cfg == model.cfg
    for a, b in zip(jax.tree.leaves(_params(model)), jax.tree.leaves(_params(again)), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), attn_implementation="eager"
    ).eval()
    tokens = rng.integers(0, 128, (1, 20))
    error = max_relative_error(model(jnp.asarray(tokens)), hf_logits(reloaded, tokens))
    assert error <= 1e-5, (variant, error)


@pytest.mark.torch
@pytest.mark.parametrize(
    "stored, param_dtype",
    [("bfloat16", "bfloat16"), ("float16", "float32"), ("bfloat16", "float32")],
)
def test_half_precision_checkpoints_load_exactly(stored, param_dtype, rng, tmp_path):
    """bf16 / fp16 files load exactly into bf16 or float32 parameters and round-trip."""
    import torch

    torch_model = build(str(tmp_path / "hf"), "qwen3", int(rng.integers(1 << 30)), dtype=stored)
    assert torch_model.dtype == getattr(torch, stored)
    model = load_hf(str(tmp_path / "hf"), param_dtype=param_dtype)
    expected = torch_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    w_q = np.asarray(model.blocks[1].attn.w_q[...])
    assert w_q.dtype == jnp.dtype(param_dtype)
    np.testing.assert_array_equal(w_q.astype(np.float32), expected.T.reshape(w_q.shape))
    save_hf(model, str(tmp_path / "out"))
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert written["model.embed_tokens.weight"].dtype == jnp.dtype(param_dtype)
    assert json.load(open(tmp_path / "out" / "config.json"))["torch_dtype"] == param_dtype
    again = load_hf(str(tmp_path / "out"), param_dtype=param_dtype)
    for a, b in zip(jax.tree.leaves(_params(model)), jax.tree.leaves(_params(again)), strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_layout_reads_any_block(rng):
    """A device's block of a parameter, read from the Hugging Face tensor, is that block."""
    from lcx.model import TransformerConfig

    cfg = TransformerConfig(vocab_size=12, d_model=8, num_layers=1, num_heads=4,
                            num_kv_heads=2, head_dim=6, mlp_dim=10,
                            attention_bias=True, qk_norm=True)  # fmt: skip
    for path, layout in tensor_layouts(cfg).items():
        full = rng.normal(size=layout.shape).astype(np.float32)
        hf = layout.to_hf(full)
        assert hf.shape == layout.hf_shape
        index = tuple(slice(*sorted(rng.choice(n + 1, 2, replace=False))) for n in layout.shape)
        np.testing.assert_array_equal(layout.read(hf, index), full[index], err_msg=str(path))


MESH_SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from lcx.checkpoints import load_hf
from lcx.train import sharding as sh

assert jax.device_count() == 8
directory, tokens = sys.argv[1], np.load(sys.argv[2])
mesh = sh.make_mesh(sh.MeshShape(data=1, fsdp=4, tensor=2))
one = load_hf(directory)
eight = load_hf(directory, mesh=mesh)
spec = eight.blocks[0].mlp.w_gate[...].sharding.spec
assert tuple(spec) == ("fsdp", "tensor"), spec
shard = eight.blocks[0].mlp.w_gate[...].addressable_shards[0].data
assert shard.shape == (64 // 4, 96 // 2), shard.shape
a = np.asarray(one(jnp.asarray(tokens)))
b = np.asarray(jax.jit(lambda t: eight(t))(jnp.asarray(tokens)))
error = np.abs(a - b).max() / np.abs(a).max()
assert error <= 1e-5, error
print("ok", error)
"""


@pytest.mark.slow
@pytest.mark.torch
def test_sharded_checkpoint_on_eight_devices_gives_one_devices_logits(rng, tmp_path):
    build(str(tmp_path / "hf"), "llama3.1", int(rng.integers(1 << 30)))
    model = load_hf(str(tmp_path / "hf"))
    save_hf(model, str(tmp_path / "sharded"), max_shard_bytes=60_000)
    np.save(tmp_path / "tokens.npy", rng.integers(0, 128, (2, 16)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)  # fmt: skip
    args = [str(tmp_path / "sharded"), str(tmp_path / "tokens.npy")]
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


def _rewrite(path, change):
    """Rewrite a safetensors file with `change(tensors)` applied."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.torch
def test_bad_directories_fail_in_one_line_naming_the_file(rng, tmp_path):
    seed = int(rng.integers(1 << 30))
    with pytest.raises(ValueError, match=r"no config.json"):
        load_hf(str(tmp_path))
    build(str(tmp_path / "a"), "llama2", seed)
    config = json.load(open(tmp_path / "a" / "config.json"))
    json.dump(
        {**config, "architectures": ["GPT2LMHeadModel"]}, open(tmp_path / "a" / "config.json", "w")
    )
    with pytest.raises(
        ValueError, match=r"GPT2LMHeadModel is not supported; supported: .*Qwen3"
    ) as e:
        load_hf(str(tmp_path / "a"))
    assert "\n" not in str(e.value) and all(name in str(e.value) for name in FAMILIES)
    json.dump(config, open(tmp_path / "a" / "config.json", "w"))
    weights = str(tmp_path / "a" / "model.safetensors")
    _rewrite(weights, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"up_proj.weight' is missing .*shape \[96, 64\]"):
        load_hf(str(tmp_path / "a"))
    build(str(tmp_path / "b"), "qwen2", seed)
    weights = str(tmp_path / "b" / "model.safetensors")
    _rewrite(weights, lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: the tensor 'model.norm.weight' has shape \[63\]; "
        r"config.json implies \[64\]",
    ):
        load_hf(str(tmp_path / "b"))
    build(str(tmp_path / "c"), "qwen3", seed)
    save_hf(load_hf(str(tmp_path / "c")), str(tmp_path / "d"), max_shard_bytes=60_000)
    second = sorted(os.listdir(tmp_path / "d"))[2]  # config, shard 1, shard 2, ...
    assert second.startswith("model-00002-of-"), second
    os.remove(tmp_path / "d" / second)
    with pytest.raises(ValueError, match=rf"index.json: lists the shard '{second}', which is not"):
        load_hf(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"not empty"):
        save_hf(load_hf(str(tmp_path / "c")), str(tmp_path / "c"))


def test_export_refuses_lact_models():
    from lcx.model import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                            head_dim=8, mlp_dim=16, block_pattern=("attention", "lact"),
                            lact=dict(chunk_size=8, window=8))  # fmt: skip
    with pytest.raises(ValueError, match=r"LaCT layers do not"):
        save_hf(Transformer(cfg, rngs=nnx.Rngs(0)), "/nonexistent/out")


def test_fixture_families_cover_every_supported_architecture():
    names = {c.removesuffix("Config") + "ForCausalLM" for c, _ in hf_fixtures.VARIANTS.values()}
    assert names == set(FAMILIES)
