"""LoRA (lcx.lora): adapters start as the base model, only they train, sit in
the optimizer state and the checkpoints, and fold into a plain Hugging Face export."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx

from lcx import lora
from lcx.checkpoints import load_hf, save_hf
from lcx.config_loading import load_config
from lcx.errors import UserError
from lcx.model import Transformer, TransformerConfig
from lcx.runtime import sharding as sh
from lcx.settings import resolve
from lcx.train import step as steplib
from lcx.train.optimizer import OptimizerConfig, ScheduleConfig, make_optimizer, make_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = TransformerConfig(
    vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32
)
ALL = tuple(lora.TARGETS)
LORA = dataclasses.replace(BASE, lora={"rank": 4, "alpha": 8.0, "targets": ALL})
B, T = 4, 16


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model))


def _assert_same(a, b, **tolerance):
    """Two trees of the same structure agree leaf by leaf: exactly, or to `tolerance`."""
    check = np.testing.assert_allclose if tolerance else np.testing.assert_array_equal
    jax.tree.map(lambda x, y: check(np.asarray(x), np.asarray(y), **tolerance), a, b)


def _batch(rng):
    """Two documents per row, positions restarting at each."""
    segment_ids = np.repeat(np.array([[1] * 10 + [2] * 6]), B, axis=0).astype(np.int32)
    positions = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(B, 0).astype(np.int32)
    tokens = rng.integers(0, BASE.vocab_size, (B, T)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def _mean_loss(model, batch):
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    total, count = steplib.lm_loss(model(arrays["tokens"], arrays["segment_ids"]), arrays)
    return float(total / count)


def _nonzero_adapters(model, seed=1):
    """`model` with its zero B matrices replaced by random ones (a trained adapter)."""
    adapters, base = lora.split(_pure(model))
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
    adapters = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), adapters)
    graphdef, _ = nnx.split(model)
    return nnx.merge(graphdef, lora.join(adapters, base))


def test_lora_starts_as_the_base_model_and_off_changes_nothing(rng):
    plain, adapted = Transformer(BASE, rngs=nnx.Rngs(0)), Transformer(LORA, rngs=nnx.Rngs(0))
    adapters, base = lora.split(_pure(adapted))
    # The base is the plain model's tree, value for value: the same seed, the same init.
    _assert_same(base, _pure(plain))
    # The adapters are exactly the nnx.LoRAParam variables, 2 per target per layer.
    by_type = nnx.to_pure_dict(nnx.state(adapted, nnx.LoRAParam))
    assert jax.tree.structure(adapters) == jax.tree.structure(by_type)
    assert len(jax.tree.leaves(adapters)) == 2 * len(ALL) * BASE.num_layers
    assert adapters["blocks"][0]["attn"]["lora_o"]["lora_a"].shape == (2 * 8, 4)  # H*D x r
    assert lora.join(adapters, base).keys() == _pure(adapted).keys()
    tokens = jnp.asarray(rng.integers(0, 64, (2, T)))
    np.testing.assert_array_equal(adapted(tokens), plain(tokens))  # B = 0 at step 0
    # rank 0 is off: the config is the plain model's, so its parameter tree is too.
    off = dataclasses.replace(BASE, lora={"rank": 0, "alpha": 8.0, "targets": ("q",)})
    assert off == BASE and off.lora is None
    # Attention targets only adapt attention layers; SwiGLU targets every block.
    some = dataclasses.replace(BASE, lora={"rank": 2, "alpha": 2.0, "targets": ("v", "down")})
    some_adapters = lora.split(_pure(Transformer(some, rngs=nnx.Rngs(0))))[0]["blocks"][1]
    assert set(some_adapters["attn"]) == {"lora_v"} and set(some_adapters["mlp"]) == {"lora_down"}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rank", -1, r"^model.lora.rank=-1 must be an integer >= 0"),
        ("alpha", 0.0, r"^model.lora.alpha=0.0 must be > 0"),
        ("targets", ("q", "w_q"), r"^model.lora.targets=\('q', 'w_q'\): .*'gate', 'up', 'down'"),
        ("targets", (), r"^model.lora.targets=\(\): distinct names, at least one"),
    ],
)
def test_bad_lora_settings_are_one_line_errors(smoke_config, key, value, message):
    smoke_config.model.lora[key] = value
    with pytest.raises(UserError, match=message) as error:
        TransformerConfig(**resolve(smoke_config).model.fields())
    assert "\n" not in str(error.value)


def test_an_unknown_lora_key_is_named(smoke_config):
    values = smoke_config.to_dict()
    values["model"]["lora"]["dropout"] = 0.1
    with pytest.raises(UserError, match=r"^config.model.lora: unknown key\(s\) \['dropout'\]"):
        resolve(values)
    with pytest.raises(UserError, match=r"^model.lora: keys .*; expected exactly"):
        dataclasses.replace(BASE, lora={"rank": 2})


def _optimizer(steps=4):
    settings = resolve(load_config(os.path.join(ROOT, "configs", "lm_tiny.py"), "smoke"))
    schedule = make_schedule(
        ScheduleConfig.of(settings.schedule), total_steps=steps, batch_size=B, seq_len=T
    )
    return make_optimizer(OptimizerConfig.of(settings.optimizer), schedule)


def test_a_lora_step_trains_the_adapters_only(rng):
    tx, mesh = _optimizer(), sh.make_mesh(sh.MeshShape(), jax.devices()[:1])
    rules = sh.DEFAULT_RULES
    shardings = steplib.state_shardings(LORA, tx, mesh, rules)
    state = steplib.init_state(LORA, tx, 0, shardings, B)
    frozen = steplib.init_frozen(LORA, 0, steplib.frozen_shardings(LORA, mesh, rules))
    # The base is what a LoRA-off run of the seed starts from, bit for bit.
    plain_shardings = steplib.state_shardings(BASE, tx, mesh, rules)
    _assert_same(frozen, steplib.init_state(BASE, tx, 0, plain_shardings, B).params)
    plain = Transformer(BASE, rngs=nnx.Rngs(0))
    # Only adapters in the state: the parameters, and AdamW's two moments of each.
    adapters = lora.split(_pure(Transformer(LORA, rngs=nnx.Rngs(0))))[0]
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
    e, q, kv, f, r = 16, 2 * 8, 8, 32, 4
    per_layer = r * ((e + q) + 2 * (e + kv) + (q + e) + 2 * (e + f) + (f + e))
    assert sum(x.size for x in jax.tree.leaves(state.params)) == 2 * per_layer
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim >= 1 and x.size > 2]
    assert sum(x.nbytes for x in moments) == 2 * 4 * 2 * per_layer  # float32 mu and nu

    graphdef, _ = steplib.abstract_model(LORA)
    batch_sharding = sh.batch_sharding(mesh, rules)
    step = steplib.make_train_step(graphdef, tx, shardings, batch_sharding, T, frozen=frozen)
    before, batch = jax.device_get(frozen), _batch(rng)
    # Accumulated micro-batches take the same step as the fused one.
    accumulate = steplib.make_accumulate_step(graphdef, batch_sharding, 0, frozen=frozen)
    fresh = steplib.init_state(LORA, tx, 0, shardings, B)
    acc = jax.jit(steplib.empty_accumulator, static_argnums=1)(fresh.params, False)
    acc = accumulate(acc, fresh.params, sh.put_batch(batch, batch_sharding))
    accumulated, _ = steplib.make_apply_step(tx, shardings, T)(fresh, acc)
    state, metrics = step(state, sh.put_batch(batch, batch_sharding))
    _assert_same(accumulated.params, state.params, atol=1e-6, rtol=1e-6)
    # Step 1's loss is the base model's: B = 0, so the adapters change nothing yet.
    assert abs(float(metrics["loss"]) - _mean_loss(plain, batch)) < 1e-5
    for _ in range(2):
        state, metrics = step(state, sh.put_batch(_batch(rng), batch_sharding))
    assert step.compiles() == 1
    _assert_same(jax.device_get(frozen), before)  # not donated, not trained
    for module in jax.tree.leaves(state.params, is_leaf=lambda x: "lora_b" in x):
        assert np.abs(np.asarray(module["lora_b"])).max() > 0  # every adapter moved


def test_save_hf_writes_the_merged_model(tmp_path, rng):
    model = _nonzero_adapters(Transformer(LORA, rngs=nnx.Rngs(0)))
    save_hf(model, str(tmp_path / "hf"))
    assert "lora" not in json.dumps(json.load(open(tmp_path / "hf" / "config.json")))
    loaded = load_hf(str(tmp_path / "hf"))
    assert loaded.cfg.lora is None
    assert jax.tree.structure(_pure(loaded)) == jax.tree.structure(lora.split(_pure(model))[1])
    tokens = jnp.asarray(rng.integers(0, 64, (2, T)))
    expected, merged = model(tokens), loaded(tokens)
    assert np.abs(expected - Transformer(BASE, rngs=nnx.Rngs(0))(tokens)).max() > 0.1
    # W + s·AB rounds differently from x·W + s·(x·A)·B in float32: over 200 token draws
    # the logits (scale ~2) differed by at most 3.1e-5, so 1e-4, as the export test uses.
    np.testing.assert_allclose(merged, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match=r"^load_hf\(lora=...\)"):
        load_hf(str(tmp_path / "hf"), lora=LORA.lora)


def _lora_config(hf_dir):
    c = load_config(os.path.join(ROOT, "configs", "lm_tiny.py"), "smoke")
    c.model.dtype = "float32"
    c.model.lora.update(rank=4, alpha=8.0)
    c.init.hf_checkpoint = hf_dir
    c.train.update(steps=4, eval_every=0, checkpoint_every=2)
    return c


@pytest.mark.integration
def test_a_lora_run_resumes_exactly_checkpoints_adapters_and_exports_merged(tmp_path, rng):
    from lcx.modes import run
    from lcx.train.checkpoint import _shapes_by_path
    from lcx.train.loop import Experiment, train_and_evaluate
    from lcx.train.restore import restore_model

    hf_dir = str(tmp_path / "base")
    base_cfg = TransformerConfig(**resolve(_lora_config("")).model.fields())
    base_cfg = dataclasses.replace(base_cfg, lora=None)
    save_hf(Transformer(base_cfg, rngs=nnx.Rngs(7)), hf_dir)  # a "pretrained" base
    c = _lora_config(hf_dir)
    run(c, str(tmp_path / "straight"))
    train_and_evaluate(c, str(tmp_path / "resumed"), stop_after=2)
    run(c, str(tmp_path / "resumed"))  # resumes at step 2, reloading the base

    def adapters(workdir):
        exp = Experiment(c, workdir, read_only=True)
        try:
            state = exp.restore_or_init()
            return exp, jax.device_get(state)
        finally:
            exp.checkpointer.close()

    exp, straight = adapters(str(tmp_path / "straight"))
    _, resumed = adapters(str(tmp_path / "resumed"))
    assert int(straight.step) == int(resumed.step) == 4
    _assert_same(straight, resumed)
    # The checkpoint holds the adapters (and their optimizer state), not the base.
    handler = ocp.PyTreeCheckpointHandler()
    meta = handler.metadata(epath.Path(tmp_path / "straight" / "checkpoints" / "4" / "state"))
    handler.close()
    saved = _shapes_by_path(getattr(meta, "tree", meta))
    params = [k for k in saved if k[0] == "params"]
    assert params and all(any(p.startswith("lora_") for p in k) for k in params)
    assert not any(k[-1] in ("w_q", "embed", "unembed", "scale") for k in saved)
    # The base is the Hugging Face checkpoint's, unchanged.
    frozen = jax.device_get(exp.frozen_params())
    loaded = load_hf(hf_dir)
    _assert_same(frozen, _pure(loaded))
    # mode=export writes W + (alpha / rank) A B; it computes what base + adapters compute.
    c.mode, c.export.dir = "export", str(tmp_path / "export")
    assert run(c, str(tmp_path / "straight"))["step"] == 4
    exported = load_hf(str(tmp_path / "export"))
    lora_model = Transformer(exp.model_cfg, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(lora_model)
    lora_model = nnx.merge(graphdef, lora.join(straight.params, frozen))
    restored, _ = restore_model(c, str(tmp_path / "straight"))
    tokens = jnp.asarray(rng.integers(0, 256, (2, 32)))
    expected = lora_model(tokens)
    np.testing.assert_allclose(exported(tokens), expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(restored(tokens), expected, atol=1e-4, rtol=1e-4)
    assert np.abs(expected - loaded(tokens)).max() > 1e-4  # the adapters trained
