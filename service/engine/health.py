"""The engine's failure streak: forwards (or steps) failed in a row; any success resets it."""

from __future__ import annotations

# Forwards failing this many times in a row make the engine unhealthy (readiness NOT_SERVING): one
# failure is a request's problem, a run of them is the server's.
MAX_CONSECUTIVE_FAILURES = 3


class FailureStreak:
    """Shared by the scheduler and its collaborators, which count their own forwards."""

    def __init__(self) -> None:
        self.count = 0

    def failed(self) -> None:
        self.count += 1

    def succeeded(self) -> None:
        self.count = 0

    @property
    def healthy(self) -> bool:
        return self.count < MAX_CONSECUTIVE_FAILURES
