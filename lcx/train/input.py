"""From `config.data` / `config.train` to grain datasets of packed batches."""

from __future__ import annotations

import os

import jax

from lcx.data import ByteTokenizer, load_or_tokenize, select_documents
from lcx.packing import PipelineOptions, packed_dataset


class EmptySplitError(ValueError):
    """A split of the corpus has no documents (too few files for the eval fraction)."""


def corpus_paths(paths) -> tuple[str, ...]:
    """`config.data.paths` as a tuple; a string is a comma-separated list."""
    if isinstance(paths, str):
        return tuple(p for p in paths.split(",") if p)
    return tuple(paths or ())


def load_split(data_cfg, split: str, workdir: str | None):
    """The tokenized corpus of one split, cached under WORKDIR/cache when enabled."""
    tokenizer = ByteTokenizer()
    docs = select_documents(
        corpus_paths(data_cfg.paths),
        split,
        eval_fraction=data_cfg.eval_fraction,
        max_documents=data_cfg.max_documents,
    )
    if not docs:
        raise EmptySplitError(
            f"data.paths: the {split} split has no documents; add files or change "
            f"data.eval_fraction={data_cfg.eval_fraction}"
        )
    cache = os.path.join(workdir, "cache") if (workdir and data_cfg.cache) else None
    return load_or_tokenize(docs, tokenizer, cache)


DD_KEYS = ("dd_min_log2", "dd_max_log2", "dd_curriculum", "dd_cycles")


def make_dataset(corpus, data_cfg, *, seq_len, global_batch_size, seed, train: bool):
    """This process's share of the batches: shuffled and repeated for training."""
    count = jax.process_count()
    if global_batch_size % count:
        raise ValueError(
            f"train.batch_size={global_batch_size} must divide among {count} processes"
        )
    # Dataset Decomposition and ChunkFlow shape training batches; evaluation packs rows.
    packing = data_cfg.packing
    if packing in ("dd", "chunkflow") and not train:
        packing = "first_fit"
    dd = {k: data_cfg[k] for k in DD_KEYS if k in data_cfg}
    opts = PipelineOptions(
        seq_len=seq_len,
        batch_size=global_batch_size // count,
        packing=packing,
        **dd,
        num_packing_bins=data_cfg.num_packing_bins,
        seed=seed,
        shuffle=train,
        num_epochs=None,
        pad_id=ByteTokenizer().pad_id,
        shard_index=jax.process_index(),
        shard_count=count,
    )
    return packed_dataset(corpus, opts)
