"""Peak host memory while loading a Hugging Face checkpoint: `load_hf` vs reading whole files.

    python benchmarks/hf_load_memory.py                 # the BENCHMARKS.md figures (~620 MB)
    python benchmarks/hf_load_memory.py --smoke         # seconds

Writes a sharded float32 Llama-shaped checkpoint (safetensors files of at most 200 MB
and an index; random tensors written one at a time), then loads it in a fresh process
per case, on 1 CPU device and on a mesh of 8 (fsdp=4, tensor=2), and reports the rise
of the process's peak resident memory (VmHWM, reset after start-up) over its resident
memory just before the load. The CPU devices' buffers live in host memory, so the
loaded model itself counts: the acceptance bound is peak rise <= model bytes + 1.5 x the
largest tensor. The baseline, `whole_files`, does what a direct script would: read
each file with `safetensors.numpy.load_file`, then put its tensors, transposed to lcx's
layout, on the device(s) with the same shardings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = dict(vocab_size=32_000, d_model=1024, num_layers=8, num_heads=16, num_kv_heads=4,
            head_dim=64, mlp_dim=2816)  # fmt: skip
SMOKE = dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=16, mlp_dim=128)  # fmt: skip


def write_checkpoint(directory: str, fields: dict, shard_bytes: int) -> None:
    """A random float32 Llama checkpoint of `fields`, tensor by tensor, in shards."""
    from safetensors.numpy import save_file

    from lcx.checkpoints.hf_config import write_config_dict
    from lcx.checkpoints.hf_layout import tensor_layouts
    from lcx.model import TransformerConfig

    cfg = TransformerConfig(**fields)
    rng = np.random.default_rng(0)
    layouts = list(tensor_layouts(cfg).values())
    shards, current, used = [], [], 0
    for layout in layouts:
        size = 4 * int(np.prod(layout.hf_shape))
        if current and used + size > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(layout)
        used += size
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {t.name: rng.standard_normal(t.hf_shape, np.float32) * 0.02 for t in shard}
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(write_config_dict(cfg, "LlamaForCausalLM"), f)


LOAD = r"""
import json, os, sys
import jax, numpy as np

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

directory, method, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
from lcx.checkpoints import load_hf
from lcx.checkpoints.hf_layout import tensor_layouts
from lcx.checkpoints.hf import hf_model_config
from lcx.train import sharding as sh
mesh = sh.make_mesh(sh.MeshShape(data=1, fsdp=4, tensor=2)) if devices == 8 else None
cfg = hf_model_config(directory)
jax.block_until_ready(jax.device_put(np.zeros(4)))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident size (VmHWM) to the current one
before = status("VmRSS")
if method == "load_hf":
    model = load_hf(directory, mesh=mesh)
    arrays = jax.tree.leaves(__import__("flax").nnx.state(model))
else:
    from lcx.checkpoints.hf import _param_shardings
    from lcx.train.step import abstract_model
    from safetensors.numpy import load_file
    _, abstract = abstract_model(cfg)
    shardings = _param_shardings(abstract, mesh, None)
    by_name = {layout.name: (path, layout) for path, layout in tensor_layouts(cfg).items()}
    index = json.load(open(os.path.join(directory, "model.safetensors.index.json")))
    arrays = []
    for name in sorted(set(index["weight_map"].values())):
        tensors = load_file(os.path.join(directory, name))
        for key, tensor in tensors.items():
            path, layout = by_name[key]
            sharding = shardings
            for part in path:
                sharding = sharding[part]
            lcx = np.transpose(tensor.reshape(layout.split), layout.perm)
            arrays.append(jax.device_put(lcx, sharding))
        del tensors
jax.block_until_ready(arrays)
peak = status("VmHWM")
held = sum(s.data.nbytes for a in arrays for s in a.addressable_shards)
largest = max(4 * int(np.prod(t.hf_shape)) for t in tensor_layouts(cfg).values())
print(json.dumps({"peak_rise": peak - before, "device_bytes": held, "largest_tensor": largest}))
"""


def measure(directory: str, method: str, devices: int) -> dict:
    """One load in a fresh process: its peak memory rise and what it holds."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    result = subprocess.run([sys.executable, "-c", LOAD, directory, method, str(devices)],
                            env=env, capture_output=True, text=True, check=False)  # fmt: skip
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny checkpoint, seconds")
    args = parser.parse_args(argv)
    fields = SMOKE if args.smoke else FULL
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory, fields, shard_bytes=(1 << 20) if args.smoke else 200 << 20)
        size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
        print(f"checkpoint: {size / 2**20:.0f} MiB float32, {fields}")
        print(f"{'devices':>7} {'method':>11} {'peak rise':>10} {'model':>9} {'largest':>9} "
              f"{'(peak - model) / largest':>25}")  # fmt: skip
        for devices in (1, 8):
            for method in ("load_hf", "whole_files"):
                row = {"devices": devices, "method": method, **measure(directory, method, devices)}
                row["excess_over_largest"] = (row["peak_rise"] - row["device_bytes"]) / row[
                    "largest_tensor"
                ]
                rows.append(row)
                mib = 2**20
                print(f"{devices:>7} {method:>11} {row['peak_rise'] / mib:>8.0f}Mi "
                      f"{row['device_bytes'] / mib:>7.0f}Mi {row['largest_tensor'] / mib:>7.0f}Mi "
                      f"{row['excess_over_largest']:>25.2f}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
