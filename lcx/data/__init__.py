"""Corpora, the byte tokenizer and the tensorstore token cache."""

from lcx.data.corpus import Document, select_documents, split_of, stdlib_documents
from lcx.data.store import (
    TokenizedCorpus,
    load_or_tokenize,
    looks_binary,
    split_tail,
    tokenize_documents,
)
from lcx.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "Document",
    "TokenizedCorpus",
    "load_or_tokenize",
    "looks_binary",
    "select_documents",
    "split_tail",
    "split_of",
    "stdlib_documents",
    "tokenize_documents",
]
