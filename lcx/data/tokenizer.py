"""Byte-level tokenizer: 256 byte values plus BOS, EOS and PAD.

Bytes are bytes: any file, UTF-8 or not, binary or text, tokenizes without loss.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """Token id = byte value; BOS, EOS, PAD follow; vocabulary padded to a multiple of 128."""

    name: str = "bytes-v1"
    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258

    @property
    def vocab_size(self) -> int:
        return 384  # 259 ids rounded up to a multiple of 128

    def encode(self, data: bytes) -> np.ndarray:
        """BOS + bytes + EOS as uint16 ids."""
        body = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
        return np.concatenate([[self.bos_id], body, [self.eos_id]]).astype(np.uint16)

    def decode(self, ids) -> bytes:
        """Bytes of the ids below 256; special ids are dropped."""
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes()
