"""Ending tasks for sure: a cancellation can be swallowed.

A cancellation that races a timeout inside a client call turns into a TimeoutError (asyncio's
``wait_for`` and ``timeout`` do that), which a retry loop then handles as an outage: the task goes
on. ``asyncio.wait_for(task, t)`` on Python 3.11 then waits for ever after its timeout, and a
process never stops. These helpers bound every wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


async def cancelled(tasks: Sequence[asyncio.Future[Any]], rounds: int = 20) -> None:
    """Wait for cancelled tasks to end, cancelling again (every 0.5 s, ``rounds`` times) those
    that did not."""
    pending: set[asyncio.Future[Any]] = {t for t in tasks if not t.done()}
    for _ in range(rounds):
        if not pending:
            break
        _, pending = await asyncio.wait(pending, timeout=0.5)
        for task in pending:
            task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a task that failed was logged where it failed
    if pending:
        log.error("tasks that would not stop: %s", ", ".join(_name(t) for t in pending))


async def within(awaitable: Awaitable[T], timeout_s: float) -> T | None:
    """The result of ``awaitable`` if it ends within ``timeout_s``, else None after cancelling it
    (bounded even when it swallows the cancellation). Its exception, if it raised, is raised."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        return task.result()
    task.cancel()
    await cancelled([task], rounds=4)
    return None


async def settled(*awaitables: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather`` of ``awaitables``, except that when one raises, the others still run to
    their end before its error is raised: none is left running unseen (a publish that lands after
    the consume loop moved on to its outage handling, an error never retrieved). One awaitable is
    awaited as it is (a publish on one server, every batch: no task around it)."""
    if len(awaitables) == 1:
        return [await awaitables[0]]
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
