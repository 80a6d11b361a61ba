"""Where a run's model and tokenizer come from: `config.model`, or a Hugging Face checkpoint.

With `init.hf_checkpoint=DIR` the architecture (sizes, vocabulary, RoPE, biases, norms)
is the checkpoint's `config.json`; `config.model` then only says how to run it
(HF_RUN_FIELDS), and `init.rope_theta` > 0 raises the RoPE base for continued long-context
training (ProLong, arXiv 2410.02660). Without one, `model.vocab_size` None takes the
tokenizer's vocabulary rounded up to a multiple of 128. Either way the tokenizer must fit
the model's vocabulary.
"""

from __future__ import annotations

from lcx.data.tokenizer import check_vocabulary, make_tokenizer
from lcx.model import TransformerConfig
from lcx.settings import Settings

# config.model fields applied on top of an imported architecture: how it runs and what
# trains (LoRA adapters beside its frozen weights), not what it is.
HF_RUN_FIELDS = (
    "dtype",
    "param_dtype",
    "attention_implementation",
    "remat",
    "scan_layers",
    "lora",
)


def hf_checkpoint(config: Settings) -> str:
    """`init.hf_checkpoint`, or "" for a model trained from scratch."""
    return config.init.hf_checkpoint


def tokenizer_of(config: Settings):
    """The run's tokenizer (`data.tokenizer`; "checkpoint": the imported one's)."""
    return make_tokenizer(config.data, hf_checkpoint(config))


def model_config(config: Settings, tokenizer=None) -> TransformerConfig:
    """The run's TransformerConfig, checked against its tokenizer."""
    from lcx.checkpoints import hf_model_config

    tokenizer = tokenizer or tokenizer_of(config)
    fields = config.model.fields()
    directory = hf_checkpoint(config)
    if directory:
        run = {k: fields[k] for k in HF_RUN_FIELDS}
        if config.init.rope_theta:
            run["rope_theta"] = float(config.init.rope_theta)
        cfg = hf_model_config(directory, **run)
    else:
        if not fields["vocab_size"]:
            fields["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
        cfg = TransformerConfig(**fields)
    check_vocabulary(tokenizer, cfg.vocab_size)
    return cfg
