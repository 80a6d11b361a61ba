"""Generated tokens to text as it streams: whole UTF-8 characters only, stop strings.

The engine stops on token ids; clients stop on strings ("\\n\\n", "Question:"). A
`TextStream` decodes a request's tokens so far, holds back an unfinished UTF-8
character and any tail that could still grow into a stop string, and cuts the text
before the first stop string, which is what OpenAI's `stop` and lm-evaluation-harness's
`until` mean. Shared by the server (lcx.serve) and the harness (lcx.evals.harness).
"""

from __future__ import annotations

import codecs


class TextStream:
    """Generated tokens to text: whole UTF-8 characters only, held back while the tail
    could still become a stop string, cut before the first stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (whole characters)
        self.sent = 0  # characters of `text` already given out

    def add(self, token: int) -> tuple[str, bool]:
        """(the text that may be given out now, whether a stop string was found: then the
        text ends before it and nothing more follows)."""
        self.tokens.append(token)
        self.text = self._decoded(final=False)
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        return self._take(self._safe_end()), False

    def flush(self) -> str:
        """The rest of the text: the tail held back for stop strings, and bytes of an
        unfinished character as U+FFFD (as `bytes.decode(errors="replace")` has them)."""
        self.text = self._decoded(final=True)
        return self._take(len(self.text))

    def _decoded(self, *, final: bool) -> str:
        """The tokens' text; without `final`, an unfinished last character is left out."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        return decoder.decode(self.tokenizer.decode(self.tokens), final=final)

    def _safe_end(self) -> int:
        """Where the text may be given out up to: before a tail that starts a stop string."""
        for start in range(
            max(self.sent, len(self.text) - max(map(len, self.stops), default=0) + 1),
            len(self.text),
        ):
            tail = self.text[start:]
            if any(stop.startswith(tail) for stop in self.stops):
                return start
        return len(self.text)

    def _take(self, end: int) -> str:
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece
