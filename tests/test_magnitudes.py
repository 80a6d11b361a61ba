"""Counters, schedules and the data iterator at a real run's size: 10**12 tokens, 10**7 steps.

Driven there directly (no training): the counters and the schedule the train step uses,
and the iterator restored from a state ten million steps in.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcx.optim.schedules import cosine_schedule, power_schedule, wsd_schedule
from lcx.settings import resolve
from lcx.train import step as steplib

TOKENS = 10**12
STEPS = 10**7


def test_row_counter_is_exact_past_two_to_the_31_rows():
    seq_len = 64  # 10**12 tokens are 1.6e10 rows: past any int32
    rows = TOKENS // seq_len - 5
    counter = jax.jit(steplib.add_rows)(steplib.wide_rows(rows), jnp.int32(13))
    assert steplib.host_rows(counter) == rows + 13
    tokens = float(steplib.rows_as_float(counter)) * seq_len
    assert abs(tokens - (rows + 13) * seq_len) / TOKENS < 1e-7
    step = jax.jit(lambda s: s + 1)(jnp.int32(STEPS - 1))
    assert int(step) == STEPS


def test_train_step_counts_tokens_at_a_trillion(smoke_config):
    """The optimizer update the train step runs, from a state 10**12 tokens in."""
    from lcx.model import TransformerConfig
    from lcx.train.optimizer import OptimizerConfig, ScheduleConfig, make_optimizer, make_schedule

    c = smoke_config
    seq_len, batch = c.train.seq_len, c.train.batch_size
    schedule = make_schedule(ScheduleConfig.of(resolve(c).schedule), total_steps=STEPS + 10,
                             batch_size=batch, seq_len=seq_len)  # fmt: skip
    tx = make_optimizer(OptimizerConfig.of(resolve(c).optimizer), schedule)
    graphdef, abstract = steplib.abstract_model(TransformerConfig(**c.model))
    del graphdef
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                          __import__("flax").nnx.to_pure_dict(abstract))  # fmt: skip
    rows = TOKENS // seq_len
    state = steplib.TrainState(jnp.int32(STEPS - 1), params, tx.init(params),
                               steplib.wide_rows(rows), jnp.int32(batch))  # fmt: skip
    grads = jax.tree.map(jnp.ones_like, params)
    new, metrics = jax.jit(steplib._optimizer_update, static_argnums=(0, 4))(
        tx, state, grads, batch, seq_len
    )
    assert int(new.step) == STEPS
    assert steplib.host_rows(new.rows_seen) == rows + batch
    assert abs(float(metrics["tokens_seen"]) - TOKENS) / TOKENS < 1e-6
    assert np.isfinite(float(metrics["learning_rate"]))
    assert np.isfinite(float(optax.tree.norm(new.params)))


def test_schedules_take_integer_token_counts_past_int32():
    kw = dict(warmup_tokens=10**9, decay_tokens=10**11, total_tokens=TOKENS)
    power = power_schedule(batch_size=8, final_lr_fraction=0.1, **kw)
    wsd = wsd_schedule(peak_lr=1e-3, final_lr_fraction=0.1, decay="linear", **kw)
    cosine = cosine_schedule(peak_lr=1e-3, warmup_tokens=10**9, total_tokens=TOKENS)
    # Before, inside and at the end of the decay: the formulas in float64 on the host.
    for n in (5 * 10**11, 9.5 * 10**11, TOKENS):
        base = min(0.02, 8 * 4.0 * min(n, 9 * 10**11) ** -0.51)
        assert np.isclose(float(power(n, 8)), _with_exponential_decay(base, n), rtol=1e-4)
        progress = max(0.0, (n - 9 * 10**11) / 10**11)
        assert np.isclose(float(wsd(n)), 1e-3 * (1 - 0.9 * progress), rtol=1e-4)
        want = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (n - 1e9) / (TOKENS - 1e9))))
        assert np.isclose(float(cosine(n)), want, rtol=1e-4, atol=1e-9)


def _with_exponential_decay(value, n):
    """The power schedule's exponential tail to 0.1 over the last 10**11 tokens."""
    progress = min(max((n - 9 * 10**11) / 10**11, 0.0), 1.0)
    e = np.e
    factor = (1 - 0.1) * e / (e - 1) * np.exp(-progress) + (0.1 * e - 1) / (e - 1)
    return value * max(factor, 0.1)


def test_data_iterator_resumes_ten_million_steps_in(smoke_config):
    """A packed iterator restored a billion documents in (ten million steps of ~100)."""
    from lcx.train import input as data_input

    data = resolve(smoke_config).data
    corpus, _ = data_input.load_split(data, "train", None)

    def iterator():
        return iter(data_input.make_dataset(corpus, data, seq_len=64,
                                            global_batch_size=4, seed=0, train=True,
                                            pad_id=258))  # fmt: skip

    it = iterator()
    next(it)
    state = it.get_state()
    assert set(state) == {"parent", "next_row", "counter"}, state  # grain's packer state
    far = dict(state, parent={"next_index": 10**9}, next_row=0, counter=STEPS * 4)
    it.set_state(far)
    batch = next(it)
    assert batch["tokens"].shape == (4, 64) and (batch["segment_ids"] > 0).any()
    again = iterator()
    again.set_state(far)  # the same state gives the same batch: nothing wrapped
    np.testing.assert_array_equal(next(again)["tokens"], batch["tokens"])
    assert it.get_state()["parent"]["next_index"] >= 10**9
