"""Tiny random Hugging Face models built with transformers itself: the reference for
lcx.checkpoints (nothing can be downloaded here, so every fixture is made locally)."""

from __future__ import annotations

import numpy as np

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
)  # fmt: skip
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}  # fmt: skip
# name -> (transformers config class name, its extra fields): one per supported variant.
VARIANTS = {
    "llama2": ("LlamaConfig", {}),
    "llama3.1": ("LlamaConfig", {"rope_scaling": LLAMA3_SCALING, "rope_theta": 500_000.0}),
    "llama3.2": ("LlamaConfig", {"rope_scaling": LLAMA3_SCALING, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {}),
}


def build(directory: str, variant: str, seed: int, *, dtype="float32", **fields):
    """A random `variant` model saved to `directory` by transformers; the torch model.

    Weights are drawn wider than transformers' init (std 0.2, norms 1 +- 0.1) so every
    piece of the architecture moves the logits.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    class_name, extra = VARIANTS[variant]
    config = getattr(transformers, class_name)(**{**COMMON, **extra, **fields})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "norm" in name
            p.copy_(torch.randn_like(p) * (0.1 if norm else 0.2) + (1.0 if norm else 0.0))
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(directory)
    return model


def hf_logits(model, tokens) -> np.ndarray:
    """transformers' float32 logits [B, T, V] of int tokens [B, T]."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def max_relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())
