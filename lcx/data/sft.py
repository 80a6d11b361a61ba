"""Supervised fine-tuning data: conversations to token ids and per-token loss weights
(`lcx.posttrain.sft` is its public face).

`encode` renders a conversation with its tokenizer's chat template and marks what a
model should learn to say: weight 1 on every assistant turn's tokens and the end-of-turn
token(s) that close it, 0 on system and user turns and on the template's scaffolding
(role headers, the generation prompt). The spans are found by rendering growing prefixes
of the conversation, the idea behind TRL's assistant-only loss: the tokens of assistant
turn i are those the full rendering of messages[:i + 1] adds to the rendering of
messages[:i] with the generation prompt, so no template's strings are parsed and any
template whose prefixes render consistently works (Llama 3, ChatML/Qwen, lcx's byte
template); one that re-renders earlier turns (e.g. dropping earlier reasoning) is a
one-line error.

`load_chat_split` is `config.data.format = "chat"`: JSONL conversations
(`lcx.data.conversations`) split into train and eval, encoded, cached like a text corpus
(`lcx.data.store`), their weights beside the tokens. The loss is then Σ w·ce / Σ w over
the global batch (`lcx.train.step.lm_loss`), token-averaged as ProLong's SFT is (Gao et
al., "How to Train Long-Context Language Models (Effectively)", arXiv 2410.02660).
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np

from lcx.data.conversations import Conversations, read_conversations
from lcx.data.corpus import corpus_paths, split_of
from lcx.data.store import TokenizedCorpus, cached_corpus
from lcx.data.tokenizer import token_dtype
from lcx.errors import UserError


def encode(tokenizer, messages) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [L], weights uint8 [L]) of one conversation; weight 1 on the tokens of
    assistant turns (content and the end of turn that closes it), else 0.

    Assistant turn i spans from where the rendering of messages[:i] with the generation
    prompt stops agreeing with the whole conversation's tokens to where the rendering of
    messages[:i + 1] does: a BPE merge across the turn's edge (a reply starting with a
    newline after ChatML's header) moves the edge by a token, never loses the turn."""
    ids = list(tokenizer.apply_chat_template(messages))
    weights = np.zeros(len(ids), np.uint8)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1])
        start, end = _agreeing(before, ids), _agreeing(through, ids)
        if end <= start or end < len(through) - 1:
            raise UserError(
                f"messages[{i}]: the chat template renders this conversation's prefixes "
                "differently from the whole (it re-renders earlier turns), so the assistant "
                "turn's tokens cannot be found; lcx.posttrain.sft needs a template whose "
                "prefixes render as prefixes"
            )
        weights[start:end] = 1
    return np.asarray(ids, np.int32), weights


def turn_stop_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end an assistant turn in generation: EOS, and the special tokens the
    chat template writes right after a reply (Llama 3's <|eot_id|>, ChatML's <|im_end|>,
    which a base tokenizer's EOS is not)."""
    user = [{"role": "user", "content": "x"}]
    before = tokenizer.apply_chat_template(user, add_generation_prompt=True)
    through = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": "y"}])
    tail = list(through[_agreeing(before, through) :])
    ends = [i for i in tail if not tokenizer.decode([i])]  # special tokens decode to nothing
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    return tuple(dict.fromkeys(eos + ends))


def _agreeing(prefix, ids) -> int:
    """How many leading tokens `prefix` shares with `ids`."""
    n = min(len(prefix), len(ids))
    differ = np.flatnonzero(np.asarray(prefix[:n]) != np.asarray(ids[:n]))
    return int(differ[0]) if differ.size else n


def tokenize_conversations(conversations: Conversations, tokenizer) -> TokenizedCorpus:
    """Every conversation encoded, one document each, weights beside the tokens; one
    the template refuses is an error naming its file:line."""
    pieces = []
    for source, messages in zip(conversations.sources, conversations.examples, strict=True):
        try:
            pieces.append(encode(tokenizer, messages))
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    if not pieces:
        raise UserError(
            f"data.paths: no conversation to train on (skipped: {conversations.skipped})"
        )
    lengths = np.asarray([0] + [len(ids) for ids, _ in pieces])
    return TokenizedCorpus(
        np.concatenate([ids for ids, _ in pieces]).astype(token_dtype(tokenizer.vocab_size)),
        np.cumsum(lengths, dtype=np.int64),
        weights=np.concatenate([w for _, w in pieces]),
        skipped=dict(conversations.skipped),
    )


def _jsonl_files(paths) -> list[str]:
    """Files named in `paths`; directories give their *.jsonl files, sorted."""
    files = []
    for path in paths:
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".jsonl")]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"data.paths: {path!r} does not exist")
    return files


def _subset(conversations: Conversations, keep) -> Conversations:
    """The examples at indices `keep`, with the same skip counts."""
    return Conversations(
        [conversations.examples[i] for i in keep],
        [conversations.sources[i] for i in keep],
        conversations.skipped,
    )


def _split(conversations: Conversations, split: str, eval_fraction: float):
    """(one split of the conversations, how it was made)."""
    n = len(conversations.examples)
    is_eval = [
        split_of(os.path.basename(s), eval_fraction) == "eval" for s in conversations.sources
    ]
    if 0 < sum(is_eval) < n:
        keep = [i for i in range(n) if is_eval[i] == (split == "eval")]
        return _subset(conversations, keep), "split by conversation"
    if n < 2:
        raise UserError(f"data.paths: {n} conversation(s) are too few to hold some out")
    held = max(1, math.ceil(eval_fraction * n))
    keep = range(n - held, n) if split == "eval" else range(n - held)
    how = f"too few conversations to split by hash: the last {held} are held out"
    return _subset(conversations, list(keep)), how


def load_chat_split(data_cfg, split: str, workdir: str | None, tokenizer):
    """(tokenized conversations of one split, how the split was made). `data_cfg`:
    lcx.settings.DataSettings. The files are read and split each run (JSON is quick);
    the encoding is cached under WORKDIR/cache like a text corpus, keyed by the
    conversations, the tokenizer and its template."""
    paths, eval_paths = corpus_paths(data_cfg.paths), corpus_paths(data_cfg.eval_paths)
    if not paths:
        raise UserError('data.format="chat" needs data.paths: JSONL files of conversations')
    chosen = eval_paths if (eval_paths and split == "eval") else paths
    files = _jsonl_files(chosen)
    if not files:
        raise UserError(f"data.paths: no .jsonl files in {chosen}")
    conversations = read_conversations(files, skip_bad_lines=data_cfg.skip_bad_lines)
    how = "eval conversations from data.eval_paths"
    if not eval_paths:
        conversations, how = _split(conversations, split, data_cfg.eval_fraction)
    if data_cfg.max_documents > 0:
        count = min(data_cfg.max_documents, len(conversations.examples))
        conversations = _subset(conversations, range(count))
    digest = hashlib.sha256(f"{tokenizer.cache_key}\0{tokenizer.chat_template_key}".encode())
    digest.update(json.dumps([conversations.examples, conversations.skipped]).encode())
    cache = os.path.join(workdir, "cache") if (workdir and data_cfg.cache) else None
    corpus = cached_corpus(
        cache,
        "chat-" + digest.hexdigest()[:20],
        lambda: tokenize_conversations(conversations, tokenizer),
    )
    return corpus, how
