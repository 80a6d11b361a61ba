"""The serving engine against recomputation: caches, chunked and prepacked prefill, shared
prefixes, sampling, bad input."""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lcx.cache
from lcx import paged_cache
from lcx.attention import packed_attention, ragged_paged_xla
from lcx.attention.shared_prefix import SharedPrefix, shared_prefix_attention
from lcx.cache import CHUNK_QUERY_BLOCK, AttentionCache, cache_attention
from lcx.generate import Engine, Request, SamplingParams, allowed_tokens, generate, sample
from lcx.model import Transformer, TransformerConfig
from lcx.settings import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 61
TIE = 1e-5  # logits this close may pick either token


def tiny_model(seed=0, **overrides):
    """A float32 Transformer small enough to recompute every step."""
    fields = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, attention_implementation="xla_chunked")  # fmt: skip
    fields.update(overrides)
    return Transformer(TransformerConfig(**fields), rngs=nnx.Rngs(seed))


@functools.partial(jax.jit, static_argnames="graphdef")
def _last_logits(state, tokens, n, *, graphdef):
    """Logits at index n - 1 of a causal forward over a fixed-length padded row."""
    return nnx.merge(graphdef, state)(tokens[None])[0, n - 1]


def greedy_by_recomputation(model, prompt, n):
    """(new tokens, whether a near-tie decided a pick): the full forward at every step."""
    tokens, tie = list(prompt), False
    graphdef, state = nnx.split(model)
    width = 128  # one compilation: later padding cannot reach earlier logits (causal)
    for _ in range(n):
        padded = jnp.asarray(tokens + [0] * (width - len(tokens)))
        logits = np.asarray(_last_logits(state, padded, len(tokens), graphdef=graphdef))
        top2 = np.sort(logits)[-2:]
        tie |= top2[1] - top2[0] < TIE
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt) :], tie


def assert_same_greedy(model, prompts, outputs, n):
    """Each output equals recomputation, up to the first near-tie (then it may differ)."""
    for prompt, out in zip(prompts, outputs, strict=True):
        expected, tie = greedy_by_recomputation(model, prompt, n)
        if tie and out != expected:
            continue  # a pick between logits within 1e-5: either token is right
        assert out == expected


def random_prompts(rng, lengths):
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


def test_engine_greedy_equals_recomputation_with_more_requests_than_slots(rng):
    model = tiny_model()
    prompts = random_prompts(rng, [int(n) for n in rng.integers(1, 40, 7)])
    # 3 slots, 8 tokens a step: prompts are prefilled in chunks beside running decodes.
    outputs = generate(model, prompts, max_new_tokens=5, slots=3, token_budget=8)
    assert_same_greedy(model, prompts, outputs, 5)


def test_continuous_batching_gives_each_request_its_tokens_alone(rng):
    model = tiny_model(seed=1)
    prompts = random_prompts(rng, [3, 25, 11, 40, 2, 17])
    new = [4, 9, 2, 6, 7, 3]
    # Rows of 2 decodes + 3 chunk blocks: a step can hold chunks of both slots.
    engine = Engine(model, slots=2, max_length=56, token_budget=40)
    ids = [engine.submit(Request(p, n)) for p, n in zip(prompts, new, strict=True)]
    together = engine.run()
    for i, prompt, n in zip(ids, prompts, new, strict=True):
        alone = Engine(model, slots=1, max_length=56, token_budget=64)
        j = alone.submit(Request(prompt, n))
        assert together[i] == alone.run()[j]
        assert len(together[i]) == n


def _slot_entries(engine, slot, n):
    """The first n cache entries of a slot, every layer: [layers, 2, n, K, D]."""
    return np.stack([np.stack([c.k[slot, :n], c.v[slot, :n]]) for c in engine._cache])


def test_chunked_prefill_leaves_the_cache_of_one_shot_prefill(rng):
    model = tiny_model(seed=2)
    prompt = random_prompts(rng, [45])[0]
    chunked = Engine(model, slots=2, max_length=64, token_budget=8)  # chunks of 6 tokens
    chunked.submit(Request(prompt, 1))
    while not chunked.idle:
        chunked.step()
    one_shot = Engine(model, slots=2, max_length=64, token_budget=64)
    one_shot.submit(Request(prompt, 1))
    one_shot.step()
    assert chunked.steps == 8 and one_shot.steps == 1
    np.testing.assert_allclose(
        _slot_entries(chunked, 0, 45), _slot_entries(one_shot, 0, 45), atol=1e-5
    )
    assert chunked.results == one_shot.results


def _blocked_row(rng):
    """(q, segment ids, positions, cache, offset) in float64 (call under enable_x64): 3
    slots of a 40-entry cache; slot 0 decodes at 17, slot 1 is idle, slot 2 decodes at
    38; then three chunk blocks: slot 1 from 0 (a whole block), from 16 (5 tokens), slot
    0 from 3 (14 tokens). Offsets 0, 2, 1."""
    slots, length, block = 3, 40, CHUNK_QUERY_BLOCK
    cache = AttentionCache(*(jnp.asarray(rng.normal(size=(slots, length, 2, 8))) for _ in "kv"))
    t = slots + 3 * block
    q = jnp.asarray(rng.normal(size=(1, t, 4, 8)))
    ids, positions = np.zeros((1, t), np.int32), np.zeros((1, t), np.int32)
    ids[0, :slots], positions[0, :slots] = [1, 0, 3], [17, 0, 38]  # slot 1 idle
    for b, (slot, start, n) in enumerate([(2, 0, block), (2, block, 5), (1, 3, block - 2)]):
        at = slots + b * block
        ids[0, at : at + n], positions[0, at : at + n] = slot, start + np.arange(n)
    return q, ids, positions, cache, jnp.asarray([0, 2, 1], jnp.int32)


@pytest.mark.parametrize(
    "implementation, dense_decode_cache",
    [("xla", None), ("xla_chunked", None), (None, None), (None, 0)],
)
def test_blocked_cache_attention_equals_attention_over_the_whole_cache(
    rng, implementation, dense_decode_cache, monkeypatch
):
    """Decodes slot by slot and chunk blocks against their slot's cache, vs one flat row.
    With no implementation named, the CPU reads each slot's pages raggedly, decodes of a
    cache up to DENSE_DECODE_CACHE (here, unless 0) by the dense product."""
    if dense_decode_cache is not None:
        monkeypatch.setattr(lcx.cache, "DENSE_DECODE_CACHE", dense_decode_cache)
    with jax.enable_x64(True):
        q, ids, positions, cache, offset = _blocked_row(rng)
        slots, block = cache.slots, CHUNK_QUERY_BLOCK
        common = dict(offset_S=offset, window=None, implementation=implementation)
        attend = jax.jit(  # one compiled program per layout: faster than op by op
            functools.partial(cache_attention, **common), static_argnames="decode_rows"
        )
        blocked = attend(q, ids, positions, cache, decode_rows=slots)
        flat = attend(q, ids, positions, cache)
        for a, b in zip(blocked, flat, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-12)
        # A query of another slot inside a block attends nothing.
        ids[0, slots + block + 7] = 3
        out, _ = attend(q, ids, positions, cache, decode_rows=slots)
        assert not np.any(out[0, slots + block + 7])
        with pytest.raises(ValueError, match="CHUNK_QUERY_BLOCK"):
            cache_attention(q[:, :-1], ids[:, :-1], positions[:, :-1], cache, decode_rows=slots)


def test_the_cpu_reads_each_slot_only_up_to_its_own_last_token(rng, monkeypatch, loop_runs):
    """The CPU's ragged read of a one-stretch cache visits, one item per loop run, only
    the pages of 16 rows up to each group's last token: decodes at indices 17 and 37 (2 +
    3 pages; the last page of the 40 rows starts at 24 and leaves rows 24-31 to the page
    before), chunk blocks ending at 13, 18 and 16 (1 + 2 + 2): 10 of the 15 that reading
    every group's slot whole would take."""
    monkeypatch.setattr(ragged_paged_xla, "ITEM_BLOCK", 1)
    monkeypatch.setattr(lcx.cache, "DENSE_DECODE_CACHE", 0)  # decodes read raggedly too
    with jax.enable_x64(True):
        q, ids, positions, cache, offset = _blocked_row(rng)
        ragged = cache_attention(q, ids, positions, cache, offset_S=offset, decode_rows=3)
        jax.effects_barrier()
        assert len(loop_runs) == 2 + 3 + 1 + 2 + 2
        flat = cache_attention(q, ids, positions, cache, offset_S=offset)
        for a, b in zip(ragged, flat, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-12)


def test_prepacked_prefill_equals_each_prompt_prefilled_alone(rng):
    model = tiny_model(seed=3)
    prompts = random_prompts(rng, [30, 7, 12, 19, 3, 26])
    packed = Engine(model, slots=6, max_length=48, token_budget=8)
    first = {e.request_id: e.token for e in packed.prefill([Request(p, 4) for p in prompts])}
    for slot, prompt in enumerate(prompts):
        alone = Engine(model, slots=1, max_length=48, token_budget=48)
        (event,) = alone.prefill([Request(prompt, 4)])
        assert event.token == first[slot]
        np.testing.assert_allclose(
            _slot_entries(packed, slot, len(prompt)), _slot_entries(alone, 0, len(prompt)),
            atol=1e-5,
        )  # fmt: skip
    outputs = packed.run()
    assert_same_greedy(model, prompts, [outputs[i] for i in range(len(prompts))], 4)


def test_shared_prefix_generation_equals_recomputation(rng):
    model = tiny_model(seed=4)
    prefix = random_prompts(rng, [33])[0]
    prompts = [prefix + p for p in random_prompts(rng, [4, 1, 9, 6])]
    detected = generate(model, prompts, max_new_tokens=5, shared_prefix=True, token_budget=16)
    given = generate(model, prompts, max_new_tokens=5, shared_prefix=prefix, token_budget=16)
    assert detected == given
    assert_same_greedy(model, prompts, detected, 5)


def _random_qkv(rng, b, t, h, k, d):
    return [jnp.asarray(rng.standard_normal((b, t, n, d))) for n in (h, k, k)]


def _prefix(rng, g, p, k, d, lengths, starts):
    kv = [jnp.asarray(rng.standard_normal((g, p, k, d))) for _ in range(2)]
    return SharedPrefix(*kv, jnp.asarray(lengths), jnp.asarray(starts))


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked"])
def test_shared_prefix_attention_equals_attention_over_the_concatenation(rng, implementation):
    """A two-level tree: one root prefix for all, then one of two child prefixes each."""
    with jax.enable_x64(True):
        b, t, h, k, d = 4, 5, 4, 2, 8
        root = _prefix(rng, 1, 11, k, d, [11], [0])
        child = _prefix(rng, 2, 7, k, d, [7, 4], [11, 11])  # the second prefix is shorter
        group = np.array([0, 1, 1, 0])
        q, sk, sv = _random_qkv(rng, b, t, h, k, d)
        suffix_start = np.asarray(child.lengths)[group] + 11
        positions = jnp.asarray(suffix_start[:, None] + np.arange(t))
        groups = [jnp.zeros((b, t), jnp.int32), jnp.asarray(np.repeat(group[:, None], t, 1))]
        # Both sides compiled, one program each: the same arithmetic as op by op, faster.
        got = jax.jit(functools.partial(shared_prefix_attention, implementation=implementation))(
            q, sk, sv, prefixes=[root, child], prefix_groups=groups,
            q_positions=positions, kv_positions=positions,
        )  # fmt: skip
        lengths = [int(n) for n in np.asarray(child.lengths)]

        @jax.jit
        def reference(q, sk, sv, root, child, positions):
            out = []
            for row in range(b):
                n = lengths[group[row]]
                keys = [
                    jnp.concatenate([root.k[0], child.k[group[row], :n], sk[row]])[None],
                    jnp.concatenate([root.v[0], child.v[group[row], :n], sv[row]])[None],
                ]
                pos = jnp.arange(11 + n + t)[None]
                out.append(packed_attention(
                    q[row : row + 1], *keys, jnp.ones((1, t), jnp.int32),
                    kv_segment_ids=jnp.ones((1, 11 + n + t), jnp.int32),
                    q_positions=positions[row : row + 1], kv_positions=pos, implementation="xla",
                )[0])  # fmt: skip
            return out

        wants = reference(q, sk, sv, root, child, positions)
        for row in range(b):
            want = wants[row][None]
            np.testing.assert_allclose(got[row], want[0], atol=1e-10)


def test_sampling_is_reproducible_and_stays_in_the_top_k_and_top_p_sets(rng):
    logits = jnp.asarray(rng.standard_normal((4, VOCAB)) * 3, jnp.float32)
    top_k = jnp.asarray([0, 5, 0, 3], jnp.int32)
    top_p = jnp.asarray([2.0, 2.0, 0.6, 0.9], jnp.float32)
    allowed = np.asarray(allowed_tokens(logits, top_k, top_p))
    for row in range(4):  # the sets, from numpy
        order = np.argsort(-np.asarray(logits[row]))
        k = int(top_k[row]) or VOCAB
        probs = np.exp(np.asarray(logits[row])[order[:k]])
        probs /= probs.sum()
        keep = (np.cumsum(probs) - probs) < float(top_p[row])
        assert set(np.flatnonzero(allowed[row])) == set(order[:k][keep])
    temperature = jnp.ones(4, jnp.float32)
    seeds = jnp.asarray([7, 7, 8, 9], jnp.uint32)
    draws = jax.jit(
        jax.vmap(lambda c: sample(logits, seeds, jnp.full(4, c), temperature, top_k, top_p))
    )(jnp.arange(2000))
    draws = np.asarray(draws)
    for row in range(4):
        assert set(draws[:, row]) <= set(np.flatnonzero(allowed[row]))
    unrestricted = np.bincount(draws[:, 0], minlength=VOCAB) / 2000
    np.testing.assert_allclose(unrestricted, jax.nn.softmax(logits[0]), atol=0.05)
    model = tiny_model(seed=5)
    prompts = random_prompts(rng, [5, 9, 3])
    settings = dict(max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.95, seed=3)
    first = generate(model, prompts, **settings)
    assert generate(model, prompts, **settings, slots=1) == first  # batching-independent
    assert generate(model, prompts, **{**settings, "seed": 4}) != first


def test_bad_input_raises_one_line_and_leaves_the_engine_unchanged():
    model = tiny_model()
    engine = Engine(model, slots=2, max_length=16, token_budget=4)
    engine.submit(Request([1, 2, 3], 2))
    bad = {
        "empty": Request([], 2),
        "max_new_tokens=0": Request([1], 0),
        "needs 20 cache entries": Request(list(range(10)), 10),
        "outside the vocabulary": Request([1, VOCAB], 2),
    }
    for message, request in bad.items():
        with pytest.raises(ValueError, match=message) as error:
            engine.submit(request)
        assert "\n" not in str(error.value)
        with pytest.raises(ValueError, match=message):
            engine.prefill([Request([1, 2], 2), request])
    assert len(engine._queue) == 1 and all(r is None for r in engine._running)
    for params in [dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0), dict(temperature=-1)]:
        with pytest.raises(ValueError, match=next(iter(params))):
            SamplingParams(**params)
    for budget in (1, 2):
        with pytest.raises(ValueError, match=f"token_budget={budget} must be > slots=2"):
            Engine(model, slots=2, max_length=16, token_budget=budget)
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1], []], max_new_tokens=2)
    assert engine.run() == {0: engine.results[0]} and len(engine.results[0]) == 2


MESH_SCRIPT = r"""
import os, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from test_generate import tiny_model, random_prompts
from configs import lm_tiny
from lcx.generate import generate
from lcx.train import sharding as sh

assert jax.device_count() == 8, jax.devices()
rules = tuple(tuple(r) for r in lm_tiny.get_config("smoke").sharding_rules)
mesh = sh.make_mesh(sh.MeshShape(data=4, fsdp=1, tensor=2, sequence=1))
model = tiny_model(seed=6, vocab_size=64)  # the vocabulary splits over tensor=2
rng = np.random.default_rng(int(os.environ["LCX_MESH_SEED"]))
prompts = random_prompts(rng, [9, 30, 4, 17, 22, 6])
settings = dict(max_new_tokens=6, slots=4, token_budget=16)
one = generate(model, prompts, **settings)
eight = generate(model, prompts, **settings, mesh=mesh, rules=rules)
prefix = generate(model, [prompts[0] + p for p in prompts], shared_prefix=True, **settings)
eight_prefix = generate(model, [prompts[0] + p for p in prompts], shared_prefix=True,
                        mesh=mesh, rules=rules, **settings)
hybrid = tiny_model(seed=6, vocab_size=64, block_pattern=("attention", "lact"),
                    lact=dict(chunk_size=8, window=12))
lact = generate(hybrid, prompts, **settings)
eight_lact = generate(hybrid, prompts, **settings, mesh=mesh, rules=rules)
print("tokens", one == eight, prefix == eight_prefix, lact == eight_lact)
"""


@pytest.mark.slow
def test_eight_device_mesh_generates_the_tokens_of_one_device(rng):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
        LCX_MESH_SEED=str(int(rng.integers(2**31))), PYTHONPATH=ROOT,
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens True True True" in result.stdout, result.stdout


def test_engine_parameters_a_mesh_axis_cannot_split_are_replicated_with_a_warning():
    """A vocabulary of 63 under tensor=2: the embedding's vocab dimension stays whole."""
    import warnings

    from configs import lm_tiny
    from lcx.generate.engine import _param_shardings
    from lcx.train import sharding as sh

    rules = tuple(tuple(r) for r in lm_tiny.get_config("smoke").sharding_rules)
    mesh = jax.sharding.AbstractMesh((4, 1, 2, 1), sh.MESH_AXES)  # no devices needed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 64 splits: nothing to say
        _param_shardings(nnx.split(tiny_model(vocab_size=64))[1], mesh, rules)
    _, state = nnx.split(tiny_model(vocab_size=63))
    with pytest.warns(UserWarning) as caught:
        shardings = _param_shardings(state, mesh, rules)
    (warning,) = caught
    message = str(warning.message)
    assert "(63, 32)" in message and "'tensor' on dimension 0" in message, message
    dropped = [
        (jax.tree_util.keystr(path), x.shape)
        for (path, sharding), x in zip(
            jax.tree_util.tree_flatten_with_path(shardings)[0], jax.tree.leaves(state), strict=True
        )
        if 63 in x.shape and "tensor" not in sharding.spec
    ]
    assert dropped and all(f"{name} {tuple(shape)}" in message for name, shape in dropped)


@pytest.mark.parametrize("pattern", [("lact",), ("attention", "lact")], ids=["lact", "hybrid"])
def test_lact_and_hybrid_engine_greedy_equals_recomputation(rng, pattern):
    """Fast weights update every 8 tokens of each sequence, in prompts and while decoding."""
    model = tiny_model(
        seed=7, block_pattern=pattern, lact=dict(chunk_size=8, window=12, fw_heads=2)
    )  # fmt: skip
    prompts = random_prompts(rng, [13, 3, 21, 8, 30])
    outputs = generate(model, prompts, max_new_tokens=11, slots=2, token_budget=9)
    assert_same_greedy(model, prompts, outputs, 11)
    with pytest.raises(ValueError, match=r"\['lact'\] layers cannot prefill whole prompts"):
        Engine(model, slots=2, max_length=48, token_budget=9).prefill([Request([1, 2], 2)])
    with pytest.raises(ValueError, match=r"^shared_prefix: the model's \['lact'\] layers"):
        Engine(model, slots=2, max_length=48, token_budget=9, shared_prefix=[1, 2])


def test_cancel_frees_the_slot_mid_prefill_and_mid_decode_and_the_rest_are_unchanged(rng):
    """A cancelled request leaves no trace: the requests that take its slot (LaCT fast
    weights and attention cache both) generate what they would alone."""
    model = tiny_model(
        seed=7, block_pattern=("attention", "lact"), lact=dict(chunk_size=8, window=12, fw_heads=2)
    )  # fmt: skip
    prompts = random_prompts(rng, [21, 13, 8, 30])
    engine = Engine(model, slots=2, max_length=48, token_budget=9)  # the LaCT test's shapes
    ids = [engine.submit(Request(p, 11)) for p in prompts]
    queued = engine.submit(Request(prompts[2], 4))
    assert engine.cancel(queued) and engine.results[queued] == []
    engine.step()  # both slots prefill 7 tokens between them: the first is mid-prompt
    assert (engine.running, engine.waiting) == (2, 2)
    assert engine.cancel(ids[0]) and engine.results[ids[0]] == []
    assert (engine.running, engine.waiting) == (1, 2)
    second = []
    while len(second) < 2:
        second += [e.token for e in engine.step() if e.request_id == ids[1]]
    assert engine.cancel(ids[1])  # mid-decode, two tokens in
    assert len(engine.results[ids[1]]) == 2 and not engine.cancel(ids[1])
    results = engine.run()
    assert_same_greedy(model, prompts[2:], [results[i] for i in ids[2:]], 11)


def test_events_carry_the_model_s_log_probabilities(rng):
    model = tiny_model(seed=3)
    prompt = random_prompts(rng, [9])[0]
    engine = Engine(model, slots=2, max_length=24, token_budget=12)
    events = []
    engine.submit(Request(prompt, 4, top_logprobs=3))
    engine.submit(Request(prompt, 4))
    engine.run(events.append)
    graphdef, state = nnx.split(model)
    tokens = list(prompt)
    for event in [e for e in events if e.request_id == 0]:
        padded = jnp.asarray(tokens + [0] * (128 - len(tokens)))
        logits = _last_logits(state, padded, len(tokens), graphdef=graphdef)
        logprobs = np.asarray(jax.nn.log_softmax(logits))
        np.testing.assert_allclose(event.logprob, logprobs[event.token], atol=1e-5)
        best = np.argsort(-logprobs)[:3]
        assert [t for t, _ in event.top_logprobs] == best.tolist()
        np.testing.assert_allclose([p for _, p in event.top_logprobs], logprobs[best], atol=1e-5)
        tokens.append(event.token)
    assert all(e.top_logprobs == () for e in events if e.request_id == 1)
    with pytest.raises(ValueError, match=r"top_logprobs=21 must be in \[0, 20\]"):
        engine.submit(Request(prompt, 4, top_logprobs=21))


# ---- paged cache ----------------------------------------------------------------------


def test_paged_engine_equals_the_unpaged_one_and_recomputation(rng, monkeypatch):
    """Pages of 4 tokens, read raggedly inside a window of 7: the same tokens as one
    stretch per slot, with prompts chunked beside decodes and a shared prefix stored once
    (tests/test_serve.py runs a paged engine without a window); likewise with the host's
    work lists (the TPU kernel's). The step builds its own lists on the CPU, so the paged
    engine's steps take no more argument shapes (compiled variants) than one stretch's;
    the host's lists, padded to power-of-two buckets, take more."""
    model = tiny_model(seed=11, attention_window=7)
    prompts = random_prompts(rng, [23, 2, 9, 31, 14])
    run = functools.partial(generate, model, prompts, max_new_tokens=6, slots=3,
                            token_budget=12)  # fmt: skip
    shapes = []  # per run, the step arguments' shapes
    device_args = Engine._device_args

    def recorded(self, *args, **kwargs):
        """The engine's step arguments; their shapes noted."""
        arguments = device_args(self, *args, **kwargs)
        shapes[-1].add(str(jax.tree.map(np.shape, arguments[3])))
        return arguments

    monkeypatch.setattr(Engine, "_device_args", recorded)
    monkeypatch.setattr(paged_cache, "MIN_ITEMS", 1)  # buckets of 1, 2, 4, ... items

    def outputs(host_work=(), **paging):
        """The run's tokens, with work lists from the host on the `host_work` backends."""
        monkeypatch.setattr(paged_cache, "HOST_WORK_BACKENDS", host_work)
        shapes.append(set())
        return run(**paging)

    plain, paged = outputs(), outputs(page_size=4)
    host_listed = outputs(("cpu",), page_size=4)
    assert paged == plain and host_listed == plain
    assert len(shapes[1]) == len(shapes[0]) < len(shapes[2])
    assert_same_greedy(model, prompts, paged, 6)
    prefix = random_prompts(rng, [10])[0]
    shared = [prefix + p for p in prompts]
    assert generate(model, shared, max_new_tokens=4, slots=2, shared_prefix=prefix,
                    page_size=4) == generate(model, shared, max_new_tokens=4, slots=2,
                                             shared_prefix=prefix)  # fmt: skip


def test_paged_engine_preempts_by_recomputation_with_unchanged_outputs(rng):
    """A pool of 6 pages for 3 slots of up to 24 tokens: the newest request gives its
    pages back, is prefilled again with what it generated, and every output (greedy and
    sampled) is what the unpaged engine gives; every page comes back."""
    model = tiny_model(seed=12)
    prompts = random_prompts(rng, [13, 9, 15, 4, 11])
    requests = [
        Request(p, 10, SamplingParams(temperature=t, seed=i))
        for i, (p, t) in enumerate(zip(prompts, [0.0, 1.0, 0.0, 0.8, 0.0], strict=True))
    ]

    def outputs(**paging):
        """Each request's tokens, and the engine."""
        engine = Engine(model, slots=3, max_length=24, token_budget=10, **paging)
        ids = [engine.submit(r) for r in requests]
        results = engine.run()
        return [results[i] for i in ids], engine

    plain, _ = outputs()
    paged, engine = outputs(page_size=4, num_pages=6)
    assert paged == plain
    assert engine.preemptions > 0 and engine.pages_in_use == 0
    # Decode reads follow each slot's own length: pages read in a decode-only step are
    # the sum over slots of ceil(index + 1, 4), not slots x the longest.
    engine = Engine(model, slots=3, max_length=48, token_budget=10, page_size=4)
    for prompt in prompts[:3]:
        engine.submit(Request(prompt, 20))
    while engine.last_row is None or engine.last_row["tokens"].shape[1] != 3:
        engine.step()  # until every prompt is in and the step decodes only
    before = engine.pages_read
    engine.step()
    indices = engine.last_row["positions"][0]
    assert engine.pages_read - before == sum(int(i) // 4 + 1 for i in indices)
    engine.cancel(1)
    assert engine.pages_in_use == sum(-(-(int(i) + 1) // 4) for i in indices[[0, 2]])


def test_paged_engine_refuses_what_paging_cannot_serve():
    with pytest.raises(ValueError, match=r"^num_pages=2 of page_size=4 hold 8 tokens; one "
                       r"sequence of max_length=16 needs 4 pages$"):  # fmt: skip
        Engine(tiny_model(), slots=2, max_length=16, token_budget=8, page_size=4, num_pages=2)
    with pytest.raises(ValueError, match=r"^num_pages=8 needs page_size"):
        Engine(tiny_model(), slots=2, max_length=16, token_budget=8, num_pages=8)
    lact = tiny_model(block_pattern=("attention", "lact"), lact=dict(chunk_size=4, window=4))
    with pytest.raises(ValueError, match=r"^page_size: the model's \['lact'\] layers"):
        Engine(lact, slots=2, max_length=16, token_budget=8, page_size=4)


def test_prefix_cache_skips_cached_pages_with_unchanged_outputs(rng):
    """Requests that resend a conversation (each prompt the last one plus its answer and
    a new turn) start on the cached pages of what came before: their first events count
    those tokens, and every output is the no-cache engine's. A pool too small for all
    of them reuses the least recently used cached pages."""
    model = tiny_model(seed=13)
    turns = random_prompts(rng, [11, 9, 14])

    def conversation(**paging):
        """Each turn after the last one ends: (prompts, outputs, cached tokens, engine)."""
        engine = Engine(model, slots=2, max_length=56, token_budget=12, page_size=4, **paging)
        prompts, outputs, cached = [], [], []
        for turn in turns:
            prompts.append((prompts[-1] + outputs[-1] if prompts else []) + turn)
            request_id, events = engine.submit(Request(prompts[-1], 5)), []
            while not engine.idle:
                events += engine.step()
            outputs.append(engine.results[request_id])
            cached.append(events[0].cached_tokens)
        return prompts, outputs, cached, engine

    _, plain, none_cached, _ = conversation()
    prompts, outputs, cached, engine = conversation(prefix_cache=True)
    assert outputs == plain and none_cached == [0, 0, 0]
    # The cache holds what each turn wrote: its prompt and all but its last answer token
    # (11 + 4 tokens: 3 full pages; then 25 + 4: 7), so the next turn skips those.
    assert cached == [0, 12, 28]
    assert_same_greedy(model, prompts, outputs, 5)
    assert engine.pages_in_use == 0 and engine.cached_pages == 12  # turn 3's 44 + 4 tokens
    # 14 pages: an unrelated 40-token prompt reuses 9 of the 12 cached ones, oldest first.
    _, small, _, engine = conversation(prefix_cache=True, num_pages=14)
    other = Request(random_prompts(rng, [40])[0], 5)
    other_id = engine.submit(other)
    assert [engine.run()[other_id]] == generate(model, [other.prompt], max_new_tokens=5)
    assert small == plain and engine.pages_in_use == 0 and engine.cached_pages == 3 + 11


def test_prefix_grouping_admits_requests_by_shared_prefix_and_computes_it_once(rng):
    """BatchLLM grouping: with one slot and a pool that holds one sequence and a bit, the
    queue A1 B1 C1 A2 B2 C2 ... runs as A1 A2 A3 B1 ..., each group after its first
    starting on the cached prefix; two requests admitted together prefill their shared
    prefix once. Outputs are the no-cache engine's."""
    model = tiny_model(seed=15)
    prefixes = random_prompts(rng, [8, 8, 8])
    prompts = [prefixes[i % 3] + tail for i, tail in enumerate(random_prompts(rng, [3] * 9))]
    plain = generate(model, prompts, max_new_tokens=4)
    engine = Engine(model, slots=1, max_length=24, token_budget=12, page_size=4,
                    num_pages=6, prefix_cache=True)  # fmt: skip
    ids = [engine.submit(Request(p, 4)) for p in prompts]
    events = _run_events(engine)
    assert list(dict.fromkeys(e.request_id for e in events)) == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    cached = {e.request_id: e.cached_tokens for e in events if e.cached_tokens}
    assert cached == {i: 8 for i in (3, 6, 4, 7, 5, 8)}
    assert [engine.results[i] for i in ids] == plain
    # Two requests admitted together: the older prefills the shared 8 tokens, the other
    # starts on its pages in the same step's row (each layer writes before it reads).
    engine = Engine(model, slots=2, max_length=24, token_budget=34, page_size=4,
                    prefix_cache=True)  # fmt: skip
    for p in prompts[:4:3]:
        engine.submit(Request(p, 4))
    events = engine.step()
    assert [(e.request_id, e.cached_tokens) for e in events] == [(0, 0), (1, 8)]
    assert (engine.last_row["segment_ids"] > 0).sum() == 11 + 3
    assert [engine.run()[i] for i in (0, 1)] == [plain[0], plain[3]]


def _run_events(engine):
    """Every event of stepping the engine until idle."""
    events = []
    while not engine.idle:
        events += engine.step()
    return events


# ---- speculative decoding -------------------------------------------------------------


def test_ngram_speculation_keeps_greedy_outputs_and_accepts_drafts(rng):
    """Prompts that repeat themselves: prompt-lookup drafts are verified in blocks of the
    row (a paged cache with the prefix cache), each sequence keeps its own accepted
    count, and the tokens are plain greedy decoding's."""
    model = tiny_model(seed=14)
    prompts = [(p * 4)[: 4 * len(p)] for p in random_prompts(rng, [5, 7, 3, 6])]
    plain = generate(model, prompts, max_new_tokens=12, slots=3, token_budget=40)
    ngram = {"method": "ngram", "k": 4}

    def speculate(temperature):
        """(outputs, last event of each request, engine) of the paged, speculating engine."""
        engine = Engine(model, slots=3, max_length=48, token_budget=40, page_size=4,
                        prefix_cache=True, speculative=ngram)  # fmt: skip
        sampling = SamplingParams(temperature, seed=3)
        ids = [engine.submit(Request(p, 12, sampling)) for p in prompts]
        last = {}
        results = engine.run(lambda e: last.__setitem__(e.request_id, e))
        return [results[i] for i in ids], last, engine

    outputs, last, engine = speculate(0.0)
    assert outputs == plain
    assert engine.accepted_tokens > 0 and engine.drafted_tokens >= engine.accepted_tokens
    assert sum(e.accepted for e in last.values()) == engine.accepted_tokens
    # Fewer steps than tokens: accepted drafts arrive several a step.
    assert engine.steps < sum(map(len, plain))
    # Sampling runs through the same verification (its distribution: the next test).
    sampled, _, engine = speculate(0.9)
    assert [len(s) for s in sampled] == [12] * 4 and engine.drafted_tokens > 0
    # Rejected drafts' pages go back at once: after every step each running sequence
    # holds the pages of its entries in the cache, its prompt and tokens but the newest
    # (a budget that prefills every prompt in its first step).
    engine = Engine(model, slots=3, max_length=48, token_budget=80, page_size=4,
                    speculative=ngram)  # fmt: skip
    ids = {engine.submit(Request(p, 12, SamplingParams(0.9, seed=5))): p for p in prompts}
    generated, rejected = dict.fromkeys(ids, 0), 0
    while not engine.idle:
        drafted, accepted = engine.drafted_tokens, engine.accepted_tokens
        for event in engine.step():
            generated[event.request_id] = -1 if event.done else generated[event.request_id] + 1
        rejected += (engine.drafted_tokens - drafted) - (engine.accepted_tokens - accepted)
        running = [(len(ids[i]), n) for i, n in generated.items() if n > 0]
        assert engine.pages_in_use == sum(-(-(p + n - 1) // 4) for p, n in running)
    assert rejected > 0 and engine.pages_in_use == 0
    with pytest.raises(ValueError, match=r"^speculative: method='tree' with keys \['k', 'meth"):
        Engine(model, slots=2, max_length=16, token_budget=8,
               speculative={"method": "tree", "k": 2})  # fmt: skip
    lact = tiny_model(block_pattern=("attention", "lact"), lact=dict(chunk_size=4, window=4))
    with pytest.raises(ValueError, match=r"^speculative: the model's \['lact'\] layers"):
        Engine(lact, slots=2, max_length=16, token_budget=8, speculative=ngram)


def test_draft_model_speculation_keeps_greedy_outputs(rng):
    """A draft model proposes k tokens per sequence from its own cache: the target itself
    as draft has every draft accepted, a model of other weights few; both leave greedy
    decoding's tokens, with a shared prefix and requests outnumbering slots (a slot's new
    request feeds the draft model its whole prompt). Another vocabulary is refused."""
    model = tiny_model(seed=16)
    prefix, *prompts = random_prompts(rng, [5, 6, 9, 4, 7, 3])
    plain = generate(model, [prefix + p for p in prompts], max_new_tokens=9)
    for draft, all_accepted in ((model, True), (tiny_model(seed=17), False)):
        engine = Engine(model, slots=3, max_length=24, token_budget=40, shared_prefix=prefix,
                        speculative={"method": "draft", "k": 3, "draft": draft})  # fmt: skip
        ids = [engine.submit(Request(p, 9)) for p in prompts]
        assert [engine.run()[i] for i in ids] == plain
        assert engine.drafted_tokens > 0
        assert (engine.accepted_tokens == engine.drafted_tokens) == all_accepted
    other = tiny_model(vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match=r"^speculative draft: its vocab_size=62 differs"):
        Engine(model, slots=2, max_length=16, token_budget=8,
               speculative={"method": "draft", "draft": other})  # fmt: skip


def test_modes_load_the_draft_model_of_config_engine(tmp_path, smoke_config):
    """`--config.engine.speculative=draft` with `draft_checkpoint`: mode=generate and
    mode=serve get the Hugging Face checkpoint's model as the engine's draft (its
    parameters: tests/test_checkpoints.py checks load_hf's logits); without a checkpoint,
    or with a directory that is not one, a one-line error."""
    from lcx.checkpoints import save_hf
    from lcx.errors import UserError
    from lcx.modes.generate import engine_options

    draft = tiny_model(seed=18)
    smoke_config.engine.speculative = "draft"
    with pytest.raises(UserError, match=r"^engine.speculative='draft' needs engine.draft_"):
        engine_options(resolve(smoke_config))
    smoke_config.engine.draft_checkpoint = str(tmp_path)
    with pytest.raises(UserError, match=r"^engine.draft_checkpoint='.*' has no config.json"):
        engine_options(resolve(smoke_config))
    save_hf(draft, str(tmp_path))
    options = engine_options(resolve(smoke_config))
    loaded = options["speculative"]["draft"]
    assert options["speculative"]["k"] == smoke_config.engine.speculative_k
    assert loaded.cfg.vocab_size == VOCAB
    for (path, want), got in zip(
        jax.tree_util.tree_leaves_with_path(nnx.state(draft, nnx.Param)),
        jax.tree.leaves(nnx.state(loaded, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 3)])
def test_draft_verification_draws_from_the_target_distribution(temperature, top_k):
    """Accepting a certain draft with probability p(draft), else drawing from p without
    it, gives p itself: over 40,000 draws the emitted tokens' histogram is within 0.015
    total variation of the model's tempered, top-k distribution, for a likely draft and an
    unlikely one."""
    from lcx.generate.sampling import verify_drafts

    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]])
    scaled = np.asarray(logits[0]) / temperature
    allowed = np.argsort(-scaled)[: top_k or 6]
    p = np.zeros(6)
    p[allowed] = np.exp(scaled[allowed] - scaled[allowed].max())
    p /= p.sum()
    n = 40_000
    for draft in (0, 4):
        accept, residual, _ = jax.jit(verify_drafts)(
            jnp.repeat(logits, n, axis=0),
            jnp.full(n, draft),
            jnp.arange(n, dtype=jnp.uint32),
            jnp.full(n, 7),
            jnp.full(n, temperature, jnp.float32),
            jnp.full(n, top_k or 0),
            jnp.full(n, 2.0, jnp.float32),
        )
        emitted = np.where(np.asarray(accept), draft, np.asarray(residual))
        empirical = np.bincount(emitted, minlength=6) / n
        assert 0.5 * np.abs(empirical - p).sum() < 0.015


def test_every_serving_feature_at_once_keeps_the_plain_engines_tokens(rng, monkeypatch):
    """A pool too small for every slot (preemption by recomputation), the prefix cache,
    n-gram speculation, prompts that share a prefix and quote themselves, a stop id, and
    requests arriving while others run: the tokens are the plain engine's (one stretch
    per slot, no cache, no drafts), with first-come-first-served admission and with
    Past-Future's (its history trusted from the first finished request on, so it draws
    lengths from the survival estimate), and every page but the cached ones comes back.
    (A one-off random search, not kept, over 142 combinations of pool, page size,
    window, draft model and cancels found no difference; this one exercises all of them
    at once.)"""
    from lcx.generate import past_future

    model = tiny_model(seed=19)
    base, *tails = random_prompts(rng, [8, 5, 3, 6, 4, 7, 2, 5, 3])
    requests = [Request(base + t + t, 12) for t in tails]

    def serve(**features):
        """(outputs, cached prompt tokens, engine): three requests, then five more after
        three steps."""
        engine = Engine(model, slots=3, max_length=40, token_budget=15, **features)
        ids = [engine.submit(r) for r in requests[:3]]
        events = [e for _ in range(3) for e in engine.step()]
        ids += [engine.submit(r) for r in requests[3:]]
        results = engine.run(events.append)
        return [results[i] for i in ids], sum(e.cached_tokens for e in events), engine

    # The stop id: the first request's sixth token, so it ends by then.
    stop = serve()[0][0][5]
    requests = [dataclasses.replace(r, stop_ids=(stop,)) for r in requests]
    plain, _, _ = serve()
    assert len(plain[0]) <= 6
    every = dict(page_size=4, num_pages=11, prefix_cache=True,
                 speculative={"method": "ngram", "k": 3})  # fmt: skip
    outputs, cached, engine = serve(**every)
    assert outputs == plain
    assert engine.preemptions > 0 and engine.accepted_tokens > 0 and cached > 0
    assert engine.pages_in_use == 0
    monkeypatch.setattr(past_future, "HISTORY_MIN", 1)
    drawn = []
    original = past_future.sample_output_lengths
    monkeypatch.setattr(
        past_future, "sample_output_lengths", lambda *a: drawn.append(a) or original(*a)
    )
    outputs, _, engine = serve(**every, admission="past_future")
    assert outputs == plain and engine.pages_in_use == 0 and drawn


# ---- admission ------------------------------------------------------------------------


def test_past_future_admission_avoids_the_preemptions_fcfs_runs_into(rng):
    """A pool of 16 pages of 4 and requests that each grow to 7 pages: first come first
    served fills every slot and preempts; Past-Future admits only what its predicted peak
    (the requests' max_new_tokens: no stop id has ended any) fits, and preempts nothing.
    The outputs are the same; the SLA counter counts what met it."""
    model = tiny_model(seed=15)
    prompts = random_prompts(rng, [4, 3, 4, 2, 4, 3, 4, 4])

    def run(admission, sla):
        """(outputs, engine) of the whole batch."""
        engine = Engine(model, slots=4, max_length=32, token_budget=12, page_size=4,
                        num_pages=16, admission=admission, sla=sla)  # fmt: skip
        ids = [engine.submit(Request(p, 24)) for p in prompts]
        results = engine.run()
        return [results[i] for i in ids], engine

    fcfs, first_come = run("fcfs", None)
    past_future, predicted = run("past_future", (1e9, 1e9))
    assert past_future == fcfs
    assert first_come.preemptions > 0 and predicted.preemptions == 0
    assert first_come.goodput_requests == 0 and predicted.goodput_requests == len(prompts)
    with pytest.raises(ValueError, match=r"^admission='past_future' predicts page use"):
        Engine(model, slots=2, max_length=16, token_budget=8, admission="past_future")


def test_past_future_admission_predicts_from_history_once_enough_have_finished(rng, monkeypatch):
    """24 requests of up to 24 new tokens, each ended by a stop id near 2 to 24 tokens
    (its greedy output's first new token from there on): once `HISTORY_MIN` have
    finished, admission draws the running requests' lengths from the survival estimate
    of the ended ones, past what each has generated, many short of max_new_tokens; it
    preempts less than first come first served, and the outputs are the same."""
    from lcx.generate import past_future

    model = tiny_model(seed=16)
    prompts = random_prompts(rng, [2, 3, 4] * 8)
    requests = []
    for prompt, greedy, end in zip(prompts, generate(model, prompts, max_new_tokens=24),
                                   [2, 24, 5, 20, 9, 3, 16, 12] * 3, strict=True):  # fmt: skip
        n = next((n for n in range(end, 25) if greedy[n - 1] not in greedy[: n - 1]), None)
        requests.append(Request(prompt, 24, stop_ids=() if n is None else (greedy[n - 1],)))
    drawn = []  # (generated, max_new_tokens, the draws)
    original = past_future.sample_output_lengths
    monkeypatch.setattr(
        past_future, "sample_output_lengths",
        lambda *a: drawn.append((a[2], a[3], original(*a))) or drawn[-1][2],
    )  # fmt: skip

    def run(admission):
        engine = Engine(model, slots=4, max_length=32, token_budget=12, page_size=4,
                        num_pages=16, admission=admission)  # fmt: skip
        ids = [engine.submit(r) for r in requests]
        results = engine.run()
        return [results[i] for i in ids], engine

    fcfs, first_come = run("fcfs")
    assert not drawn
    predicted_outputs, predicted = run("past_future")
    assert predicted_outputs == fcfs and min(map(len, fcfs)) < 24
    assert any(generated > 0 for generated, *_ in drawn)  # running ones, past what they have
    assert any((draws < most).any() for _, most, draws in drawn)  # from the ended lengths
    assert predicted.preemptions < first_come.preemptions


def test_past_future_counts_requests_that_ran_to_their_cap_as_longer_outputs(rng):
    """Ten requests asking for one token each (as a classifier's would) finish first;
    they say only that an output runs at least one token. Requests of 24 tokens after
    them are predicted at their max_new_tokens, not at one token, and nothing is
    preempted; counted as outputs that ended at one token, the estimate would admit
    them as short (2 preemptions here)."""
    model = tiny_model(seed=18)
    engine = Engine(model, slots=4, max_length=32, token_budget=12, page_size=4,
                    num_pages=16, admission="past_future")  # fmt: skip
    for prompt in random_prompts(rng, [3] * 10):
        engine.submit(Request(prompt, 1))
    engine.run()
    ids = [engine.submit(Request(p, 24)) for p in random_prompts(rng, [4, 3, 4, 2, 4, 3])]
    results = engine.run()
    assert all(len(results[i]) == 24 for i in ids)
    assert engine.preemptions == 0


def test_predicted_peak_is_the_engines_peak_page_use(rng):
    """Four requests decoding towards known ends: from the first step all four run, the
    most pages the engine holds in a step is what admission predicts from their cache
    entries. Counting each sequence's last token, which is never written, would predict
    more."""
    from lcx.generate import past_future

    model = tiny_model(seed=17)
    ends = [6, 9, 3, 12]
    engine = Engine(model, slots=4, max_length=32, token_budget=16, page_size=4, num_pages=32)
    steps, run_step = [], engine._run

    def recording(*args, **kwargs):
        running = [(len(r.request.prompt), len(r.generated), r.request.max_new_tokens)
                   for r in engine._running if r is not None and r.generated]  # fmt: skip
        steps.append((engine.pages_in_use, running))
        return run_step(*args, **kwargs)

    engine._run = recording
    for prompt, n in zip(random_prompts(rng, [3, 5, 2, 4]), ends, strict=True):
        engine.submit(Request(prompt, n))
    engine.run()
    first = next(i for i, (_, running) in enumerate(steps) if len(running) == 4)
    now, end = np.array([past_future.cache_entries(*r) for r in steps[first][1]]).T
    held = max(pages for pages, _ in steps[first:])
    assert past_future.peak_pages(now[None], end[None], 4) == held
    assert past_future.peak_pages(now[None], end[None] + 1, 4) > held


def test_predicted_peak_waits_for_a_long_prompts_prefill(rng):
    """A request decoding towards 12 tokens, and a 20-token prompt arriving beside it, 4
    prompt tokens a step: the prompt's 3 outputs come after 4 more chunk steps, so it is
    still held when the other ends. Predicted with its prefill steps (`prefill_steps`),
    the peak is the engine's; taken as growing from admission, one page short."""
    from lcx.generate import past_future

    model = tiny_model(seed=17)
    engine = Engine(model, slots=2, max_length=48, token_budget=6, page_size=4, num_pages=32)
    steps, run_step = [], engine._run

    def recording(*args, **kwargs):
        running = sorted((r for r in engine._running if r), key=lambda r: r.request_id)
        steps.append((engine.pages_in_use, [
            (len(r.request.prompt), len(r.generated), r.request.max_new_tokens,
             len(r.context) - r.prefilled)
            for r in running
        ]))  # fmt: skip
        return run_step(*args, **kwargs)

    engine._run = recording
    decoding, long_prompt = random_prompts(rng, [3, 20])
    engine.submit(Request(decoding, 12))
    engine.step(), engine.step()
    engine.submit(Request(long_prompt, 3))
    engine.run()
    first = next(i for i, (_, running) in enumerate(steps) if len(running) == 2)
    now, end = np.array([past_future.cache_entries(*r[:3]) for r in steps[first][1]]).T
    start = past_future.prefill_steps([r[3] for r in steps[first][1]], 4)  # after this step
    assert start.tolist() == [0, 3]
    held = max(pages for pages, _ in steps[first:])
    assert past_future.peak_pages(now[None], end[None], 4, start) == held
    assert past_future.peak_pages(now[None], end[None], 4) == held - 1
