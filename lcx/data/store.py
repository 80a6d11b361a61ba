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
from collections.abc import Sequence

import numpy as np
import tensorstore as ts

from lcx.data.corpus import Document
from lcx.data.tokenizer import ByteTokenizer, token_dtype
from lcx.errors import UserError

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """Documents as one flat token array (uint16 or uint32) plus offsets (document i is
    [o[i], o[i+1]))."""

    tokens: np.ndarray
    offsets: np.ndarray
    num_empty_skipped: int = 0
    num_binary_skipped: int = 0

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
    return (
        TokenizedCorpus(
            corpus.tokens[:cut], head, corpus.num_empty_skipped, corpus.num_binary_skipped
        ),
        TokenizedCorpus(corpus.tokens[cut:], tail, 0, 0),
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
    for name, dtype, array in (
        ("tokens", corpus.tokens.dtype.newbyteorder("<").str, corpus.tokens),
        ("offsets", "<i8", corpus.offsets),
    ):
        spec = _zarr_spec(os.path.join(directory, name), dtype, array.shape)
        store = ts.open(spec, create=True).result()
        store.write(array).result()
    manifest = {
        "num_empty_skipped": corpus.num_empty_skipped,
        "num_binary_skipped": corpus.num_binary_skipped,
        "version": 2,
    }
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def _read(directory) -> TokenizedCorpus:
    """Read back a corpus written by `_write`."""
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    arrays = {}
    for name in ("tokens", "offsets"):
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
    if cache_dir is None:
        return tokenize_documents(docs, tokenizer, **options)
    final = os.path.join(cache_dir, f"corpus-{fingerprint(docs, tokenizer, **options)}")
    if os.path.exists(os.path.join(final, "manifest.json")):
        return _read(final)
    corpus = tokenize_documents(docs, tokenizer, **options)
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
