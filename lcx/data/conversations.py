"""Conversations from JSONL files, in the two forms people already have on disk.

One example a line, either the Hugging Face / OpenAI form
`{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}` or
`{"prompt": "...", "completion": "..."}` (read as one user turn and one assistant turn).
Blank lines are not examples. A line that is not one of the two forms is a one-line
error naming file:line, or, with `skip_bad_lines`, skipped and counted; a conversation
with no assistant turn, or an empty one, has nothing to learn from and is skipped and
counted. Every count reaches the run summary: nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from lcx.errors import UserError

ROLES = ("system", "user", "assistant")

# Reasons an example is skipped, the keys of `Conversations.skipped`.
BAD_LINE = "bad lines"
NO_ASSISTANT = "without an assistant turn"
EMPTY_ASSISTANT = "with an empty assistant turn"


@dataclasses.dataclass(frozen=True)
class Conversations:
    """The examples read (each a list of {role, content} messages), where each came
    from ("file:line") and how many were skipped, by reason."""

    examples: list[list[dict[str, str]]]
    sources: list[str]
    skipped: dict[str, int]


class _BadLine(ValueError):
    """What is wrong with one line (becomes a UserError naming file:line)."""


def _messages(example) -> list[dict[str, str]]:
    """The messages of one parsed line, or _BadLine saying what is wrong."""
    if not isinstance(example, dict):
        raise _BadLine(f"a JSON object is needed, not {type(example).__name__}")
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise _BadLine('"messages" must be a non-empty list of {"role", "content"} objects')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise _BadLine(f"messages[{i}] needs a role, one of {ROLES}")
            if not isinstance(m.get("content"), str):
                raise _BadLine(f"messages[{i}].content must be a string")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in example or "completion" in example:
        prompt, completion = example.get("prompt"), example.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise _BadLine('"prompt" and "completion" must both be strings')
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    raise _BadLine('an example needs "messages", or "prompt" and "completion"')


def read_conversations(paths: Sequence[str], *, skip_bad_lines: bool) -> Conversations:
    """Every conversation in the JSONL files `paths`, in file and line order."""
    examples, sources = [], []
    skipped = {BAD_LINE: 0, NO_ASSISTANT: 0, EMPTY_ASSISTANT: 0}
    for path in paths:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                try:
                    example = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise _BadLine(f"not JSON ({e})") from None
                messages = _messages(example)
            except _BadLine as e:
                if not skip_bad_lines:
                    raise UserError(
                        f"{path}:{number}: {e}; data.skip_bad_lines=True skips and counts such "
                        "lines"
                    ) from None
                skipped[BAD_LINE] += 1
                continue
            replies = [m["content"] for m in messages if m["role"] == "assistant"]
            if not replies:
                skipped[NO_ASSISTANT] += 1
            elif not all(r.strip() for r in replies):
                skipped[EMPTY_ASSISTANT] += 1
            else:
                examples.append(messages)
                sources.append(f"{path}:{number}")
    return Conversations(examples, sources, skipped)
