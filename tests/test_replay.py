"""The simulated feed: even pacing against a real redis-server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from streamcast.keys import Keys
from streamcast.replay import replay

from .helpers import wait_for

# -- pacing: a feed, not bursts ----------------------------------------------------------------


def stream_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


async def test_a_paced_replay_sends_ticks_evenly_at_the_rate_asked(redis_client):
    """The demo's rate: 40 ticks/s over 8 symbols, 400 ticks (10 s). Each tick's stream id is
    its arrival in Redis (ms): no gap near a burst's 12.4 s, and 40 ticks/s within 2 %."""
    keys, names = Keys("pace"), [f"P{i}" for i in range(8)]
    paths = 100 + np.arange(8 * 50, dtype=float).reshape(8, 50)
    sent = await replay(redis_client, keys, paths, names, rate=40.0)
    assert sent == 400
    arrivals = [stream_ms(eid) for eid, _ in await redis_client.xrange(keys.ticks)]
    assert len(arrivals) == 400
    gaps = np.diff(arrivals)
    assert gaps.max() < 100, f"largest gap {gaps.max()} ms"
    achieved = (len(arrivals) - 1) / ((arrivals[-1] - arrivals[0]) / 1000)
    assert achieved == pytest.approx(40.0, rel=0.02)
    # interleaved as before: time step by time step, every symbol in turn
    first = [(f[b"symbol"], f[b"price"]) for _, f in await redis_client.xrange(keys.ticks, count=9)]
    assert [s for s, _ in first] == [n.encode() for n in names] + [b"P0"]
    assert [float(p) for _, p in first] == [100.0 + 50 * i for i in range(8)] + [101.0]


async def test_a_fast_paced_replay_sends_a_slice_at_a_time_not_a_chunk(redis_client):
    """At 300 ticks/s (the S&P CSV's replay in the README), ticks go out in slices of about
    10 ms, 3 ticks each, never a 500-tick chunk at once."""
    keys = Keys("fast")
    paths = np.linspace(100, 200, 600)[None, :]
    assert await replay(redis_client, keys, paths, ["SPX"], rate=300.0) == 600
    arrivals = np.array([stream_ms(eid) for eid, _ in await redis_client.xrange(keys.ticks)])
    per_ms = np.unique(arrivals, return_counts=True)[1]
    assert per_ms.max() <= 10, f"{per_ms.max()} ticks in one millisecond"
    achieved = (len(arrivals) - 1) / ((arrivals[-1] - arrivals[0]) / 1000)
    assert achieved == pytest.approx(300.0, rel=0.02)


async def test_a_looping_replay_continues_from_the_last_price_and_stops_within_a_slice(
    redis_client,
):
    keys, stop = Keys("loop"), asyncio.Event()
    paths = np.array([[10.0, 11.0, 12.0], [20.0, 18.0, 16.0]])
    task = asyncio.create_task(
        replay(redis_client, keys, paths, ["A", "B"], rate=200.0, loop=True, stop=stop)
    )
    await wait_for(lambda: _xlen_at_least(redis_client, keys, 12), timeout_s=10, what="two passes")
    stop.set()
    sent = await asyncio.wait_for(task, 1.0)  # a slice, not a chunk's worth of sleep
    prices = [float(f[b"price"]) for _, f in await redis_client.xrange(keys.ticks)]
    assert sent == len(prices) >= 12
    # the second pass starts where the first ended: A 12 * 10/10, B 16 * 20/20 ...
    assert prices[:12] == pytest.approx([10, 20, 11, 18, 12, 16, 12, 16, 13.2, 14.4, 14.4, 12.8])


async def _xlen_at_least(redis, keys: Keys, n: int) -> bool:
    return await redis.xlen(keys.ticks) >= n


async def test_an_unpaced_replay_sends_every_tick_in_chunks(redis_client):
    keys = Keys("fastest")
    paths = np.arange(1, 1201, dtype=float).reshape(2, 600)
    assert await replay(redis_client, keys, paths, ["X", "Y"], rate=None, chunk=500) == 1200
    assert await redis_client.xlen(keys.ticks) == 1200
