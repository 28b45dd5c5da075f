"""Bounded waits for the tests: a condition polled until it holds or a bound passes.

Nothing is timed: a bound only keeps a failing test from hanging.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: Seconds a test waits for what must happen before calling it lost.
BOUND = 15.0


def until(condition: Callable[[], Any], bound: float = BOUND, step: float = 0.01) -> bool:
    """Whether ``condition()`` holds within ``bound`` seconds (checked every ``step``)."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True
