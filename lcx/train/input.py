"""From `config.data` / `config.train` (resolved: lcx.settings) to grain datasets of packed
batches."""

from __future__ import annotations

import os

import grain
import jax
import numpy as np

from lcx.data import load_or_tokenize, make_tokenizer, select_documents, split_tail
from lcx.data.corpus import corpus_paths, user_documents
from lcx.errors import UserError
from lcx.packing import PipelineOptions, packed_dataset, strategy
from lcx.settings import DataSettings


class EmptySplitError(ValueError):
    """A split of the corpus has no documents (too few files for the eval fraction)."""


def load_split(data_cfg: DataSettings, split: str, workdir: str | None, tokenizer=None):
    """(tokenized corpus of one split, how the split was made), cached under WORKDIR/cache.

    Eval documents come from `data.eval_paths` when given (train then uses every file of
    `data.paths`); else documents are split by a hash of their path; when that leaves a
    split empty (one file, or a few), the last `data.eval_fraction` of the tokens is held
    out instead. `tokenizer`: default `make_tokenizer(data_cfg)`.
    """
    cache = os.path.join(workdir, "cache") if (workdir and data_cfg.cache) else None
    tokenizer = tokenizer or make_tokenizer(data_cfg)

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


def _truncated(docs, data_cfg):
    """The first `data.max_documents` documents (all when 0)."""
    return docs[: data_cfg.max_documents] if data_cfg.max_documents > 0 else docs


def make_dataset(
    corpus, data_cfg: DataSettings, *, seq_len, global_batch_size, seed, train: bool, pad_id: int
):
    """This process's share of the batches: shuffled and repeated for training.

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
    datasets = [
        packed_dataset(
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
