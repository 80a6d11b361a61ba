"""Hugging Face `config.json` <-> `TransformerConfig` for the supported families.

Llama (2, 3, 3.1 with `llama3` RoPE scaling, 3.2 with tied embeddings), Mistral (its
`sliding_window` on every layer), Qwen2/2.5 (q/k/v biases) and Qwen3 (q/k RMSNorm) are
the same decoder with optional pieces; a family is one registry line naming them. Both
config formats are read: transformers 5's `rope_parameters` and the older `rope_theta`
plus `rope_scaling` that most published checkpoints carry.
"""

from __future__ import annotations

import dataclasses
import json
import os

from lcx.errors import UserError
from lcx.model import TransformerConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face architecture: its model_type and the optional pieces it uses."""

    model_type: str
    attention_bias: bool = False  # q/k/v projections always carry biases (Qwen2)
    qk_norm: bool = False  # q_norm / k_norm over head_dim (Qwen3)
    sliding_window: bool = False  # `sliding_window` applies to every layer (Mistral)


# architectures[0] of config.json -> its family.
FAMILIES = {
    "LlamaForCausalLM": Family("llama"),
    "MistralForCausalLM": Family("mistral", sliding_window=True),
    "Qwen2ForCausalLM": Family("qwen2", attention_bias=True),
    "Qwen3ForCausalLM": Family("qwen3", qk_norm=True),
}
ACTIVATIONS = ("silu", "swish")  # SwiGLU's gate; both names mean x * sigmoid(x)


def read_json(path: str) -> dict:
    """A JSON file, with a one-line error naming it when absent or unreadable."""
    if not os.path.isfile(path):
        directory = os.path.dirname(path) or "."
        raise UserError(
            f"{directory}: no {os.path.basename(path)}; a Hugging Face model directory "
            "holds config.json and *.safetensors"
        )
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None


def architecture_of(hf: dict, path: str) -> str:
    """The supported architecture named by a config.json, or a one-line error."""
    names = hf.get("architectures") or []
    name = names[0] if names else f"model_type={hf.get('model_type')!r}"
    if name not in FAMILIES:
        raise UserError(
            f"{path}: architecture {name} is not supported; supported: {sorted(FAMILIES)}"
        )
    return name


def _rope(hf: dict, path: str):
    """(theta, scaling or None) from either config format."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    scaling = dict(hf.get("rope_scaling") or {})
    if params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    kind = scaling.pop("type", None) or scaling.get("rope_type")
    if not scaling and kind is None or kind == "default":
        return theta, None
    scaling["rope_type"] = kind
    keys = {
        "linear": ("factor",),
        "llama3": (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ),
    }
    if kind not in keys:
        raise UserError(
            f"{path}: RoPE scaling {kind!r} is not supported; supported: {sorted(keys)}"
        )
    return theta, {"rope_type": kind, **{k: scaling[k] for k in keys[kind]}}


def read_config(directory: str) -> tuple[dict, str]:
    """(TransformerConfig fields, architecture) of a Hugging Face model directory."""
    path = os.path.join(directory, "config.json")
    hf = read_json(path)
    architecture = architecture_of(hf, path)
    family = FAMILIES[architecture]
    if hf.get("hidden_act", "silu") not in ACTIVATIONS:
        raise UserError(f"{path}: hidden_act={hf['hidden_act']!r}; supported: {ACTIVATIONS}")
    if hf.get("mlp_bias"):
        raise UserError(f"{path}: mlp_bias=true is not supported (no family here uses it)")
    if hf.get("attention_bias") and not family.attention_bias:
        raise UserError(
            f"{path}: attention_bias=true for {architecture} (biases on o_proj too) is not "
            "supported"
        )
    if hf.get("use_sliding_window"):
        raise UserError(
            f"{path}: use_sliding_window=true (a window on some layers only) is not supported"
        )
    try:
        heads = int(hf["num_attention_heads"])
        theta, scaling = _rope(hf, path)
        fields = dict(
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            mlp_dim=int(hf["intermediate_size"]),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            attention_bias=family.attention_bias,
            qk_norm=family.qk_norm,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_window=(hf.get("sliding_window") if family.sliding_window else None),
        )
    except KeyError as e:
        raise UserError(f"{path}: missing the field {e.args[0]!r}") from None
    return fields, architecture


def family_of(cfg: TransformerConfig) -> str:
    """The Hugging Face architecture that computes the same function as `cfg`."""
    if set(cfg.block_pattern) != {"attention"}:
        raise UserError(
            f"model.block_pattern={cfg.block_pattern}: only attention layers have a Hugging "
            "Face architecture (LaCT layers do not)"
        )
    wanted = Family(
        "",
        attention_bias=cfg.attention_bias,
        qk_norm=cfg.qk_norm,
        sliding_window=cfg.attention_window is not None,
    )
    for name, family in FAMILIES.items():
        if dataclasses.replace(family, model_type="") == wanted:
            return name
    raise UserError(
        "no supported Hugging Face architecture has this model's combination of "
        f"attention_bias={cfg.attention_bias}, qk_norm={cfg.qk_norm}, "
        f"attention_window={cfg.attention_window}; supported: {sorted(FAMILIES)}"
    )


def write_config_dict(cfg: TransformerConfig, architecture: str, **special_ids) -> dict:
    """The config.json of `cfg` as `architecture`, in both RoPE formats (old and new)."""
    family = FAMILIES[architecture]
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    rope_parameters = {"rope_theta": cfg.rope_theta, **(scaling or {"rope_type": "default"})}
    hf = {
        "architectures": [architecture],
        "model_type": family.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": max(
            131_072, int((scaling or {}).get("original_max_position_embeddings", 0))
        ),
        "torch_dtype": cfg.param_dtype,
        "dtype": cfg.param_dtype,
        **{k: v for k, v in special_ids.items() if v is not None},
    }
    if family.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = False
    if family.model_type == "llama":
        hf["mlp_bias"] = False
    if family.sliding_window:
        hf["sliding_window"] = cfg.attention_window
    if family.model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    return hf
