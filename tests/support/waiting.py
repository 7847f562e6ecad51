"""Wait on a condition with a deadline instead of sleeping a guessed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    *,
    interval: float = 0.01,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Call ``predicate`` until it returns a truthy value; return that value.

    Args:
        predicate: the condition (called at once, then every ``interval`` seconds).
        timeout: seconds before the test fails.
        interval: pause between calls.
        message: what the failure says (a callable is called then, to show the state).

    Raises:
        AssertionError: ``predicate`` stayed falsy for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"after {timeout:g} s: {text}")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Awaitable[T] | T],
    timeout: float = 10.0,
    *,
    interval: float = 0.01,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """:func:`wait_until` on an event loop: ``predicate`` may be a coroutine function.

    The loop keeps running between calls (``asyncio.sleep``), so tasks the condition
    waits on make progress.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"after {timeout:g} s: {text}")
        await asyncio.sleep(interval)
