"""From `config.data` / `config.train` (resolved: lcx.settings) to grain datasets of packed
batches."""

from __future__ import annotations

import dataclasses
import os

import grain
import jax
import numpy as np

from lcx.data import load_or_tokenize, make_tokenizer, select_documents, split_tail
from lcx.data.corpus import corpus_paths, user_documents
from lcx.data.sft import load_chat_split
from lcx.errors import UserError
from lcx.packing import REGISTRY, PipelineOptions, mixed_dataset, packed_dataset, strategy
from lcx.settings import DataSettings


class EmptySplitError(ValueError):
    """A split of the corpus has no documents (too few files for the eval fraction)."""


def load_split(data_cfg: DataSettings, split: str, workdir: str | None, tokenizer=None):
    """(tokenized corpus of one split, how the split was made), cached under WORKDIR/cache.

    Eval documents come from `data.eval_paths` when given (train then uses every file of
    `data.paths`); else documents are split by a hash of their path; when that leaves a
    split empty (one file, or a few), the last `data.eval_fraction` of the tokens is held
    out instead. `tokenizer`: default `make_tokenizer(data_cfg)`. With `data.format =
    "chat"` the files are JSONL conversations (`lcx.data.sft.load_chat_split`).
    """
    tokenizer = tokenizer or make_tokenizer(data_cfg)
    if data_cfg.format == "chat":
        return load_chat_split(data_cfg, split, workdir, tokenizer)
    cache = os.path.join(workdir, "cache") if (workdir and data_cfg.cache) else None

    def tokenized(docs):
        return load_or_tokenize(
            docs,
            tokenizer,
            cache,
            keep_binary=data_cfg.keep_binary,
            join_directories=data_cfg.join_directories,
        )

    paths = corpus_paths(data_cfg.paths)
    eval_paths = corpus_paths(data_cfg.eval_paths)
    if eval_paths:
        docs = user_documents(eval_paths if split == "eval" else paths)
        if not docs:
            raise EmptySplitError(f"data.{'eval_' if split == 'eval' else ''}paths: no files")
        return tokenized(_truncated(docs, data_cfg)), "eval files from data.eval_paths"
    by_split = {
        s: select_documents(paths, s, eval_fraction=data_cfg.eval_fraction)
        for s in ("train", "eval")
    }
    if all(by_split.values()):
        return tokenized(_truncated(by_split[split], data_cfg)), "split by document"
    docs = _truncated(by_split["train"] + by_split["eval"], data_cfg)
    if not docs:
        raise EmptySplitError("data.paths: no documents")
    train, held_out = split_tail(tokenized(docs), data_cfg.eval_fraction)
    how = (
        f"too few files to split by document: the last {held_out.num_tokens} tokens are "
        "held out for evaluation"
    )
    return (held_out if split == "eval" else train), how


def load_corpus(data_cfg: DataSettings, split: str, workdir, tokenizer, seq_len: int):
    """(what `make_dataset` packs, a line for the run summary): one split's corpus, or
    with `data.sources` a list of (corpus, weight), one per source. Conversations longer
    than `seq_len` are left out (trained whole or not at all), and with `min_tokens`
    documents shorter than it; both are counted in the summary."""

    if data_cfg.format == "chat" and not strategy(data_cfg.packing).keeps_documents_whole:
        whole = [name for name, s in REGISTRY.items() if s.keeps_documents_whole]
        raise UserError(
            f"data.packing={data_cfg.packing!r} cuts documents across rows, and a "
            f'conversation must stay whole (data.format="chat"); use one of {whole}'
        )

    def one(cfg, min_tokens=0):
        corpus, how = load_split(cfg, split, workdir, tokenizer)
        if corpus.weights is not None:
            count, corpus = corpus.num_documents, corpus.without_longer_than(seq_len)
            if corpus.num_documents == 0:
                raise UserError(
                    f"data.paths: all {count} {split} conversations are longer than "
                    f"train.seq_len={seq_len} (they are never cut); raise train.seq_len"
                )
        if min_tokens:
            corpus = corpus.keep_documents(corpus.lengths >= min_tokens, "shorter than min_tokens")
        return corpus, how

    if not data_cfg.sources:
        corpus, how = one(data_cfg)
        return corpus, corpus_summary(corpus, split, how)
    mixed, lines = [], []
    for i, source in enumerate(data_cfg.sources):
        cfg = dataclasses.replace(data_cfg, paths=source["paths"], sources=())
        corpus, how = one(cfg, source["min_tokens"])
        if corpus.num_tokens == 0:
            raise UserError(
                f"data.sources[{i}]: no documents left (min_tokens={source['min_tokens']})"
            )
        mixed.append((corpus, source["weight"]))
        lines.append(
            f"[source {i}, weight {source['weight']}] " + corpus_summary(corpus, split, how)
        )
    return mixed, "; ".join(lines)


def corpus_summary(corpus, split: str, how: str) -> str:
    """One line for the run summary: what a split holds and what was skipped, by reason."""
    if corpus.weights is None:
        skipped = f"{corpus.num_empty_skipped} empty"
        if corpus.num_binary_skipped:
            skipped += f" and {corpus.num_binary_skipped} binary"
        dropped = "".join(f", {n} documents {why}" for why, n in corpus.skipped.items() if n)
        return (
            f"{split}: {corpus.num_documents} documents, {corpus.num_tokens} tokens "
            f"({how}), {skipped} files skipped{dropped}"
        )
    trained = int(corpus.weights.sum())
    skipped = ", ".join(f"{n} {reason}" for reason, n in corpus.skipped.items() if n) or "none"
    return (
        f"{split}: {corpus.num_documents} conversations, {corpus.num_tokens} tokens of which "
        f"{trained} are trained on ({how}); skipped: {skipped}"
    )


def _truncated(docs, data_cfg):
    """The first `data.max_documents` documents (all when 0)."""
    return docs[: data_cfg.max_documents] if data_cfg.max_documents > 0 else docs


def make_dataset(
    corpus, data_cfg: DataSettings, *, seq_len, global_batch_size, seed, train: bool, pad_id: int
):
    """This process's share of the batches: shuffled and repeated for training.
    `corpus`: a TokenizedCorpus, or [(corpus, weight), ...] mixed row by row.

    The documents are split into `data.shards` shards (0: one per process), each packed
    and batched on its own; a process reads its consecutive shards and concatenates
    their rows, so the global batch (process 0's rows first) does not depend on how many
    processes read it.
    """
    count = jax.process_count()
    shards = data_cfg.shards or count
    if shards % count or global_batch_size % shards:
        raise UserError(
            f"data.shards={shards} must be a multiple of the {count} processes and divide "
            f"train.batch_size={global_batch_size}"
        )
    # Whole-batch strategies (Dataset Decomposition, ChunkFlow) shape training batches;
    # evaluation packs rows with their eval_packing.
    packing = data_cfg.packing
    if not train and strategy(packing).eval_packing:
        packing = strategy(packing).eval_packing
    settings = data_cfg.packing_settings(packing)
    mine = shards // count
    build = mixed_dataset if isinstance(corpus, list) else packed_dataset
    datasets = [
        build(
            corpus,
            PipelineOptions(
                seq_len=seq_len,
                batch_size=global_batch_size // shards,
                packing=packing,
                settings=settings,
                seed=seed,
                shuffle=train,
                num_epochs=None,
                pad_id=pad_id,
                shard_index=jax.process_index() * mine + j,
                shard_count=shards,
            ),
        )
        for j in range(mine)
    ]
    if mine == 1:
        return datasets[0]
    return grain.experimental.ZipIterDataset(datasets).map(_concatenate_rows)


def _concatenate_rows(batches):
    """One batch of the rows of several shards' batches, in shard order."""
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
