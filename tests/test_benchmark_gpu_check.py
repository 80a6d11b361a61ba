"""benchmarks/gpu_check.py at tiny size on the CPU (interpret mode): the device run never rots."""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import gpu_check  # noqa: E402


def test_gpu_check_runs_every_part_and_writes_its_json(tmp_path, capsys):
    results = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    # Correctness: both implementations, every layout, against float64, far under TF32's error.
    checked = results["correctness"]
    assert {r["implementation"] for r in checked} == set(gpu_check.CHECKED)
    assert len(checked) == 2 * 3 and all(r["ok"] and r["worst"] < 1e-5 for r in checked), checked
    assert all(set(r["errors"]) == {"out", "lse", "dq", "dk", "dv"} for r in checked)
    # The serving engine's paged read: the kernel against XLA in float64, its work lists
    # from the host and built in the step.
    paged = results["paged"]
    assert [r["case"] for r in paged] == [
        "paged read, verify rows of 5, lists from the host",
        "paged read, verify rows of 5, lists from the step",
    ]
    assert all(r["ok"] and r["worst"] < 1e-5 for r in paged), paged
    assert results["ceilings"]["matmul_flops_per_s"] > 0 < results["ceilings"]["copy_bytes_per_s"]
    # Timing: every implementation on every case, both passes, with the floors.
    assert [(r["row_len"], r["layout"]) for r in results["timing"]] == [
        (128, "mean 32"),
        (128, "one document"),
    ]
    for record in results["timing"]:
        assert set(record["times"]) == {
            "pallas_gpu", "xla_chunked", "jax_pallas_mha", "dense_causal_xla"
        }  # fmt: skip
        for passes in record["times"].values():
            for name in ("forward", "forward+backward"):
                assert passes[name]["median"] > 0, passes
        floors = record["floors"]
        assert floors["forward+backward"]["flops"] == 3.5 * floors["forward"]["flops"] > 0
    one = results["timing"][1]
    assert one["visible"] == 128 * 129 / 2 and one["documents"] == 1
    # The dense target is evaluated on the one-document row, for both passes.
    assert [t["pass_"] for t in results["targets"]] == ["forward", "forward+backward"]
    with open(tmp_path / "gpu_check.json") as f:
        assert json.load(f)["correctness"] == json.loads(json.dumps(checked))
    assert "| target | T | pass | ratio | met |" in capsys.readouterr().out


def test_visible_entries_count_causal_pairs_inside_documents():
    seg = [[1, 1, 1, 2, 2, 0]]
    assert gpu_check.visible_entries(np.asarray(seg)) == 6 + 3
