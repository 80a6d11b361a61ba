"""Serving: a continuous-batching engine over packed rows, prepacked prefill, shared prefixes.

`generate` for the simple case; `Engine` for request streams (see lcx.generate.engine).
"""

from lcx.generate.api import generate, longest_common_prefix
from lcx.generate.engine import Engine, Event, Request
from lcx.generate.sampling import SamplingParams, allowed_tokens, sample

__all__ = [
    "Engine",
    "Event",
    "Request",
    "SamplingParams",
    "allowed_tokens",
    "generate",
    "longest_common_prefix",
    "sample",
]
