"""Waiting in tests: every test that waits for something waits here, on an event, with a deadline.

Deadlines are sized for a 2-core machine with a CPU hog beside the suite, where Ray's workers (lower priority)
get a small share of the CPU: generous, because they bound a failure, not a success. A wait that runs out says
what it waited for and the last value it saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call `check` until it returns something truthy and return that; raise AssertionError naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)
