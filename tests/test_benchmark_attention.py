"""benchmarks/attention.py at tiny size, so it never rots."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import attention  # noqa: E402


def test_blocks_table_smoke():
    records = attention.main(["blocks", "--smoke", "--rows=2"])
    for r in records:
        assert r["ours"] <= r["dense"] and r["ideal"] <= r["ours"] + 1e-9
        assert r["ours"] <= r["compacted"] <= r["grid"]


def test_cpu_table_smoke(capsys):
    records = attention.main(["cpu", "--smoke"])
    assert [r["row_len"] for r in records] == [512, 1024]
    for r in records:
        for name in ("xla_chunked", "xla"):
            assert r[name]["temp_bytes"] > 0 and r[name]["ms"]["median"] > 0
    assert "| reference / chunked |" in capsys.readouterr().out


def test_blocks_counts_on_a_known_layout():
    seg = np.repeat(np.arange(1, 17, dtype=np.int32), 128)[None]
    counts = attention.block_counts(seg, 128)
    assert counts == {"dense": 136, "ours": 16, "ideal": 8.0, "grid": 256, "compacted": 16}
