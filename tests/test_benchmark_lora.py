"""benchmarks/lora_memory.py at smoke size: the counts it reports are the formula's."""


def test_lora_memory_benchmark_counts_adapters_and_adam_state(capsys):
    from benchmarks import lora_memory
    from lcx.config_loading import load_config
    from lcx.model import TransformerConfig

    rows = lora_memory.main(["--smoke"])
    assert [r["variant"] for r in rows] == ["full", "LoRA r=8", "LoRA r=64"]
    cfg = TransformerConfig(**load_config(lora_memory.CONFIG, "smoke").model)
    e, f, q, kv = (
        cfg.d_model,
        cfg.mlp_dim,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    )
    per_rank = cfg.num_layers * ((e + q) + 2 * (e + kv) + (q + e) + 2 * (e + f) + (f + e))
    full, *adapted = rows
    assert full["trained_parameters"] == full["base_parameters"]
    for row, rank in zip(adapted, lora_memory.RANKS, strict=True):
        assert row["trained_parameters"] == rank * per_rank
        assert row["base_parameters"] == full["base_parameters"]
    for row in rows:  # AdamW: two float32 moments per trained parameter, and a step count
        moments = 2 * 4 * row["trained_parameters"]
        assert moments <= row["optimizer_bytes"] <= moments + 64
        assert row["checkpoint_bytes"] == row["optimizer_bytes"] + 4 * row["trained_parameters"]
    assert "| LoRA r=8 |" in capsys.readouterr().out
