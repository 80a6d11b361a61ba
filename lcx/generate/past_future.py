"""Past-Future admission's prediction: the peak page use of the running requests.

Past-Future (Gong et al., arXiv 2507.10150, ASPLOS 2025) admits a waiting request only
while the predicted peak KV memory of everything running, and of it, fits: each
request's final output length is drawn from the output lengths of recently finished
requests that ran longer than it has so far (the past), and the memory each request
holds is followed step by step until it ends (the future). Drawing several whole sets
of lengths and requiring the largest peak to fit, as the paper's LightLLM does, sits
between an aggressive scheduler (every request ends at the mean: preemptions) and a
conservative one (every request runs to its `max_new_tokens`, or to a high quantile,
at once: slots left empty while requests queue).

Three departures from LightLLM, each measured in BENCHMARKS.md ("Past-Future admission
from a survival estimate, on open-ended requests" and "Requests that set their own
max_new_tokens"): the output-length distribution is the Kaplan-Meier estimate, which
counts the running requests as outputs longer than they are so far (the finished ones
alone are the short ones, early in a trace), where LightLLM starts its window with
copies of the server's longest output; a request that ran to its `max_new_tokens`
counts the same way, as an output longer than that, not as one that ended there (a
client asking for 16 tokens says nothing about how long the next chat answer runs); and
each request's draws are fixed by its id, not drawn afresh at every admission attempt.

What it leaves out: a request grows one entry per step once its prompt is prefilled
(a prompt being prefilled counts whole from admission on, and its output starts after
the steps its chunks and those of older prompts take, `prefill_steps`; the prefix
cache can make them fewer). Accepted drafts grow a request faster, but at one rate
for all requests the peak is the same (the requests end in the same order, each holding
what it holds when another ends), so only rates that differ between requests move it;
drafts take pages only where they are free (`Engine._drafts`), never by preempting.
Queued preempted requests are not among the running ones the estimate counts.

numpy on the host: a few arrays of at most `HISTORY` + slots lengths per admission.
"""

from __future__ import annotations

import numpy as np

HISTORY = 200  # finished requests' output lengths kept (the paper's window)
HISTORY_MIN = 8  # fewer finished than this: each request runs to its max_new_tokens
SAMPLES = 5  # futures drawn per admission (LightLLM's); the largest peak must fit
SEED = 0  # of the futures' draws (never of a sampled token)


def survival(ended, censored) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, the fraction of requests whose output runs longer than each): the
    Kaplan-Meier estimate (Kaplan & Meier, JASA 1958) from the output lengths of requests
    a stop id `ended`, and the `censored` lengths, which only say an output runs longer
    than that (no stop id among its tokens so far): running requests' lengths so far, and
    finished requests' that ran to their max_new_tokens. A censored length c is at risk
    of ending at every length up to c + 1. Ended lengths alone under-predict: the short
    requests finish first, so early in a trace the history holds hardly any long one;
    and short caps would pass for short answers."""
    ended, censored = np.asarray(ended, dtype=np.int64), np.asarray(censored, dtype=np.int64)
    lengths, count = np.unique(ended, return_counts=True)
    at_risk = (ended[None, :] >= lengths[:, None]).sum(1)
    at_risk += (censored[None, :] + 1 >= lengths[:, None]).sum(1)
    return lengths, np.cumprod(1.0 - count / at_risk)


def uniforms(request_id: int) -> np.ndarray:
    """A request's SAMPLES uniform draws, the same at every admission: drawn afresh at
    each, a request waiting at the head of the queue would be admitted at the first
    step where all draws happen to be short, whatever the typical future."""
    return np.random.default_rng((SEED, request_id)).random(SAMPLES)


def sample_output_lengths(lengths, longer, generated: int, most: int, uniform):
    """Output lengths of a request that has `generated` tokens and may have `most`, one
    per `uniform` draw, from the survival estimate (`lengths`, `longer`) conditioned on
    running past `generated`: the inverse of its distribution at the draws, and `most`
    for the share that no finished request's length accounts for. Each is in
    [generated + 1, most]."""
    after = np.searchsorted(lengths, generated, side="right")
    alive = longer[after - 1] if after else 1.0  # the share still running at `generated`
    lengths, longer = lengths[after:], longer[after:]
    if not lengths.size:
        return np.full(len(uniform), most)
    # The first length where the share running on falls to the draw's.
    at = np.searchsorted(-longer, -np.asarray(uniform) * alive, side="left")
    draws = np.where(at < len(lengths), lengths[np.minimum(at, len(lengths) - 1)], most)
    return np.clip(draws, min(generated + 1, most), most)


def cache_entries(prompt: int, generated: int, outputs):
    """(cache entries a request has written, its entries at its last step) for `outputs`
    tokens in all: its prompt and every token but the newest (each step writes the token
    the last one sampled, and a sequence's last token is never written). One more each
    step: a queued request's prefill step is its first."""
    return prompt + generated - 1, prompt + np.asarray(outputs) - 1


def peak_pages(now, end, page_size: int, start=0) -> int:
    """The most pages requests holding `now` tokens and ending at `end` tokens hold at
    once, taking `end` at each of its rows as one possible future ([samples, requests]):
    a request holds ceil(tokens / page_size) pages, one token more each step from its
    `start` (the steps its prompt still takes to prefill: `prefill_steps`; it holds
    `now` until then) until it ends and frees them all, so the total peaks at the step
    some request ends, counting the requests that last at least as long."""
    now, end = np.atleast_2d(now), np.atleast_2d(end)
    start = np.broadcast_to(start, now.shape)
    finish = start + end - now  # the step at which each request ends
    lasting = finish[:, None, :] >= finish[:, :, None]  # [s, i, j]: j lasts until i ends
    grown = np.clip(finish[:, :, None] - start[:, None, :], 0, (end - now)[:, None, :])
    tokens = now[:, None, :] + grown
    pages = np.where(lasting, -(-tokens // page_size), 0).sum(axis=-1)
    return int(pages.max(initial=0))


def prefill_steps(remaining, per_step: int) -> np.ndarray:
    """The steps before each request's output starts to grow: requests whose prompts
    have `remaining` tokens left to prefill (0 for one decoding), in the order the
    engine prefills them (oldest first), `per_step` prompt tokens a step; a request's
    prefill ends in the step where everything before it and its own are done."""
    done_by = np.cumsum(remaining)
    return np.where(np.asarray(remaining) > 0, -(-done_by // per_step) - 1, 0)
