"""lcx.plots: what the pictures show is computed right, and every helper draws and saves."""

import matplotlib
import numpy as np
import pytest

from lcx import plots


def _random_row(rng, length=256):
    """Segment ids of a packed row: random document lengths, then padding."""
    lengths = rng.integers(1, 60, 12)
    ids = np.repeat(np.arange(1, len(lengths) + 1), lengths)[:length]
    return np.pad(ids, (0, length - len(ids)))


@pytest.mark.parametrize("causal", [True, False])
def test_visited_blocks_are_the_blocks_holding_a_visible_pair(rng, causal):
    row = _random_row(rng)
    visible = (row[:, None] == row[None, :]) & (row[:, None] != 0)
    if causal:
        visible &= np.tri(len(row), dtype=bool)
    expected = visible.reshape(8, 32, 16, 16).any(axis=(1, 3))
    got = plots.visited_blocks(row, block_q=32, block_kv=16, causal=causal)
    np.testing.assert_array_equal(got, expected)


def test_every_helper_draws_and_saves(rng, tmp_path):
    backend = matplotlib.get_backend()
    rows = np.stack([_random_row(rng) for _ in range(3)])
    records = [{"step": s, "loss": 5.0 / s} for s in range(1, 11)] + [{"step": 10, "eval_loss": 1}]
    buckets = [{"start": 0, "end": 64, "loss": 3.0}, {"start": 64, "end": 256, "loss": 2.5}]
    axes = [
        plots.packed_rows(rows),
        plots.attention_mask(rows[0]),
        plots.block_schedule(rows[0], block_q=32, block_kv=32),
        plots.length_histogram(rng.integers(1, 5000, 100), edges=[64, 256, 1024]),
        plots.bars({"padded": 0.4, "first_fit": 0.02}, ylabel="padding"),
        plots.curves(np.arange(5), {"a": np.arange(5), "b": np.ones(5)}, xlabel="x", ylabel="y"),
        plots.loss_curve(records),
        plots.loss_by_position({"model": buckets}),
        plots.engine_timeline([rows[0][:40], rows[1][:70], np.zeros(4, int)]),
    ]
    for i, ax in enumerate(axes):
        path = plots.save(ax, str(tmp_path / "sub" / f"{i}.png"))
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "packed" not in axes[1].get_title() and "visible" in axes[1].get_title()
    assert matplotlib.get_backend() == backend  # no helper switches a notebook's backend
