"""Corpora, tokenizers (bytes, Hugging Face tokenizer.json) and the tensorstore token cache."""

from lcx.data.corpus import Document, select_documents, split_of, stdlib_documents
from lcx.data.store import (
    TokenizedCorpus,
    load_or_tokenize,
    looks_binary,
    split_tail,
    tokenize_documents,
)
from lcx.data.tokenizer import ByteTokenizer, HFTokenizer, check_vocabulary, make_tokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "check_vocabulary",
    "make_tokenizer",
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
