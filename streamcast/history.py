"""The history store: one capped Redis stream of accepted prices per symbol.

A symbol's history (``keys.history``) and the set naming the symbols with history
(``keys.symbols(p)``) lie in the symbol's partition (``keys.partition``), under its hash tag, so
each command here touches one slot and works on a Redis Cluster as on one server.

The daemon appends every accepted tick (entry id = tick id) in the same transaction as its
forecast. ``import_series`` loads a file's worth of older prices into an empty history, and
``read_series`` reads the newest part back for training: pages of ``page`` entries per round trip,
at most ``max_points`` per symbol, so memory is bounded by ``symbols x max_points`` floats.

Prices go in by the live edge's rules (:func:`streamcast.wire.parse_price`): ``load_prices``
reads a file's text with them and ``import_series`` checks the values again. What comes back out
is checked once more by whoever trains on it (``clean_series``): a history written by other
means, or by an older version, must not fail a retrain.

The retrain reads in its trainer child, never on the daemon's event loop: the daemon hands it a
:class:`HistorySource` (the URL, password included, in a private file), and the child opens a
client of its own.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlencode

import numpy as np
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

from streamcast.connect import is_cluster, make_redis
from streamcast.data import DataError, is_number, read_rows
from streamcast.keys import Keys
from streamcast.wire import (
    DEFAULT_LIMITS,
    SYMBOL_RE,
    TickError,
    TickLimits,
    check_price,
    parse_price,
    text,
)

log = logging.getLogger(__name__)

PAGE = 10_000


class HistoryError(ValueError):
    """A history import or read that cannot go ahead; the text says why."""


async def symbols(redis: Redis, keys: Keys) -> list[str]:
    """Every symbol that has history, sorted: the union of every partition's symbols set.

    One SMEMBERS per partition in one pipeline, not SUNION: the sets lie in different slots,
    and on a cluster the (non-transactional) pipeline is split by node.
    """
    pipe = redis.pipeline(transaction=False)
    for partition in range(keys.partitions):
        pipe.smembers(keys.symbols(partition))
    members: list[Any] = await pipe.execute()
    return sorted({text(m) for found in members for m in found})


async def read_series(
    redis: Redis, keys: Keys, symbol: str, max_points: int, page: int = PAGE
) -> np.ndarray:
    """The newest ``max_points`` prices of ``symbol``, oldest first, in pages (XREVRANGE)."""
    if max_points < 1:
        raise HistoryError(f"max_points must be at least 1, got {max_points}")
    key = keys.history(symbol)
    chunks: list[np.ndarray] = []
    got = 0
    upper = "+"
    while got < max_points:
        entries: Any = await redis.xrevrange(
            key, max=upper, min="-", count=min(page, max_points - got)
        )
        if not entries:
            break
        prices = np.fromiter((_price(f) for _, f in entries), np.float64, len(entries))
        chunks.append(prices)
        got += len(entries)
        upper = "(" + text(entries[-1][0])
        if len(entries) < page:
            break
    if not chunks:
        return np.empty(0)
    return np.concatenate(chunks)[::-1].copy()


def _price(fields: Any) -> float:
    """An entry's price, NaN when it is missing or not a number (left to ``clean_series``)."""
    raw = fields.get(b"price", fields.get("price"))
    try:
        return float(raw)
    except (TypeError, ValueError):
        return float("nan")


def valid_prices(
    prices: np.ndarray, *, positive: bool | None = None, limits: TickLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """A mask of the prices :func:`streamcast.wire.check_price` accepts (vectorised)."""
    prices = np.asarray(prices, dtype=np.float64)
    positive = limits.positive if positive is None else positive
    low = limits.price_min if positive else -limits.price_max
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(prices) & (prices >= low) & (prices <= limits.price_max)
        if positive:
            ok &= prices > 0
    return ok


def clean_series(
    prices: np.ndarray, *, positive: bool | None = None, limits: TickLimits = DEFAULT_LIMITS
) -> tuple[np.ndarray, Counter[str]]:
    """The prices that pass the live edge's rules, in order, and the others counted by reason."""
    prices = np.asarray(prices, dtype=np.float64)
    ok = valid_prices(prices, positive=positive, limits=limits)
    reasons: Counter[str] = Counter()
    for value in prices[~ok]:
        try:
            check_price(float(value), positive=positive, limits=limits)
        except TickError as exc:
            reasons[exc.reason] += 1
    return prices[ok], reasons


def load_prices(
    path: str | Path,
    column: str | None = None,
    *,
    positive: bool | None = None,
    limits: TickLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """A price file for import, every value checked as the live edge checks a tick's price.

    The file is a bare column of prices (optionally under a one-word header) or a headed CSV
    where ``column`` (default ``Close``) is the price. The first price that breaks the rules
    refuses the whole file, naming the file, the line and the problem.
    """
    path = Path(path)
    try:
        rows = read_rows(path)
    except DataError as exc:
        raise HistoryError(str(exc)) from None
    _, first = rows[0]
    index = 0
    if not all(is_number(cell) for cell in first):  # a header line
        names = [cell.strip() for cell in first]
        rows = rows[1:]
        wanted = column or ("Close" if "Close" in names or len(names) > 1 else names[0])
        if wanted not in names:
            raise HistoryError(
                f"{path}: no column {wanted!r} (columns: {', '.join(names)}; choose with --column)"
            )
        index = names.index(wanted)
    elif column is not None:
        raise HistoryError(f"{path}: asked for column {column!r} but the file has no header line")
    elif len(first) != 1:
        raise HistoryError(f"{path}: {len(first)} values a line and no header line naming them")
    values = np.empty(len(rows), dtype=np.float64)
    for i, (line, row) in enumerate(rows):
        if index >= len(row):
            raise HistoryError(
                f"{path}, line {line}: {len(row)} fields, column {index + 1} missing"
            )
        try:
            values[i] = parse_price(row[index], positive=positive, limits=limits)
        except TickError as exc:
            raise HistoryError(f"{path}, line {line}: {exc.reason}: {exc.detail}") from None
    if not len(values):
        raise HistoryError(f"{path}: no prices under the header line")
    return values


@dataclass
class TrainingHistories:
    """What a retrain reads: the usable series and what was left out, by symbol."""

    series: list[np.ndarray] = field(default_factory=list)  # oldest first, each
    symbols: list[str] = field(default_factory=list)  # the symbol of each series
    skipped: dict[str, int] = field(default_factory=dict)  # bad prices left out
    notes: list[str] = field(default_factory=list)  # one line per symbol with a problem


async def read_for_training(
    redis: Redis,
    keys: Keys,
    names: list[str],
    *,
    max_points: int,
    min_points: int,
    limits: TickLimits = DEFAULT_LIMITS,
) -> TrainingHistories:
    """The newest ``max_points`` of each symbol, less the prices the live edge would refuse.

    A symbol that lost prices, or keeps fewer than ``min_points``, gets a note saying so: one
    bad symbol never fails a retrain of the others, and its outcome says which symbol it was.
    """
    out = TrainingHistories()
    for name in names:
        raw = await read_series(redis, keys, name, max_points)
        prices, reasons = clean_series(raw, limits=limits)
        if reasons:
            out.skipped[name] = sum(reasons.values())
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
            out.notes.append(f"{name}: left out {out.skipped[name]} bad price(s) ({why})")
            log.warning("history for training: %s", out.notes[-1])
        if len(prices) >= min_points:
            out.series.append(prices)
            out.symbols.append(name)
        else:
            out.notes.append(
                f"{name}: unusable, {len(prices)} valid price(s) of {len(raw)} read, "
                f"at least {min_points} needed"
            )
            log.warning("history for training: %s", out.notes[-1])
    return out


async def import_series(
    redis: Redis,
    keys: Keys,
    symbol: str,
    prices: np.ndarray,
    *,
    maxlen: int,
    replace: bool = False,
    page: int = PAGE,
    positive: bool | None = None,
    limits: TickLimits = DEFAULT_LIMITS,
) -> int:
    """Load ``prices`` (oldest first) as the history of ``symbol``; return how many are kept.

    Imported entries get ids ``0-1``, ``0-2``, ...: older than any live tick, so the daemon's
    later appends (id = tick id) follow them. A history that is not empty is refused unless
    ``replace``: older prices cannot go in front of newer ones in a stream. Every price must pass
    the live edge's check (``positive``: default ``limits.positive``); one that does not refuses
    the whole series, and nothing is written.
    """
    if not SYMBOL_RE.fullmatch(symbol):
        raise HistoryError(f"symbol {symbol!r} must be 1-64 of A-Z a-z 0-9 . _ : -")
    prices = np.asarray(prices, dtype=np.float64)
    if prices.ndim != 1 or len(prices) == 0:
        raise HistoryError("nothing to import: the series is empty")
    bad = np.flatnonzero(~valid_prices(prices, positive=positive, limits=limits))
    if len(bad):
        try:
            check_price(float(prices[bad[0]]), positive=positive, limits=limits)
        except TickError as exc:
            raise HistoryError(
                f"value {bad[0] + 1} of {len(prices)}: {exc.reason}: {exc.detail} "
                f"({len(bad)} bad value(s) in all); nothing imported"
            ) from None
    key = keys.history(symbol)
    existing = await redis.xlen(key)
    if existing and not replace:
        raise HistoryError(
            f"the history of {symbol} already holds {existing} entries; imports go into an empty "
            "history (use --replace to drop it first)"
        )
    if existing:
        await redis.delete(key)
    kept = prices[-maxlen:]
    offset = len(prices) - len(kept)
    for start in range(0, len(kept), page):
        pipe = redis.pipeline(transaction=False)
        for i in range(start, min(start + page, len(kept))):
            pipe.xadd(key, {"price": repr(float(kept[i]))}, id=f"0-{offset + i + 1}")
        await pipe.execute()
    await redis.sadd(keys.symbols(keys.partition(symbol)), symbol)
    return len(kept)


# -- reading from another process ----------------------------------------------------------------


@dataclass(frozen=True)
class HistorySource:
    """Where a process without the daemon's client (the trainer child) reads the histories.

    ``url`` carries the password: it is left out of ``repr``, and goes to the child in a file
    only its user can read, never on a command line or in a log.
    """

    url: str = field(repr=False)
    cluster: bool  # as STREAMCAST_REDIS_CLUSTER: known, so the child never probes
    keys: Keys
    timeout_s: float = 5.0

    @classmethod
    def of(cls, client: Redis, keys: Keys, url: str | None = None) -> HistorySource:
        """The source ``client`` reads from; ``url`` (default: rebuilt from the client) wins."""
        timeout_s = _connection(client)[1].get("socket_timeout") or 5.0
        return cls(url or client_url(client), is_cluster(client), keys, float(timeout_s))

    def connect(self) -> Redis:
        return make_redis(self.url, self.timeout_s, cluster=self.cluster)

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "cluster": self.cluster,
            "prefix": self.keys.prefix,
            "partitions": self.keys.partitions,
            "timeout_s": self.timeout_s,
        }

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> HistorySource:
        keys = Keys(str(spec["prefix"]), int(spec["partitions"]))
        return cls(str(spec["url"]), bool(spec["cluster"]), keys, float(spec["timeout_s"]))


def client_url(client: Redis) -> str:
    """A URL that connects as ``client`` does: its server (of a cluster, one of its nodes), its
    database, user and password, and its TLS options given as text (files, checks).

    It carries the password: never log it (``streamcast.settings.redact_url``).
    """
    connection, kwargs, host, port = _connection(client)
    username, password = kwargs.get("username"), kwargs.get("password")
    auth = quote(str(username or ""), safe="")
    if password:
        auth += ":" + quote(str(password), safe="")
    auth += "@" if auth else ""
    query: dict[str, Any] = {
        name: value
        for name, value in kwargs.items()
        if name.startswith("ssl_") and isinstance(value, str | bool)
    }
    if isinstance(kwargs.get("ssl_min_version"), int):  # an ssl.TLSVersion, read back with int()
        query["ssl_min_version"] = int(kwargs["ssl_min_version"])
    db = int(kwargs.get("db") or 0)
    if issubclass(connection, UnixDomainSocketConnection):
        query["db"] = db
        return f"unix://{auth}{quote(str(kwargs['path']))}?{urlencode(query)}"
    scheme = "rediss" if issubclass(connection, SSLConnection) else "redis"
    where = f"[{host}]" if ":" in host else host
    return f"{scheme}://{auth}{where}:{port}/{db}" + (f"?{urlencode(query)}" if query else "")


def _connection(client: Redis) -> tuple[type, dict[str, Any], str, int]:
    """The connection class, the connection settings, the host and the port of ``client``."""
    if is_cluster(client):
        manager = cast(Any, client).nodes_manager
        kwargs = manager.connection_kwargs
        node = manager.default_node or next(iter(manager.startup_nodes.values()))
        return kwargs.get("connection_class", object), kwargs, node.host, node.port
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    return pool.connection_class, kwargs, str(kwargs.get("host", "")), int(kwargs.get("port", 0))
