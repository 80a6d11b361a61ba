"""AdAdaGrad's batch-size tests (Lau et al., 2024, arXiv 2402.11215; timlautk/AdAdaGrad).

Given gradients g_i of samples (or of micro-batches) with mean g, and variances with
Bessel's correction, each test returns the batch size b* at which the noise of the mean
gradient is controlled:
  norm:           b* = sum_coords Var_i(g_i) / (eta^2 ||g||^2)
  inner product:  b* = Var_i <g_i, g> / (theta^2 ||g||^4)
  orthogonality:  b* = sum_coords Var_i(g_i - <g_i, g>/||g||^2 g) / (nu^2 ||g||^2)
  augmented inner product = max(inner product, orthogonality).

Two routes to the same numbers: from a pytree of per-sample gradients (leading sample
axis), and streaming from sufficient statistics (`GradientStats`) that a training loop
accumulates one gradient at a time and merges across micro-steps or devices with the
law of total variance, so per-sample gradients of a large model never exist at once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _at_least_f32(x):
    """x in float32, or wider if it already is."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _tree_sum(tree) -> jax.Array:
    """Sum of every element of every leaf."""
    return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))


def _per_sample_dot(per_sample, vector) -> jax.Array:
    """[n] inner products <g_i, vector> over all leaves."""
    return sum(
        jnp.einsum("n...,...->n", leaf, v)
        for leaf, v in zip(jax.tree.leaves(per_sample), jax.tree.leaves(vector), strict=True)
    )


def _check_samples(per_sample_grads):
    """Number of samples; ValueError when fewer than two (no variance)."""
    n = jax.tree.leaves(per_sample_grads)[0].shape[0]
    if n < 2:
        raise ValueError(f"per_sample_grads has {n} sample(s); the tests need at least 2")
    return n


def _mean(per_sample_grads):
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), per_sample_grads)


def norm_test(per_sample_grads, eta: float = 0.1) -> jax.Array:
    """Suggested batch size from the norm test."""
    _check_samples(per_sample_grads)
    g = _mean(per_sample_grads)
    variance = _tree_sum(jax.tree.map(lambda x: jnp.var(x, axis=0, ddof=1), per_sample_grads))
    return variance / (eta**2 * _tree_sum(jax.tree.map(jnp.square, g)))


def inner_product_test(per_sample_grads, theta: float = 0.1) -> jax.Array:
    """Suggested batch size from the inner-product test."""
    _check_samples(per_sample_grads)
    g = _mean(per_sample_grads)
    sq_norm = _tree_sum(jax.tree.map(jnp.square, g))
    return jnp.var(_per_sample_dot(per_sample_grads, g), ddof=1) / (theta**2 * sq_norm**2)


def orthogonality_test(per_sample_grads, nu: float = 0.1) -> jax.Array:
    """Suggested batch size from the orthogonality test."""
    _check_samples(per_sample_grads)
    g = _mean(per_sample_grads)
    sq_norm = _tree_sum(jax.tree.map(jnp.square, g))
    coeff = _per_sample_dot(per_sample_grads, g) / sq_norm
    residual = jax.tree.map(
        lambda x, m: x - coeff.reshape((-1,) + (1,) * m.ndim) * m, per_sample_grads, g
    )
    variance = _tree_sum(jax.tree.map(lambda x: jnp.var(x, axis=0, ddof=1), residual))
    return variance / (nu**2 * sq_norm)


def augmented_inner_product_test(per_sample_grads, theta: float = 0.1, nu: float = 0.1):
    """Suggested batch size from the augmented inner-product test."""
    return jnp.maximum(
        inner_product_test(per_sample_grads, theta), orthogonality_test(per_sample_grads, nu)
    )


class GradientStats(NamedTuple):
    """Streaming sufficient statistics of n gradients g_j (each a mean over some samples).

    `mean` and `m2` (sum of squared deviations per coordinate) give the norm test;
    `proj_mean` / `proj_m2` describe p_j = <g_j, ref> for a reference direction `ref`
    (the step's mean gradient, known only after a first pass), and `sq_norm_sum` is
    sum_j ||g_j||^2; together they give the inner-product and orthogonality tests.
    """

    count: jax.Array
    mean: object
    m2: object
    sq_norm_sum: jax.Array
    proj_count: jax.Array
    proj_mean: jax.Array
    proj_m2: jax.Array


def stats_init(params) -> GradientStats:
    """Empty statistics shaped like `params`."""
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    scalar = jnp.zeros((), jnp.float32)
    return GradientStats(scalar, zeros, zeros, scalar, scalar, scalar, scalar)


def _welford(count, mean, m2, new_count, new_mean, new_m2):
    """Chan et al.'s merge of two (count, mean, m2) summaries: the law of total variance."""
    total = count + new_count
    w = jnp.where(total > 0, new_count / jnp.maximum(total, 1), 0.0)
    merged_mean = jax.tree.map(lambda a, b: a + (b - a) * w, mean, new_mean)
    merged_m2 = jax.tree.map(
        lambda ma, mb, a, b: ma + mb + (b - a) ** 2 * count * w, m2, new_m2, mean, new_mean
    )
    return total, merged_mean, merged_m2


def stats_from_samples(samples) -> GradientStats:
    """Statistics of gradients stacked on a leading axis (one per group or device)."""
    samples = jax.tree.map(_at_least_f32, samples)
    n = jnp.asarray(jax.tree.leaves(samples)[0].shape[0], jnp.float32)
    mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), samples)
    m2 = jax.tree.map(lambda x, m: jnp.sum((x - m) ** 2, axis=0), samples, mean)
    sq = _tree_sum(jax.tree.map(jnp.square, samples))
    zero = jnp.zeros((), jnp.float32)
    return GradientStats(n, mean, m2, sq, zero, zero, zero)


def projections_from_samples(samples, ref) -> GradientStats:
    """Statistics of p_j = <g_j, ref> alone (the second pass), for `stats_merge`."""
    p = _per_sample_dot(jax.tree.map(_at_least_f32, samples), ref)
    n = jnp.asarray(p.shape[0], jnp.float32)
    zeros = jax.tree.map(lambda r: jnp.zeros(r.shape, jnp.float32), ref)
    zero = jnp.zeros((), jnp.float32)
    return GradientStats(zero, zeros, zeros, zero, n, jnp.mean(p), jnp.sum((p - jnp.mean(p)) ** 2))


def stats_add(stats: GradientStats, grad, ref=None) -> GradientStats:
    """Fold in one gradient; with `ref`, its projection <grad, ref> instead (second pass)."""
    sample = jax.tree.map(lambda x: x[None], grad)
    if ref is None:
        return stats_merge(stats, stats_from_samples(sample))
    return stats_merge(stats, projections_from_samples(sample, ref))


def stats_merge(a: GradientStats, b: GradientStats) -> GradientStats:
    """Statistics of the union of two disjoint sets of gradients."""
    count, mean, m2 = _welford(a.count, a.mean, a.m2, b.count, b.mean, b.m2)
    pc, pm, pm2 = _welford(
        a.proj_count, a.proj_mean, a.proj_m2, b.proj_count, b.proj_mean, b.proj_m2
    )
    return GradientStats(count, mean, m2, a.sq_norm_sum + b.sq_norm_sum, pc, pm, pm2)


def stats_all_reduce(stats: GradientStats, axis_name) -> GradientStats:
    """Merge the statistics every device holds along `axis_name` (shard_map, pmap, vmap).

    The law of total variance: the spread of the union is the sum of each part's
    spread plus each part's count times its mean's squared distance to the global mean.
    """

    def total(count, mean, m2):
        n = jax.lax.psum(count, axis_name)
        w = count / jnp.maximum(n, 1)
        global_mean = jax.tree.map(lambda m: jax.lax.psum(m * w, axis_name), mean)
        spread = jax.tree.map(
            lambda m, s, g: jax.lax.psum(s + count * (m - g) ** 2, axis_name), mean, m2, global_mean
        )
        return n, global_mean, spread

    count, mean, m2 = total(stats.count, stats.mean, stats.m2)
    pc, pm, pm2 = total(stats.proj_count, stats.proj_mean, stats.proj_m2)
    sq = jax.lax.psum(stats.sq_norm_sum, axis_name)
    return GradientStats(count, mean, m2, sq, pc, pm, pm2)


def suggested_batch_sizes(
    stats: GradientStats, *, samples_per_gradient=1, eta=0.1, theta=0.1, nu=0.1
) -> dict:
    """b* of each test from streaming statistics, in samples.

    Each g_j averages `samples_per_gradient` samples, so the per-sample variance is that
    many times the variance between the g_j. The projection statistics must have been
    accumulated against ref = stats.mean (a second pass).
    """
    n, m = stats.count, samples_per_gradient
    sq_norm = _tree_sum(jax.tree.map(jnp.square, stats.mean))
    coord_var = _tree_sum(stats.m2) / (n - 1)
    proj_var = stats.proj_m2 / (stats.proj_count - 1)
    # sum_j ||g_j - c_j g||^2 with c_j = p_j / ||g||^2 (the residuals have mean zero).
    sum_proj_sq = stats.proj_m2 + stats.proj_count * stats.proj_mean**2
    ortho_var = (stats.sq_norm_sum - sum_proj_sq / sq_norm) / (n - 1)
    inner = m * proj_var / (theta**2 * sq_norm**2)
    ortho = m * ortho_var / (nu**2 * sq_norm)
    return {
        "norm": m * coord_var / (eta**2 * sq_norm),
        "inner_product": inner,
        "orthogonality": ortho,
        "augmented_inner_product": jnp.maximum(inner, ortho),
    }
