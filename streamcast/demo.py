"""``streamcast demo``: the whole service on one machine with nothing installed but streamcast.

Without ``STREAMCAST_REDIS_URL`` it starts fakeredis's TCP server (so ``redis-cli`` and
``streamcast watch`` can connect to it), replays a synthetic multi-symbol feed into it, runs the
daemon and its HTTP endpoints, and prints live forecasts until Ctrl+C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import numpy as np

from streamcast.connect import make_redis
from streamcast.keys import Keys
from streamcast.replay import replay, symbol_names, synthetic_feed, watch
from streamcast.service import load_engine, serve
from streamcast.settings import ENV_PREFIX, load_settings

log = logging.getLogger(__name__)

# the demo's feed: the shipped model was trained on seed 0 of the same generator, so this is a
# feed it has never seen (tests/test_model.py scores it there)
FEED_SEED = 1
FEED_POINTS = 5000


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def embedded_redis(port: int = 0, host: str = "127.0.0.1") -> Iterator[str]:
    """fakeredis's TCP server on ``host:port`` in a thread; yields its URL."""
    from fakeredis import TcpFakeServer

    port = port or free_port(host)
    server = TcpFakeServer((host, port), server_type="redis")
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
    *, symbols: int = 8, rate: float = 40.0, port: int = 0, seconds: float | None = None
) -> int:
    with contextlib.ExitStack() as stack:
        if os.environ.get(f"{ENV_PREFIX}REDIS_URL"):
            settings = load_settings()
            print(f"demo: using redis at {settings.redis_url_redacted}")
        else:
            url = stack.enter_context(embedded_redis(port))
            # the embedded server has no Lua (the retrain lock's renewal): no timed retrain here
            settings = load_settings(redis_url=url, retrain_interval_s=0)
            port = urlsplit(url).port or 0
            print(
                f"demo: embedded redis at {url} (try: redis-cli -p {port} xlen {settings.key_prefix}:ticks)"
            )
        keys = Keys(settings.key_prefix)
        names = symbol_names("SYN", symbols)
        print(
            f"demo: live page http://{settings.http_host}:{settings.http_port}/ (and /metrics); "
            f"in another terminal: STREAMCAST_REDIS_URL={settings.redis_url_redacted} "
            f"streamcast watch {names[0]}"
        )
        print(
            "demo: loading and compiling the model (a few seconds), then forecasts stream below; Ctrl+C stops"
        )
        stop = asyncio.Event()
        feed = demo_feed(symbols)
        engine = await asyncio.get_running_loop().run_in_executor(None, load_engine, settings)
        redis = make_redis(settings.redis_url, settings.redis_timeout_s)
        try:
            service = asyncio.create_task(serve(settings, stop=stop, engine=engine))
            producer = asyncio.create_task(
                replay(redis, keys, feed, names, rate=rate, loop=True, stop=stop)
            )
            printer = asyncio.create_task(watch(redis, keys, names, out=sys.stdout, stop=stop))
            if seconds is not None:
                asyncio.get_running_loop().call_later(seconds, stop.set)
            status = await service
            stop.set()
            for task in (producer, printer):
                with contextlib.suppress(Exception):
                    await task
        finally:
            await redis.aclose()
        return status
