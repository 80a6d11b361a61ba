"""benchmarks/hf_load_memory.py at smoke size: it runs, and the loads hold the model."""

import numpy as np


def test_hf_load_memory_benchmark_runs(capsys):
    from benchmarks import hf_load_memory
    from lcx.checkpoints.hf_layout import tensor_layouts
    from lcx.model import TransformerConfig

    rows = hf_load_memory.main(["--smoke"])
    assert [(r["devices"], r["method"]) for r in rows] == [
        (1, "load_hf"), (1, "whole_files"), (8, "load_hf"), (8, "whole_files"),
    ]  # fmt: skip
    layouts = tensor_layouts(TransformerConfig(**hf_load_memory.SMOKE)).values()
    model_bytes = sum(4 * int(np.prod(t.hf_shape)) for t in layouts)
    assert rows[0]["device_bytes"] == rows[1]["device_bytes"] == model_bytes
    # On 8 devices a parameter's replicated pieces (norms, a non-dividing axis) repeat.
    assert rows[2]["device_bytes"] == rows[3]["device_bytes"] >= model_bytes
    assert all(r["peak_rise"] > 0 for r in rows)
    assert "(peak - model) / largest" in capsys.readouterr().out
