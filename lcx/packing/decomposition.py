"""Dataset Decomposition: power-of-two buckets and a variable-sequence-length curriculum.

Pouransari et al., "Dataset Decomposition: Faster LLM Training with Variable Sequence
Length Curriculum" (arXiv 2405.13226; reference apple/ml-dataset-decomposition,
`scripts/make_dd_buckets.py`). Each document is cut into chunks whose lengths are its
binary expansion (`binary_decomposition`; a document longer than 2^max is cut into
chunks of random k drawn with P(k) ~ 2^(max - k), the reference's `randomize`, seeded);
a chunk of 2^k tokens goes to bucket D_k. No
chunk crosses a document, so rows hold one document each: no padding, no attention
across documents. Every step samples one bucket and yields `tokens_per_step / 2^k`
sequences of 2^k tokens, so tokens per step stay constant while the attention cost
follows the true lengths.

The reference's chunks hold 2^k + 1 tokens (inputs and shifted targets); lcx rows carry
their own next-token targets, so a chunk here is 2^k tokens.

Curricula: bucket k is drawn with probability proportional to its tokens left in the
current cycle times a weight: `uniform` (weights 1: sampling in proportion to the data)
or `grow_p2` (weights 32:16:8:4:2:1 from short to long, the paper's Grow-P2, halving
per bucket beyond six). The epoch is split into `cycles` cycles of equal token budget
per bucket, so short-to-long sweeps repeat. The draw depends only on the shared seed
and step, so every host picks the same bucket; each host then takes its own slice of
the bucket's rows.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from lcx.data.store import TokenizedCorpus
from lcx.errors import UserError

CURRICULA = ("uniform", "grow_p2")


def binary_decomposition(n: int, *, min_log2: int, max_log2: int, rng=None) -> list[int]:
    """Chunk lengths (powers of two, in document order) of a document of n tokens.

    Repeatedly takes 2^k with k = floor(log2(remaining)), capped at max_log2 (with `rng`,
    a capped k is drawn from [min_log2, max_log2] with P(k) ~ 2^(max_log2 - k), as the
    reference's `randomize`); stops when the remainder is shorter than 2^min_log2, which
    is dropped.
    """
    if min_log2 < 0 or max_log2 < min_log2:
        raise ValueError(
            f"min_log2={min_log2}, max_log2={max_log2}: need 0 <= min_log2 <= max_log2"
        )
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    ks = np.arange(max_log2, min_log2 - 1, -1)
    probs = 2.0 ** np.arange(len(ks))
    probs /= probs.sum()
    chunks, left = [], int(n)
    while left >= 1 << min_log2:
        k = left.bit_length() - 1
        if k > max_log2:
            k = int(rng.choice(ks, p=probs)) if rng is not None else max_log2
        chunks.append(1 << k)
        left -= 1 << k
    return chunks


def curriculum_weights(name: str, num_buckets: int) -> np.ndarray:
    """Per-bucket weights, short to long."""
    if name == "uniform":
        return np.ones(num_buckets)
    if name == "grow_p2":
        return 2.0 ** (5 - np.arange(num_buckets))  # 32:16:8:4:2:1 (and on, halving)
    raise UserError(f"data.dd.curriculum={name!r}; valid: {CURRICULA}")


@dataclasses.dataclass(frozen=True)
class DecompositionSettings:
    """`config.data.dd`: bucket lengths 2^min_log2 .. 2^max_log2, the curriculum, cycles."""

    min_log2: int
    max_log2: int
    curriculum: str  # one of CURRICULA
    cycles: int  # short-to-long sweeps per epoch

    def __post_init__(self):
        if self.min_log2 < 0 or self.max_log2 < self.min_log2:
            raise UserError(
                f"data.dd.min_log2={self.min_log2}, data.dd.max_log2={self.max_log2}: "
                "need 0 <= min_log2 <= max_log2"
            )
        if self.cycles <= 0:
            raise UserError(f"data.dd.cycles={self.cycles} must be positive")
        curriculum_weights(self.curriculum, 1)


@dataclasses.dataclass(frozen=True)
class DecompositionOptions:
    """Dataset Decomposition's knobs; tokens_per_step is global (all hosts)."""

    tokens_per_step: int
    min_log2: int
    max_log2: int
    curriculum: str
    cycles: int
    seed: int = 0
    shard_index: int = 0
    shard_count: int = 1

    def __post_init__(self):
        DecompositionSettings(self.min_log2, self.max_log2, self.curriculum, self.cycles)
        rows = self.tokens_per_step >> self.max_log2
        if self.tokens_per_step % (1 << self.max_log2) or rows % self.shard_count:
            raise UserError(
                f"tokens per step {self.tokens_per_step} (train.batch_size * train.seq_len) "
                f"must be a multiple of 2^data.dd.max_log2={1 << self.max_log2} times the "
                f"{self.shard_count} hosts"
            )

    @property
    def num_buckets(self) -> int:
        return self.max_log2 - self.min_log2 + 1


def decompose_corpus(corpus: TokenizedCorpus, opts: DecompositionOptions) -> list[np.ndarray]:
    """Per bucket (short to long), the start offsets of its chunks in corpus.tokens."""
    rng = np.random.default_rng(opts.seed)
    starts = [[] for _ in range(opts.num_buckets)]
    for offset, n in zip(corpus.offsets[:-1].tolist(), corpus.lengths.tolist(), strict=True):
        for length in binary_decomposition(
            n, min_log2=opts.min_log2, max_log2=opts.max_log2, rng=rng
        ):
            starts[length.bit_length() - 1 - opts.min_log2].append(offset)
            offset += length
    return [np.asarray(s, np.int64) for s in starts]


class DecomposedIterator(grain.DatasetIterator):
    """Batches of one bucket per step; state = step, cycle use and per-bucket positions."""

    def __init__(self, corpus: TokenizedCorpus, buckets: list[np.ndarray], opts):
        super().__init__()
        self._tokens, self._buckets, self._opts = corpus.tokens, buckets, opts
        self._token_weights = corpus.weights  # loss weights of conversations, or None
        self._weights = curriculum_weights(opts.curriculum, opts.num_buckets)
        lengths = 1 << (opts.min_log2 + np.arange(opts.num_buckets))
        self._rows = opts.tokens_per_step // lengths  # global rows per step, per bucket
        # A bucket can serve only whole steps; each cycle gets an equal share of them.
        full_steps = np.asarray([len(b) for b in buckets]) // self._rows
        self._steps_per_cycle = np.maximum(full_steps // opts.cycles, 0)
        if self._steps_per_cycle.sum() == 0:
            raise UserError(
                f"no bucket holds tokens for one step of {opts.tokens_per_step} tokens "
                f"over {opts.cycles} cycles; lower train.batch_size or data.dd.cycles"
            )
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # bucket -> (epoch, order)
        zeros = [0] * opts.num_buckets
        self._state = {"step": 0, "cycle_used": list(zeros), "position": list(zeros)}

    def bucket_probabilities(self) -> np.ndarray:
        """P(k) of the next step: weight_k * tokens left in this cycle (a new cycle if none)."""
        left = self._steps_per_cycle - np.asarray(self._state["cycle_used"])
        if left.sum() == 0:
            left = self._steps_per_cycle
        p = self._weights * left  # every step of every bucket holds tokens_per_step tokens
        return p / p.sum()

    def _bucket(self) -> int:
        """This step's bucket, drawn from the shared seed and step (same on every host)."""
        p = self.bucket_probabilities()
        if np.all(self._steps_per_cycle - np.asarray(self._state["cycle_used"]) == 0):
            self._state["cycle_used"] = [0] * len(p)  # a new cycle
        rng = np.random.default_rng([self._opts.seed, self._state["step"]])
        return int(rng.choice(len(p), p=p))

    def _order(self, k: int, epoch: int) -> np.ndarray:
        """Bucket k's chunks in the shuffled order of one of its epochs (cached)."""
        if self._orders.get(k, (None,))[0] != epoch:
            rng = np.random.default_rng([self._opts.seed, k, epoch])
            self._orders[k] = (epoch, rng.permutation(len(self._buckets[k])))
        return self._orders[k][1]

    def __next__(self) -> dict[str, np.ndarray]:
        opts = self._opts
        k = self._bucket()
        rows, length = int(self._rows[k]), 1 << (opts.min_log2 + k)
        size = len(self._buckets[k])
        position = self._state["position"][k]
        global_index = position + np.arange(rows)
        mine = global_index[opts.shard_index :: opts.shard_count]
        order_of = {}
        starts = []
        for g in mine.tolist():
            epoch, i = divmod(g, size)
            if epoch not in order_of:
                order_of[epoch] = self._order(k, epoch)
            starts.append(self._buckets[k][order_of[epoch][i]])
        index = np.asarray(starts)[:, None] + np.arange(length)[None, :]
        self._state["position"][k] = position + rows
        self._state["cycle_used"][k] += 1
        self._state["step"] += 1
        tokens = self._tokens[index].astype(np.int32)
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
        batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": positions}
        if self._token_weights is not None:
            batch["weights"] = self._token_weights[index].astype(np.float32)
        return batch

    def get_state(self) -> dict:
        return {
            "step": int(self._state["step"]),
            "cycle_used": [int(x) for x in self._state["cycle_used"]],
            "position": [int(x) for x in self._state["position"]],
        }

    def set_state(self, state: dict) -> None:
        self._state = {
            "step": int(state["step"]),
            "cycle_used": [int(x) for x in state["cycle_used"]],
            "position": [int(x) for x in state["position"]],
        }


class DecomposedDataset(grain.IterDataset):
    """grain IterDataset of Dataset Decomposition batches [rows_k, 2^k] (this host's rows)."""

    def __init__(self, corpus: TokenizedCorpus, opts: DecompositionOptions):
        super().__init__()
        if corpus.num_documents == 0:
            raise UserError(
                "data.paths: the corpus is empty; Dataset Decomposition needs documents"
            )
        self._corpus, self._opts = corpus, opts
        self.buckets = decompose_corpus(corpus, opts)

    def __iter__(self) -> DecomposedIterator:
        return DecomposedIterator(self._corpus, self.buckets, self._opts)

    def bucket_shapes(self) -> list[tuple[int, int]]:
        """The global batch shape of every bucket, short to long."""
        o = self._opts
        return [(o.tokens_per_step >> k, 1 << k) for k in range(o.min_log2, o.max_log2 + 1)]

    def dropped_tokens(self) -> int:
        """Tokens of the corpus in no bucket (remainders shorter than 2^min_log2)."""
        kept = sum(len(b) << (self._opts.min_log2 + k) for k, b in enumerate(self.buckets))
        return self._corpus.num_tokens - kept


def decomposition_options(opts) -> DecompositionOptions:
    """From PipelineOptions: this host's tokens per step times the hosts, and data.dd."""
    dd = opts.settings
    return DecompositionOptions(
        tokens_per_step=opts.batch_size * opts.seq_len * opts.shard_count,
        min_log2=dd.min_log2,
        max_log2=dd.max_log2,
        curriculum=dd.curriculum,
        cycles=dd.cycles,
        seed=opts.seed,
        shard_index=opts.shard_index,
        shard_count=opts.shard_count,
    )


def decomposed_dataset(corpus: TokenizedCorpus, opts) -> DecomposedDataset:
    """The "dd" strategy: one bucket per step, repeating forever whatever num_epochs."""
    return DecomposedDataset(corpus, decomposition_options(opts))


def check_longest_bucket(dd: DecompositionSettings, *, batch_size, seq_len, batch_shards):
    """The longest bucket's rows per step must split over the mesh's batch shards."""
    rows = (batch_size * seq_len) >> dd.max_log2
    if rows % batch_shards:
        raise UserError(
            f"data.dd.max_log2={dd.max_log2}: the longest bucket has {rows} rows per step, "
            f"not a multiple of the {batch_shards} batch shards of config.mesh"
        )
