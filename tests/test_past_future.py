"""Past-Future admission's prediction (`lcx.generate.past_future`) against plain
step-by-step counting and the distribution it draws from."""

from __future__ import annotations

import numpy as np

from lcx.generate.past_future import (
    peak_pages,
    prefill_steps,
    sample_output_lengths,
    survival,
    uniforms,
)


def _peak_by_stepping(now, end, page_size, start) -> int:
    """The most pages held at any step, each request holding `now` tokens until its
    `start`, then growing a token a step, and holding its pages through the step it
    reaches `end`."""
    peak = 0
    for step in range(int((start + end - now).max()) + 1):
        tokens = now + np.clip(step - start, 0, None)
        peak = max(peak, int((-(-np.where(tokens <= end, tokens, 0) // page_size)).sum()))
    return peak


def test_peak_pages_equals_stepping_through_each_future(rng):
    for case in range(100):
        samples, requests = rng.integers(1, 4), rng.integers(1, 9)
        now = rng.integers(1, 60, (samples, requests))
        end = now + rng.integers(0, 80, (samples, requests))
        page_size = int(rng.choice([1, 4, 16]))
        start = rng.integers(0, 30, requests) * (case % 2)  # half the cases: no prefill left
        stepped = max(
            _peak_by_stepping(n, e, page_size, start) for n, e in zip(now, end, strict=True)
        )
        assert peak_pages(now, end, page_size, start) == stepped


def test_a_prefilling_request_ends_after_its_prefill():
    # One token a page. A decoding request at 10 tokens ends at 20; a prompt of 30 still
    # prefilling for 9 steps then writes 2 more. Both are held when the first ends (20 +
    # 31 = 51); taken as growing from now on, the prompt would end first (32 + 12 = 44).
    now, end = np.array([[10, 30]]), np.array([[20, 32]])
    assert peak_pages(now, end, 1, start=np.array([0, 9])) == 51
    assert peak_pages(now, end, 1) == 44
    # Prompts left to prefill, oldest first, 112 tokens a step: one decoding, then 100
    # (done in the next step), 50 (in the step after, behind the 100), 300 (the 5th).
    np.testing.assert_array_equal(prefill_steps([0, 100, 50, 0, 300], 112), [0, 0, 1, 0, 4])


def test_survival_counts_running_requests_as_longer_outputs():
    """Finished at 10, 20, 20, 30 and two running at 15 and 40: of the six, one ends at 10
    (5 of 6 run longer); two of the four still running at 20 end there; the one at 30
    ends with two at risk. Finished lengths alone would say every output ends by 30."""
    lengths, longer = survival([10, 20, 20, 30], [15, 40])
    np.testing.assert_array_equal(lengths, [10, 20, 30])
    np.testing.assert_allclose(longer, [5 / 6, 5 / 6 * 2 / 4, 5 / 6 * 2 / 4 * 1 / 2])


def test_output_lengths_follow_the_estimate_past_what_was_generated(rng):
    """Draws for a request at 12 of at most 50, from the estimate above: half at 20 and a
    quarter at 30 (the survival's steps over its 5/6 left at 12), the last quarter at its
    max, since no finished length accounts for it; a request past every finished length runs to its
    max; max_new_tokens caps the history's lengths; a request's draws are the same at
    every admission."""
    lengths, longer = survival([10, 20, 20, 30], [15, 40])
    draws = sample_output_lengths(lengths, longer, 12, 50, rng.random(40_000))
    share = {value: np.mean(draws == value) for value in (20, 30, 50)}
    assert set(np.unique(draws)) == {20, 30, 50}
    np.testing.assert_allclose([share[20], share[30], share[50]], [0.5, 0.25, 0.25], atol=0.01)
    assert (sample_output_lengths(lengths, longer, 35, 50, rng.random(100)) == 50).all()
    assert (sample_output_lengths(lengths, longer, 0, 25, rng.random(100)) <= 25).all()
    assert sample_output_lengths(lengths, longer, 0, 25, rng.random(100)).min() == 10
    np.testing.assert_array_equal(uniforms(7), uniforms(7))
    assert not np.array_equal(uniforms(7), uniforms(8))


def test_capped_outputs_count_as_longer_than_their_length(rng):
    """Outputs that ran to their max_new_tokens of 4 are censored, as running ones are:
    with no output ended by a stop id, a request's draws run to its own max; counted as
    ended, they would say every output stops at 4."""
    lengths, longer = survival([], [4] * 10)
    assert lengths.size == 0
    assert (sample_output_lengths(lengths, longer, 0, 30, rng.random(100)) == 30).all()
    lengths, longer = survival([4] * 10, [])
    assert (sample_output_lengths(lengths, longer, 0, 30, rng.random(100)) == 4).all()
    # A stop id's ends beside the caps: of 4 at risk at 6 (2 capped at 4 are not), one
    # ends there.
    lengths, longer = survival([6, 9, 9], [4, 4, 12])
    np.testing.assert_allclose(longer, [3 / 4, 3 / 4 * 1 / 3])
    # An output censored at 4 runs on past it: at risk of ending at 4 and at 5 (2 of 3
    # at risk there run on), not at 6.
    lengths, longer = survival([4, 5, 6], [4])
    np.testing.assert_allclose(longer, [3 / 4, 3 / 4 * 2 / 3, 0])
