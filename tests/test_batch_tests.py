"""AdAdaGrad's tests against numpy, and the streaming statistics against per-sample ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcx.optim import (
    AdaptiveBatchConfig,
    augmented_inner_product_test,
    inner_product_test,
    norm_test,
    orthogonality_test,
    projections_from_samples,
    stats_all_reduce,
    stats_from_samples,
    stats_init,
    stats_merge,
    suggested_batch_sizes,
)


def _samples(rng, n=12):
    """Per-sample gradients with a common direction plus noise, as a pytree."""
    base = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    return {k: v[None] + 0.7 * rng.standard_normal((n,) + v.shape) for k, v in base.items()}


def _numpy_tests(samples, eta, theta, nu):
    """The four formulas on flattened per-sample gradients, straight from the paper."""
    flat = np.concatenate([samples[k].reshape(len(samples[k]), -1) for k in sorted(samples)], 1)
    g = flat.mean(0)
    gg = g @ g
    norm = flat.var(0, ddof=1).sum() / (eta**2 * gg)
    inner = (flat @ g).var(ddof=1) / (theta**2 * gg**2)
    residual = flat - np.outer(flat @ g / gg, g)
    ortho = residual.var(0, ddof=1).sum() / (nu**2 * gg)
    return {"norm": norm, "inner_product": inner, "orthogonality": ortho,
            "augmented_inner_product": max(inner, ortho)}  # fmt: skip


def test_tests_match_numpy(rng):
    samples = _samples(rng)
    expected = _numpy_tests(samples, 0.1, 0.2, 0.3)
    with jax.enable_x64(True):
        got = {
            "norm": norm_test(samples, 0.1),
            "inner_product": inner_product_test(samples, 0.2),
            "orthogonality": orthogonality_test(samples, 0.3),
            "augmented_inner_product": augmented_inner_product_test(samples, 0.2, 0.3),
        }
    for name, value in expected.items():
        assert float(got[name]) == pytest.approx(value, rel=1e-9), name


def _streamed(samples, chunk):
    """Two passes over chunks of samples, as the training loop does with micro-batches."""
    stats = stats_init(jax.tree.map(lambda x: x[0], samples))
    n = len(samples["b"])
    chunks = [jax.tree.map(lambda x, i=i: x[i : i + chunk], samples) for i in range(0, n, chunk)]
    for part in chunks:
        stats = stats_merge(stats, stats_from_samples(part))
    for part in chunks:
        stats = stats_merge(stats, projections_from_samples(part, stats.mean))
    return stats


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_streaming_statistics_equal_per_sample_ones(chunk, rng):
    samples = _samples(rng)
    expected = _numpy_tests(samples, 0.1, 0.1, 0.1)
    with jax.enable_x64(True):
        got = suggested_batch_sizes(_streamed(jax.tree.map(jnp.asarray, samples), chunk))
        for name, value in expected.items():
            assert float(got[name]) == pytest.approx(value, rel=1e-7), name
        # micro-batch gradients averaging m samples: b* is in samples
        scaled = suggested_batch_sizes(_streamed(samples, chunk), samples_per_gradient=8)
        assert float(scaled["norm"]) == pytest.approx(8 * expected["norm"], rel=1e-7)


def test_all_reduce_is_the_law_of_total_variance(rng):
    samples = _samples(rng, n=12)
    with jax.enable_x64(True):
        devices = jax.tree.map(lambda x: x.reshape((4, 3) + x.shape[1:]), samples)
        local = jax.vmap(stats_from_samples)(devices)
        merged = jax.vmap(lambda s: stats_all_reduce(s, "devices"), axis_name="devices")(local)
        merged = jax.tree.map(lambda x: x[0], merged)
        direct = stats_from_samples(samples)
        for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(direct), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10)


def test_fewer_than_two_samples_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        norm_test({"w": jnp.ones((1, 3))})


def test_controller_rule():
    cfg = AdaptiveBatchConfig(micro_batch_size=4, max_batch_size=32, groups_per_micro_batch=2)
    assert cfg.next_batch_size(8, 3.0) == 8  # never shrinks
    assert cfg.next_batch_size(8, 9.2) == 12  # ceil, then whole micro-batches
    assert cfg.next_batch_size(8, 1e9) == 32  # capped
    assert cfg.next_batch_size(8, float("nan")) == 8
    with pytest.raises(ValueError, match="batch.test"):
        AdaptiveBatchConfig(micro_batch_size=4, max_batch_size=32, test="t-test")
    with pytest.raises(ValueError, match="max_batch_size"):
        AdaptiveBatchConfig(micro_batch_size=4, max_batch_size=30)


def test_controller_grows_the_batch_near_the_noise_floor(rng):
    """Noisy least squares: the batch grows as the loss nears the noise floor; it converges."""
    dim, noise = 8, 0.5
    w_true = rng.standard_normal(dim)
    cfg = AdaptiveBatchConfig(
        micro_batch_size=4, max_batch_size=512, test="augmented_inner_product",
        theta=0.5, nu=2.0, test_interval=1, groups_per_micro_batch=4,
    )  # fmt: skip

    def per_sample_grads(w, n):
        x = rng.standard_normal((n, dim))
        y = x @ w_true + noise * rng.standard_normal(n)
        return {"w": jnp.asarray((x @ w - y)[:, None] * x, jnp.float32)}

    @jax.jit
    def mean_and_suggestion(grads):
        stats = stats_from_samples(grads)
        stats = stats_merge(stats, projections_from_samples(grads, stats.mean))
        return stats.mean["w"], suggested_batch_sizes(stats, theta=cfg.theta, nu=cfg.nu)[cfg.test]

    w, batch, sizes, lr = np.zeros(dim), cfg.micro_batch_size, [], 0.05
    for _ in range(300):
        mean, suggested = mean_and_suggestion(per_sample_grads(w, batch))
        w = w - lr * np.asarray(mean)
        batch = cfg.next_batch_size(batch, float(suggested))
        sizes.append(batch)
    excess = float(np.sum((w - w_true) ** 2))  # loss above the noise floor noise^2 / 2
    assert excess < 0.01 * float(np.sum(w_true**2))
    assert sizes == sorted(sizes) and sizes[-1] >= 8 * sizes[0]
    assert sizes[len(sizes) // 10] < sizes[-1]  # it grew late, not all at once at the start
