"""Training from a Hugging Face checkpoint: export a trained tiny run, continue it long.

configs/continue_long.py:smoke starts from the exported checkpoint; its first step's
loss is the imported model's loss on that batch (computed here independently), far
from a randomly initialised model's.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcx.checkpoints import load_hf
from lcx.config_loading import load_config
from lcx.model import Transformer
from lcx.modes import run
from lcx.train import step as steplib
from lcx.train.loop import Experiment
from tests.hf_fixtures import hf_logits, max_relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loss(model, batch):
    """Mean next-token loss of `model` on a host batch."""
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    logits = model(arrays["tokens"], arrays["segment_ids"], arrays["positions"])
    total, count = steplib.lm_loss(logits, arrays)
    return float(total / count)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny byte-level model trained 30 steps, exported by --config.mode=export."""
    base = tmp_path_factory.mktemp("source")
    c = load_config(os.path.join(ROOT, "configs", "lm_tiny.py"), "smoke")
    c.train.update(steps=30, eval_every=0, checkpoint_every=30)
    c.model.dtype = "float32"
    run(c, str(base / "run"))
    c.mode, c.export.dir = "export", str(base / "hf")
    record = run(c, str(base / "run"))
    assert record == {"step": 30, "dir": str(base / "hf")}
    return c, str(base / "run"), str(base / "hf")


@pytest.mark.torch
def test_export_mode_writes_a_directory_transformers_loads(exported, rng):
    import transformers

    from lcx.train.restore import restore_model

    config, workdir, hf_dir = exported
    hf = json.load(open(os.path.join(hf_dir, "config.json")))
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["eos_token_id"] == 257
    model, _ = restore_model(config, workdir)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = rng.integers(0, 256, (1, 40))
    error = max_relative_error(model(jnp.asarray(tokens)), hf_logits(torch_model, tokens))
    assert error <= 1e-5, error
    with pytest.raises(ValueError, match=r"export.dir=.* is not empty"):
        run(config, workdir)


def test_continue_long_smoke_starts_at_the_imported_models_loss(exported, tmp_path):
    _, _, hf_dir = exported
    c = load_config(os.path.join(ROOT, "configs", "continue_long.py"), "smoke")
    c.init.hf_checkpoint = hf_dir
    record = run(c, str(tmp_path / "run"))
    assert record["step"] == c.train.steps
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    assert first["step"] == 1
    # The first batch, drawn as training drew it, through the imported model.
    exp = Experiment(c, str(tmp_path / "fresh"))
    try:
        batch = next(iter(exp.dataset("train")))
    finally:
        exp.checkpointer.close()
    imported = load_hf(hf_dir, rope_theta=c.init.rope_theta)
    assert imported.cfg.rope_theta == 40_000.0 and exp.model_cfg == imported.cfg
    expected = _loss(imported, batch)
    fresh = _loss(Transformer(exp.model_cfg, rngs=nnx.Rngs(c.seed)), batch)
    assert abs(first["loss"] - expected) < 1e-4 * expected, (first["loss"], expected)
    assert fresh - expected > 1.0, (fresh, expected)  # a random model's loss is far above
    assert np.isfinite(record["loss"])
