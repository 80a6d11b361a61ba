"""benchmarks/ring_balance.py at tiny size: every layout counted, the classic imbalance seen."""

from benchmarks import ring_balance as bench
from lcx.attention.ring import LAYOUTS


def test_ring_balance_counts_every_layout(capsys):
    results = bench.main(["--smoke"])
    assert set(results) == {(k, lay) for k in ("corpus", "short", "long") for lay in LAYOUTS}
    for r in results.values():
        assert 0 < r["balance"] <= 1.0 and r["critical"] >= r["total"] / 4 - 1e-9
        assert r["skipped"] >= 0
    long = {lay: results["long", lay]["critical"] for lay in LAYOUTS}
    # One causal document: contiguous shards wait on the last one; zigzag evens them out.
    assert long["zigzag"] < long["contiguous"] and results["long", "zigzag"]["balance"] == 1.0
    for kind in ("corpus", "short", "long"):
        assert results[kind, "balanced"]["critical"] <= results[kind, "contiguous"]["critical"]
    printed = capsys.readouterr().out
    assert "python benchmarks/ring_balance.py --smoke" in printed
    assert printed.count("\n| long |") == len(LAYOUTS)
