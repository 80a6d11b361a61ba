"""Shared fixtures: a tiny corpus on disk and the smoke config."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # so `configs` imports like it does for the command line


@pytest.fixture
def smoke_config():
    from configs import lm_tiny

    return lm_tiny.get_config("smoke")


@pytest.fixture
def text_corpus(tmp_path):
    """A directory of random-length documents: some longer than a 64-token row."""
    rng = np.random.default_rng(1234)
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        n = int(rng.integers(1, 300))
        data = bytes(rng.integers(32, 127, size=n, dtype=np.uint8))
        (root / f"doc{i:03d}.txt").write_bytes(data)
    return str(root)
