"""lcx.optim: LAMB against the paper in numpy, the power schedule, optimizer properties."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lcx.optim import (
    adagrad,
    adagrad_norm,
    current_learning_rate,
    lamb,
    power_schedule,
    token_scheduled,
    wsd_schedule,
)


def _params(rng):
    return {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3), "s": np.ones(5)}


def _numpy_lamb(params, grads_seq, lr, b1, b2, eps, wd):
    """The paper's update, leaf by leaf; 1-D leaves take the plain Adam step."""
    params = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t, grads in enumerate(grads_seq, start=1):
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
            r = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            if params[k].ndim >= 2:
                u = r + wd * params[k]
                x_norm, u_norm = np.linalg.norm(params[k]), np.linalg.norm(u)
                ratio = x_norm / u_norm if x_norm > 0 and u_norm > 0 else 1.0
                params[k] = params[k] - lr * ratio * u
            else:
                params[k] = params[k] - lr * r
    return params


def _run(tx, params, grads_seq):
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_lamb_matches_the_paper_in_numpy(rng):
    params = _params(rng)
    grads_seq = [_params(rng) for _ in range(5)]
    expected = _numpy_lamb(params, grads_seq, 0.01, 0.9, 0.999, 1e-6, 0.01)
    with jax.enable_x64(True):
        got = _run(lamb(0.01, weight_decay=0.01), params, grads_seq)
        for k in params:
            np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=1e-6, atol=1e-9)


def test_lamb_with_full_mask_is_optax_lamb(rng):
    params = jax.tree.map(jnp.asarray, _params(rng))
    grads_seq = [jax.tree.map(jnp.asarray, _params(rng)) for _ in range(4)]
    everything = lambda p: jax.tree.map(lambda _: True, p)  # noqa: E731
    ours = _run(lamb(0.02, weight_decay=0.1, mask=everything), params, grads_seq)
    theirs = _run(optax.lamb(0.02, weight_decay=0.1), params, grads_seq)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)


def test_lamb_bad_input():
    with pytest.raises(ValueError, match="learning_rate"):
        lamb(-1.0)
    with pytest.raises(ValueError, match="eps"):
        lamb(0.1, eps=-1e-6)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match="mask"):
        lamb(0.1, mask={"w": True}).init(params)


def test_power_schedule_formula_and_continuity():
    sched = power_schedule(
        batch_size=8, max_lr=0.02, a=4.0, b=-0.51, warmup_tokens=1e4, decay_tokens=2e5,
        total_tokens=1e6, decay="exponential", final_lr_fraction=0.0,
    )  # fmt: skip
    for n in (2e4, 1e5, 5e5, 7.99e5):
        assert float(sched(n)) == pytest.approx(min(0.02, 8 * 4.0 * n**-0.51), rel=1e-5)
    eps = 1e-3
    for boundary in (1e4, 8e5):
        assert float(sched(boundary - eps)) == pytest.approx(float(sched(boundary + eps)), rel=1e-4)
    assert float(sched(0)) == 0.0
    assert float(sched(1e6)) == pytest.approx(0.0, abs=1e-9)
    assert float(sched(5e3)) == pytest.approx(0.5 * float(sched(1e4)), rel=1e-5)


def test_token_scheduled_rate_depends_only_on_tokens_seen(rng):
    """Two runs with different batch-size histories use the same rate at the same tokens."""
    sched = power_schedule(batch_size=16, max_lr=0.05, warmup_tokens=2048)
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    seq_len = 128

    def rates(batch_sizes):
        tx = token_scheduled(lamb, sched, weight_decay=0.01)
        state, rows, out = tx.init(params), 0, {}
        for b in batch_sizes:
            rows += b
            _, state = tx.update(params, state, params, tokens_seen=rows * seq_len, batch_size=b)
            out[rows * seq_len] = (b, float(current_learning_rate(state)))
        return out

    def history(choices, segments=5, rows_per_segment=64, last=16):
        """Random batch sizes; each segment sums to rows_per_segment and ends with `last`,
        so two histories meet at every segment end with the same batch size."""
        sizes = []
        for _ in range(segments):
            left = rows_per_segment - last
            while left:
                fits = [c for c in choices if c <= left]
                sizes.append(int(rng.choice(fits)))
                left -= sizes[-1]
            sizes.append(last)
        return sizes

    a = rates(history([4, 8, 16]))
    b = rates(history([2, 4, 8, 16, 32]))
    common = [t for t in a if t in b and a[t][0] == b[t][0]]
    assert len(common) >= 5, "the two histories meet at every segment end"
    for t in common:
        assert a[t][1] == pytest.approx(b[t][1], rel=1e-6)
        assert a[t][1] == pytest.approx(float(sched(t, a[t][0])), rel=1e-6)
    # The batch size enters the formula: a bigger batch means a larger rate (below the cap).
    assert float(sched(1e8, 32)) > float(sched(1e8, 16))


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="b="):
        power_schedule(batch_size=8, b=0.1)
    with pytest.raises(ValueError, match="max_lr"):
        power_schedule(batch_size=8, max_lr=0.0)
    with pytest.raises(ValueError, match="decay"):
        power_schedule(batch_size=8, decay="cubic")
    with pytest.raises(ValueError, match="total_tokens"):
        wsd_schedule(peak_lr=0.1, warmup_tokens=10, decay_tokens=100, total_tokens=50)


OPTIMIZERS = {
    "lamb": lambda: lamb(0.05, weight_decay=0.0),
    "adagrad": lambda: adagrad(0.5),
    "adagrad_norm": lambda: adagrad_norm(0.5),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_converges_keeps_dtypes_and_checkpoints(name, tmp_path, rng):
    tx = OPTIMIZERS[name]()
    target = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": jnp.ones(4)}
    params = jax.tree.map(jnp.zeros_like, target)
    params["b"] = params["b"].astype(jnp.bfloat16)
    target["b"] = target["b"].astype(jnp.bfloat16)

    def loss(p):
        return sum(jnp.sum((p[k].astype(jnp.float32) - target[k]) ** 2) for k in p)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    start = float(loss(params))
    for _ in range(150):
        params, state = step(params, state)
    assert float(loss(params)) < 0.05 * start
    assert params["w"].dtype == jnp.float32 and params["b"].dtype == jnp.bfloat16

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "opt", {"params": params, "state": state})
        ckpt.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "state": state})
        restored = ckpt.restore(tmp_path / "opt", abstract)
    straight = step(params, state)
    resumed = step(restored["params"], restored["state"])
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
