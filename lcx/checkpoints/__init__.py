"""Pretrained checkpoints: Hugging Face model directories in (`load_hf`) and out (`save_hf`).

Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3 (`FAMILIES`), float32/bf16/fp16
safetensors, one file or sharded; loaded straight into a mesh's sharded layout.
"""

from lcx.checkpoints.hf import hf_model_config, load_hf, load_params, save_hf
from lcx.checkpoints.hf_config import FAMILIES, family_of, read_config
from lcx.checkpoints.hf_layout import TensorLayout, tensor_layouts

__all__ = [
    "FAMILIES",
    "TensorLayout",
    "family_of",
    "hf_model_config",
    "load_hf",
    "load_params",
    "read_config",
    "save_hf",
    "tensor_layouts",
]
