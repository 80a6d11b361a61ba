"""The packing strategies, one registry: `config.data.packing` names an entry of REGISTRY.

A strategy is a `build(corpus, PipelineOptions) -> grain.IterDataset` of batches
{tokens, segment_ids, positions} (int32 [B, T]), the dataclass of its settings (read from
`config.data.<name>`), and what training must know of its batches. Adding one is a
module with its builder and one line in REGISTRY (docs/extending.md).

Prepacking (Zhao et al., arXiv 2404.09529) and grain's packers fill rows; Dataset
Decomposition (Pouransari et al., arXiv 2405.13226) and ChunkFlow (Yuan et al., arXiv
2503.02356) shape whole batches (`lcx.packing.decomposition`, `lcx.packing.chunkflow`).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain

from lcx.data.store import TokenizedCorpus
from lcx.errors import UserError
from lcx.packing import chunkflow, decomposition, pipeline


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One packing strategy: its batches, its settings and what training must know."""

    build: Callable[[TokenizedCorpus, PipelineOptions], grain.IterDataset]
    settings: type | None = None  # frozen dataclass of config.data.<name>; None: no settings
    # Builds each training batch whole (one bucket's shape per step, or rows that depend
    # on each other): one step per batch (no micro-batches, no adaptive batch size, no
    # ring); evaluation packs its rows with `eval_packing` instead.
    whole_batches: bool = False
    eval_packing: str | None = None
    # Rows of one document follow each other and depend on the earlier ones (ChunkFlow):
    # attention-only models, and the step runs them in order.
    dependent_rows: bool = False
    # Every document piece lands whole in one row (or, ChunkFlow, in consecutive rows
    # that see each other): what conversations need, never cut inside a turn.
    keeps_documents_whole: bool = True
    # check_options(PipelineOptions) and check_training(settings, *, batch_size, seq_len,
    # batch_shards) raise a one-line ValueError for what the strategy cannot build.
    check_options: Callable[[PipelineOptions], Any] | None = None
    check_training: Callable[..., None] | None = None


REGISTRY: Mapping[str, Strategy] = types.MappingProxyType(
    {
        "first_fit": Strategy(
            pipeline.grain_packer(grain.experimental.FirstFitPackIterDataset),
            pipeline.PackerSettings,
        ),
        "best_fit": Strategy(
            pipeline.grain_packer(grain.experimental.BestFitPackIterDataset),
            pipeline.PackerSettings,
        ),
        "concat_chunk": Strategy(pipeline.concat_chunk_rows, keeps_documents_whole=False),
        "ffd": Strategy(pipeline.ffd_rows),
        "padded": Strategy(pipeline.padded_rows),
        "dd": Strategy(
            decomposition.decomposed_dataset,
            decomposition.DecompositionSettings,
            whole_batches=True,
            eval_packing="first_fit",
            keeps_documents_whole=False,
            check_options=decomposition.decomposition_options,
            check_training=decomposition.check_longest_bucket,
        ),
        "chunkflow": Strategy(
            chunkflow.chunkflow_rows,
            whole_batches=True,
            eval_packing="first_fit",
            dependent_rows=True,
        ),
    }
)
STRATEGIES = tuple(REGISTRY)  # the names, in order


def strategy(name: str) -> Strategy:
    """The registered strategy `name`, or a one-line error listing the valid names."""
    if name not in REGISTRY:
        raise UserError(f"data.packing={name!r}; valid: {tuple(REGISTRY)}")
    return REGISTRY[name]


def strategy_settings(name: str, values: Any):
    """`values` (a mapping such as config.data.<name>, or the settings object) as the
    strategy's settings; None for a strategy without settings."""
    cls = strategy(name).settings
    if cls is None:
        if values:
            raise UserError(f"data.{name}: packing={name!r} takes no settings; got {values}")
        return None
    if isinstance(values, cls):
        return values
    if values is None:
        fields = [f.name for f in dataclasses.fields(cls)]
        raise UserError(f"data.{name} is needed for packing={name!r}: a dict of {fields}")
    values = dict(values)
    valid = {f.name for f in dataclasses.fields(cls)}
    if set(values) != valid:
        raise UserError(f"data.{name}={values}: needs exactly the keys {sorted(valid)}")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How batches are built from a tokenized corpus: the strategy and its settings, the
    batch shape, the seed and this host's shard."""

    seq_len: int
    batch_size: int
    pad_id: int  # the tokenizer's pad id, never a real token
    packing: str = "first_fit"
    settings: Any = None  # the strategy's settings, or a mapping of them (config.data.<name>)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    shard_index: int = 0
    shard_count: int = 1

    def __post_init__(self):
        object.__setattr__(self, "settings", strategy_settings(self.packing, self.settings))
        if self.seq_len <= 1 or self.batch_size <= 0:
            raise UserError(
                f"seq_len={self.seq_len} must be > 1 and batch_size={self.batch_size} > 0"
            )
        check = strategy(self.packing).check_options
        if check is not None:
            check(self)


def packed_dataset(corpus: TokenizedCorpus, opts: PipelineOptions) -> grain.IterDataset:
    """A grain IterDataset of batches {tokens, segment_ids, positions}, each int32 [B, T].

    For whole-batch strategies B and T may change between steps ("dd": one bucket's
    shape per step, B * T fixed, repeating forever whatever `num_epochs`).
    """
    if corpus.num_tokens == 0:
        raise UserError(
            f"data.paths: the corpus is empty; data.packing={opts.packing!r} needs tokens"
        )
    return strategy(opts.packing).build(corpus, opts)


def mixed_dataset(
    sources: Sequence[tuple[TokenizedCorpus, float]], opts: PipelineOptions
) -> grain.IterDataset:
    """Batches whose rows come from several corpora in proportion to their weights.

    Each corpus is packed on its own by `opts.packing` (a row never mixes sources, as
    ProLong mixes its long and short data by sequence: Gao et al., arXiv 2410.02660);
    grain's `IterDataset.mix` interleaves the rows by weight, deterministically and with
    its position in the iterator's checkpointed state, then rows are batched.
    """
    if strategy(opts.packing).whole_batches:
        raise UserError(
            f"data.sources: data.packing={opts.packing!r} builds whole batches, which cannot be "
            "mixed row by row; use a row packer (first_fit, best_fit, ffd, concat_chunk, padded)"
        )
    weights = [float(w) for _, w in sources]
    if not sources or min(weights) <= 0:
        raise UserError(f"data.sources: weights {weights} must be positive, one per source")
    one_row = dataclasses.replace(opts, batch_size=1)
    rows = [
        packed_dataset(corpus, dataclasses.replace(one_row, seed=opts.seed + i)).map(_only_row)
        for i, (corpus, _) in enumerate(sources)
    ]
    mixed = grain.IterDataset.mix(rows, weights)
    return mixed.batch(opts.batch_size, drop_remainder=opts.num_epochs is None)


def _only_row(batch):
    """A batch of one row -> the row."""
    return {k: v[0] for k, v in batch.items()}
