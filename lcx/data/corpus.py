"""Corpus discovery: the embedded default (Python's standard library) or user paths.

The default corpus is every `*.py` file under `sysconfig.get_paths()["stdlib"]`, minus
site-packages: about 1,800 real documents of very different lengths, present on every
machine that has Python. Documents are split into train and eval by a hash of their
path relative to the corpus root, so the split never depends on file order or machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from collections.abc import Sequence

from lcx.errors import UserError

SPLITS = ("train", "eval")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Document:
    """One file of the corpus: where it is and the name its split is hashed from."""

    path: str
    relpath: str
    size: int
    mtime_ns: int


def _document(root, path):
    """A Document for `path`, named relative to `root`."""
    stat = os.stat(path)
    relpath = os.path.relpath(path, root) if root else os.path.basename(path)
    return Document(path=path, relpath=relpath, size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def _walk(root, suffix):
    """Regular files under `root` (sorted, hidden and excluded dirs skipped)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith(".")
        )
        for name in sorted(filenames):
            if name.startswith(".") or (suffix and not name.endswith(suffix)):
                continue
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                yield _document(root, path)


def stdlib_documents() -> list[Document]:
    """Every `*.py` file of this Python's standard library, minus site-packages."""
    return list(_walk(sysconfig.get_paths()["stdlib"], ".py"))


def user_documents(paths: Sequence[str]) -> list[Document]:
    """Files named in `paths`; directories are walked for every regular file."""
    docs = []
    for path in paths:
        path = os.path.expanduser(str(path))
        if os.path.isdir(path):
            docs.extend(_walk(path, suffix=""))
        elif os.path.isfile(path):
            docs.append(_document(os.path.dirname(path), path))
        elif os.path.exists(path):
            raise UserError(f"data.paths: {path!r} is neither a regular file nor a directory")
        else:
            raise UserError(f"data.paths: {path!r} does not exist")
    return docs


def split_of(relpath: str, eval_fraction: float) -> str:
    """'eval' for a stable `eval_fraction` of paths (by SHA-256 of the path), else 'train'."""
    digest = hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


def select_documents(
    paths: Sequence[str], split: str, *, eval_fraction: float, max_documents: int = 0
) -> list[Document]:
    """The documents of one split, sorted by relative path, optionally truncated."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid: {SPLITS}")
    if not 0.0 < eval_fraction < 1.0:
        raise UserError(f"data.eval_fraction={eval_fraction} must be in (0, 1)")
    docs = user_documents(paths) if paths else stdlib_documents()
    docs = sorted(
        (d for d in docs if split_of(d.relpath, eval_fraction) == split), key=lambda d: d.relpath
    )
    return docs[:max_documents] if max_documents > 0 else docs


def corpus_paths(paths) -> tuple[str, ...]:
    """`config.data.paths` as a tuple; a string is a comma-separated list."""
    if isinstance(paths, str):
        return tuple(p for p in paths.split(",") if p)
    return tuple(paths or ())
