"""Supervised fine-tuning on conversations (Gao et al., arXiv 2410.02660: ProLong's SFT).

`encode(tokenizer, messages) -> (ids, weights)` renders a conversation with the
tokenizer's chat template and puts weight 1 on the assistant turns (found by rendering
growing prefixes), 0 elsewhere; `load_chat_split` reads JSONL conversations for
`config.data.format = "chat"`; training weighs the loss by them (`lcx.train.step.lm_loss`:
Σ w·ce / Σ w). They live in `lcx.data.sft`, beside the corpora, since training's input
pipeline reads them from below this package; this module is where post-training code
and users find them.
"""

from lcx.data.sft import encode, load_chat_split, tokenize_conversations, turn_stop_ids

__all__ = ["encode", "load_chat_split", "tokenize_conversations", "turn_stop_ids"]
