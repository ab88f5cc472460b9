"""Scrubbing (pure): remove the exact value of an injected key from a streamed body.

A key split across two chunks is still caught: only the few bytes at a chunk's end that
could start the key are held back, so a Server-Sent Event that cannot contain the key is
never delayed.
"""

from __future__ import annotations

from gateway.inject import REDACTED_BYTES as REDACTED
from gateway.inject import key_forms


class Scrubber:
    def __init__(self, secret: str, forms: tuple[str, ...] | None = None) -> None:
        # Every form the key was sent in (raw, percent-encoded, basic-auth base64); callers
        # on the hot path pass the forms they already have.
        self._needles = tuple(form.encode() for form in forms or key_forms(secret))
        self._carry = b""

    def _held(self, data: bytes) -> int:
        """How many trailing bytes of `data` could be the start of a needle."""
        best = 0
        for needle in self._needles:
            window = min(len(needle) - 1, len(data))
            start = len(data) - window
            first = needle[:1]
            i = data.find(first, start)
            while i != -1:
                if needle.startswith(data[i:]):
                    best = max(best, len(data) - i)
                    break
                i = data.find(first, i + 1)
        return best

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk
        for needle in self._needles:
            if needle in data:
                data = data.replace(needle, REDACTED)
        held = self._held(data)
        self._carry = data[len(data) - held :] if held else b""
        return data[: len(data) - held] if held else data

    def flush(self) -> bytes:
        rest, self._carry = self._carry, b""
        return rest
