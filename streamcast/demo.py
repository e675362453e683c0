"""``streamcast demo``: the whole service on one machine with nothing installed but streamcast.

Without ``STREAMCAST_REDIS_URL`` it starts fakeredis's TCP server (so ``redis-cli`` and
``streamcast watch`` can connect to it), replays a synthetic multi-symbol feed into it, runs the
daemon and its HTTP endpoints, and shows live forecasts and paths until Ctrl+C (``watch``, which
follows each symbol's paths stream too): a table redrawn in place on a terminal, each row with its
symbol's newest path, a line per forecast and per path otherwise.

It stops in order, each step bounded: the service drains and stops; the feed and the watch end
(cancelled, again if need be, when they do not); their client closes; the embedded server stops
last, once no client of this process is left on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np

from streamcast.connect import make_redis
from streamcast.engine import Engine
from streamcast.replay import replay, symbol_names, synthetic_feed, watch
from streamcast.service import load_engine, serve
from streamcast.settings import ENV_PREFIX, Settings, load_settings
from streamcast.tasks import cancelled

log = logging.getLogger(__name__)

# the demo's feed: the shipped model was trained on seed 0 of the same generator, so this is a
# feed it has never seen (tests/test_model.py scores it there)
FEED_SEED = 1
FEED_POINTS = 5000
# the feed and the watch look at their stop event every slice or read (well under a second)
PARTS_GRACE_S = 5.0


# free_port hands out ports from the PORTS_SPAN below the kernel's ephemeral range, where
# bind(port 0) never lands: a port handed out here, not yet bound, cannot be taken by a server
# binding port 0 meanwhile (the embedded Redis does), and none is handed out twice by one process
PORTS_SPAN = 12_000
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(part) for part in f.read().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def free_port(host: str = "127.0.0.1", below: int | None = None) -> int:
    """A TCP port on ``host`` that nothing listens on, for a server to be started later (a
    test's, a benchmark's): one of the :data:`PORTS_SPAN` ports below ``below`` (default, and at
    most: the kernel's ephemeral range), not one this process handed out before. The OS's own
    pick (port 0) only where no such port is free (an ephemeral range that starts near 1024)."""
    top = ephemeral_range()[0]
    if below is not None:
        top = min(top, below)
    candidates = range(max(1024, top - PORTS_SPAN), top)
    for port in random.sample(candidates, min(len(candidates), 200)):
        if claim_port(port, host):
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def claim_port(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``port`` and this process has not handed it out before;
    then it is handed out (:func:`free_port` will not give it)."""
    with _handed_out_lock:
        if port in _handed_out:
            return False
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
        _handed_out.add(port)
        return True


@contextlib.contextmanager
def embedded_redis(port: int = 0, host: str = "127.0.0.1") -> Iterator[str]:
    """fakeredis's TCP server on ``host:port`` (a port the OS picks when 0) in a thread; yields
    its URL."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer((host, port), server_type="redis")
    port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, name="embedded-redis", daemon=True)
    thread.start()
    try:
        yield f"redis://{host}:{port}/0"
    finally:
        server.shutdown()
        server.server_close()


def demo_feed(symbols: int) -> np.ndarray:
    """The demo's synthetic prices, (symbols, FEED_POINTS)."""
    return synthetic_feed(symbols, FEED_POINTS, seed=FEED_SEED)


async def run_demo(
    *,
    symbols: int = 8,
    rate: float = 40.0,
    port: int = 0,
    seconds: float | None = None,
    table: bool | None = None,
    notes: Callable[[], Sequence[str]] = tuple,
) -> int:
    """Run the demo until a signal (or ``seconds``); return the service's exit status.

    Args:
        table: a live table redrawn in place (default: when stdout is a terminal), else a line
            per forecast and per path.
        notes: the lines to show under the table (the command line passes the newest log lines).
    """
    with contextlib.ExitStack() as stack:
        names = symbol_names("SYN", symbols)
        settings, banner = _settings(stack, port, names[0])
        banner.append(
            f"demo: live page http://{settings.http_host}:{settings.http_port}/ (and /metrics); "
            f"in another terminal: STREAMCAST_REDIS_URL={settings.redis_url_redacted} "
            f"streamcast watch {names[0]}"
        )
        for line in banner:
            print(line)
        print("demo: loading and compiling the model (a few seconds); Ctrl+C stops")
        sys.stdout.flush()
        engine = await asyncio.get_running_loop().run_in_executor(None, load_engine, settings)
        show = sys.stdout.isatty() if table is None else table
        title = [*banner, "demo: Ctrl+C stops"]
        return await _run(
            settings,
            engine,
            names,
            rate=rate,
            seconds=seconds,
            table=show,
            title=title,
            notes=notes,
        )


def _settings(stack: contextlib.ExitStack, port: int, symbol: str) -> tuple[Settings, list[str]]:
    """The demo's settings (an embedded Redis unless STREAMCAST_REDIS_URL is set) and the
    lines that say where things are (``symbol``'s ticks stream, to look at)."""
    if os.environ.get(f"{ENV_PREFIX}REDIS_URL"):
        settings = load_settings()
        return settings, [f"demo: using redis at {settings.redis_url_redacted}"]
    url = stack.enter_context(embedded_redis(port))
    # the embedded server has no Lua (the retrain lock's renewal): no timed retrain here
    settings = load_settings(redis_url=url, retrain_interval_s=0)
    port = urlsplit(url).port or 0
    # quoted: the partition's hash tag has braces
    ticks = settings.keys.ticks_for(symbol)
    return settings, [f"demo: embedded redis at {url} (try: redis-cli -p {port} xlen '{ticks}')"]


async def _run(
    settings: Settings,
    engine: Engine,
    names: Sequence[str],
    *,
    rate: float,
    seconds: float | None,
    table: bool,
    title: Sequence[str],
    notes: Callable[[], Sequence[str]],
) -> int:
    """The service, the feed and the watch, until the service stops; then the feed and the
    watch, then their client: whatever way this ends (a signal, ``seconds``, an error, a
    cancellation), nothing of this process is left talking to the embedded server."""
    keys = settings.keys
    stop = asyncio.Event()  # the service's: a signal, or ``seconds``
    shown = asyncio.Event()  # the watch's: set once the service is done, for a last frame
    redis = make_redis(settings.redis_url, settings.redis_timeout_s, cluster=settings.redis_cluster)
    loop = asyncio.get_running_loop()
    timer = loop.call_later(seconds, stop.set) if seconds is not None else None
    feed = replay(redis, keys, demo_feed(len(names)), names, rate=rate, loop=True, stop=stop)
    # the header's lag: the daemon's group, summed over the partition streams
    shows = watch(
        redis, keys, names, stop=shown, table=table, group=keys.group, title=title, notes=notes
    )
    parts = [asyncio.create_task(feed, name="replay"), asyncio.create_task(shows, name="watch")]
    try:
        return await serve(settings, stop=stop, engine=engine)
    finally:
        if timer is not None:
            timer.cancel()
        stop.set()
        shown.set()
        await _ended(parts, PARTS_GRACE_S)
        await redis.aclose()


async def _ended(tasks: Sequence[asyncio.Task[int]], grace_s: float) -> None:
    """Wait ``grace_s`` for ``tasks`` to end by themselves, then cancel them until they do
    (``tasks.cancelled``: a cancellation swallowed inside redis-py is repeated, boundedly)."""
    _, pending = await asyncio.wait(tasks, timeout=grace_s)
    for task in pending:
        task.cancel()
    await cancelled(list(pending))
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("demo: the %s task failed: %r", task.get_name(), task.exception())
