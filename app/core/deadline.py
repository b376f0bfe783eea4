"""A monotonic deadline shared by every step of one webhook turn."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Deadline:
    """The moment by which the whole turn must have answered.

    Steps ask `remaining()` for their own timeout instead of each having a fixed one, so a slow
    context fetch leaves less time for the LLM call rather than pushing the answer past the
    platform's own timeout.
    """

    expires_at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(0.0, self.expires_at - time.monotonic())

    def bound(self, seconds: float) -> float:
        """A step's timeout: its own limit, but never past the deadline."""
        return min(seconds, self.remaining())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0
