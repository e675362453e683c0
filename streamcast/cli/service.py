"""The service's commands: ``serve``, ``replay``, ``watch``, ``demo`` and ``check``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamcast.cli.common import (
    LOG_FORMAT,
    UserError,
    _positive_int,
    _quiet_tensorflow,
    _settings,
    _with_redis,
)

if TYPE_CHECKING:
    from streamcast.replay import LogTail

# -- the streaming service ---------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="the daemon: ticks from Redis in, forecasts out (settings from STREAMCAST_* / .env)",
        description="Reads STREAMCAST_REDIS_URL, STREAMCAST_KEY_PREFIX, STREAMCAST_MODEL_PATH, "
        "STREAMCAST_HTTP_HOST/PORT, STREAMCAST_SHARD_INDEX/COUNT, STREAMCAST_BATCH_MAX_SIZE, "
        "STREAMCAST_BATCH_MAX_WAIT_MS, STREAMCAST_PATH_REFRESH_S and more (see the README).",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    settings = _settings()
    _quiet_tensorflow()
    from streamcast.service import serve

    return asyncio.run(serve(settings))


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="publish a CSV (or the synthetic series) as ticks, as a simulated live feed",
    )
    p.add_argument("file", nargs="?", type=Path, help="CSV file (default: synthetic series)")
    p.add_argument("--column")
    p.add_argument("--symbol", default=None, help="symbol name (default: the file name, or SYN)")
    p.add_argument(
        "--symbols", type=_positive_int, default=1, help="fan out to N symbols with distinct paths"
    )
    p.add_argument("--points", type=_positive_int, default=5000, help="points per synthetic series")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--rate",
        type=float,
        default=100.0,
        metavar="TICKS_PER_S",
        help="sent evenly, each tick at its own time (default: 100)",
    )
    pace.add_argument("--as-fast-as-possible", action="store_true")
    p.add_argument("--loop", action="store_true", help="start over at the end, until Ctrl+C")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_replay)


def feed_from_args(args: argparse.Namespace) -> tuple[Any, list[str]]:
    from streamcast.data import load_series
    from streamcast.replay import fan_out, symbol_names, synthetic_feed

    if args.file is not None:
        series = load_series(args.file, args.column)
        paths = fan_out(series, args.symbols, seed=args.seed)
        base = args.symbol or args.file.stem.upper()
    else:
        paths = synthetic_feed(args.symbols, args.points, seed=args.seed)
        base = args.symbol or "SYN"
    from streamcast.wire import SYMBOL_RE

    names = symbol_names(base, args.symbols)
    if not all(SYMBOL_RE.fullmatch(n) for n in names):
        raise UserError(f"symbol {base!r} must be 1-64 of A-Z a-z 0-9 . _ : - (use --symbol)")
    return paths, names


def _replay(args: argparse.Namespace) -> int:
    from streamcast.replay import Progress, replay

    if args.rate is not None and args.rate <= 0 and not args.as_fast_as_possible:
        raise UserError(f"--rate must be > 0, got {args.rate}")
    settings = _settings()
    keys = settings.keys
    paths, names = feed_from_args(args)

    async def run(redis: Any) -> int:
        await _check_partitions(redis, keys)
        progress = Progress(None if args.loop else paths.size)
        sent = await replay(
            redis,
            keys,
            paths,
            names,
            rate=None if args.as_fast_as_possible else args.rate,
            loop=args.loop,
            progress=progress,
        )
        progress.close()
        return sent

    sent = _with_redis(settings, run)
    streams = _ticks_streams(keys, names)
    print(f"replayed {sent} ticks for {len(names)} symbol(s) to {streams}")
    return 0


def _ticks_streams(keys: Any, names: Sequence[str]) -> str:
    """The partition streams ``names``' ticks go to, for a message."""
    streams = [keys.ticks(p) for p in sorted({keys.partition(n) for n in names})]
    if len(streams) == 1:
        return streams[0]
    shown = ", ".join(streams[:4]) + (", ..." if len(streams) > 4 else "")
    return f"{len(streams)} of {keys.partitions} partition streams ({shown})"


async def _check_partitions(redis: Any, keys: Any) -> None:
    """Refuse a partition count other than the deployment's (its daemon wrote it in the meta
    hash): ticks would go to, and forecasts be looked for in, streams the daemon does not use."""
    from streamcast.client import deployed_partitions

    deployed = await deployed_partitions(redis, keys.prefix)
    if deployed is not None and deployed != keys.partitions:
        raise UserError(
            f"STREAMCAST_PARTITIONS is {keys.partitions}, but the deployment on this Redis has "
            f"{deployed} partitions ({keys.meta}): set STREAMCAST_PARTITIONS={deployed}"
        )


def _add_watch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "watch", help="print each forecast and path of the given symbols as it arrives"
    )
    p.add_argument("symbols", nargs="+", metavar="SYMBOL")
    p.add_argument(
        "--from-start", action="store_true", help="print the stored forecasts and paths first"
    )
    p.add_argument(
        "--count",
        "--limit",
        dest="count",
        type=_positive_int,
        metavar="N",
        help="exit after N forecasts (the paths between them are not counted)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='a JSON object per forecast or path per line ("kind": "forecast" or "path", then '
        "the entry's fields), flushed",
    )
    p.set_defaults(func=_watch)


def _watch(args: argparse.Namespace) -> int:
    from streamcast.replay import watch
    from streamcast.wire import SYMBOL_RE

    bad = [s for s in args.symbols if not SYMBOL_RE.fullmatch(s)]
    if bad:
        raise UserError(f"symbol {bad[0]!r} is not 1-64 of A-Z a-z 0-9 . _ : -")
    settings = _settings()
    keys = settings.keys

    async def run(redis: Any) -> int:
        await _check_partitions(redis, keys)
        return await watch(
            redis,
            keys,
            args.symbols,
            limit=args.count,
            start="0" if args.from_start else "$",
            as_json=args.json,
            # the lag in the table's header: the daemon's group, summed over the partitions
            group=keys.group,
        )

    _with_redis(settings, run)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="everything at once, no server needed: embedded Redis, a synthetic feed, the daemon",
        description="Starts an embedded Redis (unless STREAMCAST_REDIS_URL is set), replays a "
        "synthetic multi-symbol feed, runs the daemon and its HTTP endpoints, and prints live "
        "forecasts until Ctrl+C.",
    )
    p.add_argument("--symbols", type=_positive_int, default=8)
    p.add_argument("--rate", type=float, default=40.0, metavar="TICKS_PER_S")
    p.add_argument("--port", type=int, default=0, help="embedded Redis port (default: a free one)")
    p.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl+C)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from streamcast.demo import run_demo

    _quiet_tensorflow()
    # a live table on a terminal; with -v, everything as lines (debug logging is the point)
    table = sys.stdout.isatty() and not args.verbose
    with _logs_under_table(table and sys.stderr.isatty()) as tail:
        demo = run_demo(
            symbols=args.symbols,
            rate=args.rate,
            port=args.port,
            seconds=args.seconds,
            table=table,
            notes=lambda: list(tail.lines) if tail is not None else [],
        )
        return asyncio.run(demo)


@contextlib.contextmanager
def _logs_under_table(active: bool) -> Iterator[LogTail | None]:
    """While the live table is on the terminal, log lines go under it (the newest few), not
    across it: lines written below a table redrawn in place would be wiped at the next frame.
    Errors are written out whole (tracebacks too) once the table is done."""
    if not active:
        yield None
        return
    from streamcast.replay import LogTail

    root = logging.getLogger()
    kept = root.handlers[:]
    tail = LogTail()
    tail.setFormatter(logging.Formatter(LOG_FORMAT))
    root.handlers = [tail]
    try:
        yield tail
    finally:
        root.handlers = kept
        for message in tail.errors:
            print(message, file=sys.stderr)


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="exit 0 if the local daemon answers /healthz (or /readyz with --ready): for probes",
        description="For container health checks: GET http://127.0.0.1:STREAMCAST_HTTP_PORT/healthz "
        "(or /readyz), exit 0 on 200 and 1 otherwise with one line saying why.",
    )
    p.add_argument("--ready", action="store_true", help="check /readyz (Redis reachable, serving)")
    p.add_argument("--url", help="base URL (default: http://127.0.0.1:STREAMCAST_HTTP_PORT)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    settings = _settings()
    host = settings.http_host if settings.http_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    base = args.url or f"http://{host}:{settings.http_port}"
    url = base.rstrip("/") + ("/readyz" if args.ready else "/healthz")
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            print(f"ok: {url} answered {response.status}")
            return 0
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")[:300]
        print(f"not ok: {url} answered {exc.code}: {body}", file=sys.stderr)
    except urllib.error.URLError as exc:
        print(f"not ok: {url}: {exc.reason}", file=sys.stderr)
    except OSError as exc:
        print(f"not ok: {url}: {exc}", file=sys.stderr)
    return 1
