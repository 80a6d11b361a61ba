"""Tokenized corpus cache: a flat token array and document offsets in zarr via tensorstore.

The first run tokenizes and writes `WORKDIR/cache/corpus-<fingerprint>/`; later runs with
the same files (path, size, mtime), tokenizer and options read it back. Tokens are
stored as uint16, or uint32 when the tokenizer has more than 65,536 ids. The directory is written
under a temporary name and renamed into place, so an interrupted run never leaves a
half-written cache that a later run would trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import tensorstore as ts

from lcx.data.corpus import Document
from lcx.data.tokenizer import ByteTokenizer, token_dtype
from lcx.errors import UserError

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """Documents as one flat token array (uint16 or uint32) plus offsets (document i is
    [o[i], o[i+1])).

    `weights` (uint8, one per token, or None) is how much each token counts as a
    next-token target: 1 where a model should learn to produce the token, 0 where it
    is only context (a conversation's system and user turns: `lcx.posttrain.sft`).
    None means every token counts, as in pre-training. `skipped` counts the examples
    left out while reading, by reason (conversations: bad lines, no assistant turn).
    """

    tokens: np.ndarray
    offsets: np.ndarray
    num_empty_skipped: int = 0
    num_binary_skipped: int = 0
    weights: np.ndarray | None = None
    skipped: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def document_weights(self, i: int) -> np.ndarray | None:
        """Document i's token weights (None: an unweighted corpus)."""
        if self.weights is None:
            return None
        return self.weights[self.offsets[i] : self.offsets[i + 1]]

    def without_longer_than(self, max_len: int) -> TokenizedCorpus:
        """The corpus minus its documents of more than `max_len` tokens, counted in
        `skipped` ("longer than seq_len"): a conversation is trained whole or not at all,
        never cut inside a turn."""
        return self.keep_documents(self.lengths <= max_len, "longer than seq_len")

    def keep_documents(self, keep: np.ndarray, reason: str) -> TokenizedCorpus:
        """The documents where `keep` (bool [documents]) holds; the others are counted in
        `skipped[reason]`."""
        keep = np.flatnonzero(keep)
        lengths = self.lengths
        dropped = len(lengths) - len(keep)
        if not dropped:
            return self
        index = np.concatenate(
            [np.arange(self.offsets[i], self.offsets[i + 1]) for i in keep] or [[]]
        ).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
        skipped = dict(self.skipped)
        skipped[reason] = skipped.get(reason, 0) + dropped
        return dataclasses.replace(
            self,
            tokens=self.tokens[index],
            offsets=offsets,
            weights=None if self.weights is None else self.weights[index],
            skipped=skipped,
        )


def fingerprint(
    docs: Sequence[Document], tokenizer: ByteTokenizer, keep_binary=False, join_directories=False
) -> str:
    """A digest that changes whenever a file, the tokenizer or an option changes."""
    options = f"keep_binary={keep_binary}" + ("\0join" if join_directories else "")
    h = hashlib.sha256(f"{tokenizer.cache_key}\0{options}".encode())
    for d in docs:
        h.update(f"{d.path}\0{d.relpath}\0{d.size}\0{d.mtime_ns}\n".encode("utf-8", "replace"))
    return h.hexdigest()[:20]


def looks_binary(data: bytes) -> bool:
    """A NUL byte in the first 8 KiB: how git and grep tell binary files from text."""
    return b"\0" in data[:8192]


def _directory_of(doc: Document) -> str | None:
    """The top-level directory of a document's relative path (None: at the root)."""
    head, sep, _ = doc.relpath.partition(os.sep)
    return head if sep else None


def tokenize_documents(
    docs: Sequence[Document],
    tokenizer: ByteTokenizer,
    *,
    keep_binary: bool = False,
    join_directories: bool = False,
) -> TokenizedCorpus:
    """Read and tokenize every document; empty (and, unless kept, binary) files are
    skipped and counted.

    `join_directories`: the files under each top-level directory are one document, joined
    by newlines in path order (ProLong's repository-level code documents: long ones),
    while files at the root stay documents of their own (short ones).
    """
    texts, empty, binary = [], 0, 0
    joined = {}  # directory -> index in texts
    for doc in docs:
        try:
            with open(doc.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UserError(f"data.paths: cannot read {doc.path!r}: {e.strerror}") from None
        if not data:
            empty += 1
            continue
        if not keep_binary and looks_binary(data):
            binary += 1
            continue
        directory = _directory_of(doc) if join_directories else None
        if directory is None:
            texts.append(data)
        elif directory in joined:
            texts[joined[directory]] += b"\n" + data
        else:
            joined[directory] = len(texts)
            texts.append(bytearray(data))
    pieces = [tokenizer.encode(bytes(text)) for text in texts]
    lengths = [0] + [len(ids) for ids in pieces]
    if not pieces:
        raise UserError(
            f"the corpus has no documents to train on ({len(docs)} files: {empty} empty, "
            f"{binary} binary; data.keep_binary=True trains on binary files)"
        )
    tokens = np.concatenate(pieces).astype(token_dtype(tokenizer.vocab_size))
    return TokenizedCorpus(tokens, np.cumsum(lengths, dtype=np.int64), empty, binary)


def split_tail(corpus: TokenizedCorpus, fraction: float, min_tokens: int = 2):
    """(head, tail): the last `fraction` of the tokens held out, cutting one document."""
    n = corpus.num_tokens
    held_out = max(min_tokens, int(round(fraction * n)))
    if n - held_out < min_tokens:
        raise UserError(f"data.paths: {n} tokens are too few to hold out {held_out} for evaluation")
    cut = n - held_out
    inner = corpus.offsets[(corpus.offsets > 0) & (corpus.offsets < n)]
    head = np.concatenate([[0], inner[inner < cut], [cut]]).astype(np.int64)
    tail = np.concatenate([[0], inner[inner > cut] - cut, [held_out]]).astype(np.int64)
    weights = corpus.weights
    return (
        dataclasses.replace(
            corpus,
            tokens=corpus.tokens[:cut],
            offsets=head,
            weights=None if weights is None else weights[:cut],
        ),
        TokenizedCorpus(
            corpus.tokens[cut:], tail, 0, 0, None if weights is None else weights[cut:]
        ),
    )


def _zarr_spec(path, dtype, shape):
    """A tensorstore spec for a 1-D zarr array on the local file system."""
    return {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {"dtype": dtype, "shape": list(shape), "chunks": [min(_CHUNK, max(1, *shape))]},
    }


def _write(directory, corpus):
    """Write `corpus` as zarr arrays plus a manifest into `directory`."""
    arrays = [
        ("tokens", corpus.tokens.dtype.newbyteorder("<").str, corpus.tokens),
        ("offsets", "<i8", corpus.offsets),
    ]
    if corpus.weights is not None:
        arrays.append(("weights", "|u1", corpus.weights))
    for name, dtype, array in arrays:
        spec = _zarr_spec(os.path.join(directory, name), dtype, array.shape)
        store = ts.open(spec, create=True).result()
        store.write(array).result()
    manifest = {
        "num_empty_skipped": corpus.num_empty_skipped,
        "num_binary_skipped": corpus.num_binary_skipped,
        "weighted": corpus.weights is not None,
        "skipped": dict(corpus.skipped),
        "version": 2,
    }
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def _read(directory) -> TokenizedCorpus:
    """Read back a corpus written by `_write`."""
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    arrays = {}
    for name in ("tokens", "offsets") + (("weights",) if manifest.get("weighted") else ()):
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": os.path.join(directory, name)},
        }
        arrays[name] = ts.open(spec, open=True).result().read().result()
    return TokenizedCorpus(
        arrays["tokens"],
        arrays["offsets"],
        manifest["num_empty_skipped"],
        manifest.get("num_binary_skipped", 0),
        arrays.get("weights"),
        manifest.get("skipped", {}),
    )


def load_or_tokenize(
    docs: Sequence[Document],
    tokenizer: ByteTokenizer,
    cache_dir: str | None,
    *,
    keep_binary: bool = False,
    join_directories: bool = False,
) -> TokenizedCorpus:
    """Tokenized `docs`, from the zarr cache in `cache_dir` when present (None: no cache)."""
    options = dict(keep_binary=keep_binary, join_directories=join_directories)
    return cached_corpus(
        cache_dir,
        fingerprint(docs, tokenizer, **options),
        lambda: tokenize_documents(docs, tokenizer, **options),
    )


def cached_corpus(cache_dir: str | None, key: str, build) -> TokenizedCorpus:
    """The corpus cached as `cache_dir/corpus-<key>`, else `build()`'s, written there
    (under a temporary name, renamed into place); `cache_dir` None: no cache."""
    if cache_dir is None:
        return build()
    final = os.path.join(cache_dir, f"corpus-{key}")
    if os.path.exists(os.path.join(final, "manifest.json")):
        return _read(final)
    corpus = build()
    tmp = None
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".corpus-", dir=cache_dir)
        _write(tmp, corpus)
        os.replace(tmp, final)
    except OSError:
        # Another process finished the same cache first, the disk failed or the workdir
        # is read-only: keep the in-memory result and leave no partial directory behind.
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return corpus
