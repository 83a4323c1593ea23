"""The tests' one way to wait: for a condition (`eventually`), never for a guessed time.

A sleep that tries to prove something did *not* happen proves nothing on a loaded machine; wait
for the positive condition that rules it out instead (an idle engine, a completed scheduler pass),
or call the step directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(predicate: Callable[[], T], what: str | Callable[[], object] = "the condition",
               timeout_s: float = 30.0, interval_s: float = 0.05) -> T:
    """Call `predicate()` until it returns something truthy, and return that.

    Fails (AssertionError) after `timeout_s`, naming `what`: a string, or a callable that describes
    the state at the time of the failure. An exception from `predicate` fails at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"not reached within {timeout_s:g} s: {described}")
        time.sleep(interval_s)
