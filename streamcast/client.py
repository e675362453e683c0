"""The public client: publish ticks and read forecasts and paths, on one Redis server or a Redis
Cluster.

Everything that produces ticks or reads forecasts goes through :class:`Client` (``replay``,
``watch``, the live page, the demo, the benchmarks' producers), so the key layout lives in one
place. A tick goes to its symbol's partition stream (:meth:`Keys.ticks_for`); a symbol's 1-step
forecasts are read from its forecasts stream and its multi-step paths from its paths stream
(published apart, later, and not for every tick). On one server one blocking XREAD reads every
stream at once; on a cluster a command may touch one slot only, so symbols of several partitions
are read with one non-blocking XREAD per partition, swept in turn (a blocking read of one
partition would hold back the others' forecasts). A symbol's forecasts and paths share its
partition's hash tag: one read takes both.

Telling paths from forecasts: a subscription that follows paths (``paths=True``) returns the
entries of both streams, each as it came; one read from a paths stream is a :class:`PathForecast`
(a :class:`~streamcast.wire.Forecast` with ``next`` None, ``path`` set unless withheld, its tick
the one the path starts from), one read from a forecasts stream a plain ``Forecast``. So
``isinstance(f, PathForecast)`` says which stream an entry came from, without guessing from its
fields (a forecast with a withheld ``next`` has no ``next`` either).

    async with await Client.connect("redis://127.0.0.1:6379/0") as client:
        await client.publish("ACME", 101.5)
        async for f in client.forecasts(["ACME"], block_ms=5000, paths=True):
            if isinstance(f, PathForecast):
                print("path from", f.tick.price, "to", f.path and f.path[-1])
            else:
                print(f.tick.price, f.next)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from redis.asyncio import Redis

from streamcast.connect import cluster_enabled, is_cluster, make_redis
from streamcast.keys import Keys
from streamcast.wire import SYMBOL_RE, Forecast, Tick, id_key, parse_stream_reply, text

log = logging.getLogger(__name__)

READ_COUNT = 500  # entries one read takes from each stream at most
# one XREAD's BLOCK, well under the client's socket timeout (a longer block would time out)
BLOCK_MS_MAX = 1000
SWEEP_PAUSE_S = 0.02  # a cluster sweep that found nothing waits this long before the next
SYMBOLS_EXACT_MAX = 10_000  # symbols(limit) reads every name up to this many in all, samples beyond

# (symbol, price) or (symbol, price, event time in epoch ms)
TickInput = tuple[str, float] | tuple[str, float, int | None]


@dataclass(frozen=True, slots=True)
class PathForecast(Forecast):
    """An entry read from a symbol's paths stream: its multi-step path (None if withheld, with a
    ``reason``) and its bands' ``path`` part, from the tick it starts from (``tick``, whose id is
    the entry's); ``next`` is always None (the tick's forecast entry has it).

    Only the client makes these (a :class:`Forecast` otherwise): it knows the stream it read.
    Not equal to a plain ``Forecast`` of the same fields."""


async def deployed_partitions(redis: Redis, prefix: str) -> int | None:
    """The partition count the deployment's daemon wrote (``{prefix}:meta``); None if none did."""
    raw = await redis.hget(Keys(prefix).meta, "partitions")
    return None if raw is None else int(raw)


class Client:
    """Publishes ticks to the partition streams and reads the forecasts and paths streams.

    Args:
        redis: from :func:`streamcast.connect.make_redis` (one server or a cluster); closed by
            :meth:`aclose` only when the client made it (:meth:`connect`).
        keys: the deployment's key names; its partition count must be the daemon's.
    """

    def __init__(self, redis: Redis, keys: Keys, *, owns_redis: bool = False) -> None:
        self.redis = redis
        self.keys = keys
        self._owns_redis = owns_redis
        self._warned_bad_entry = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        prefix: str = "streamcast",
        partitions: int | None = None,
        timeout_s: float = 5.0,
        cluster: bool | None = None,
    ) -> Client:
        """A client on its own connection to ``url``.

        Args:
            partitions: the deployment's partition count; None reads it from ``{prefix}:meta``
                (written by the daemon at start), or takes 1 when no daemon wrote it.
            cluster: whether ``url`` names a Redis Cluster node (None: ask the server).
        """
        if cluster is None:  # the probe is a blocking call: off the event loop
            cluster = await asyncio.to_thread(cluster_enabled, url, timeout_s)
        redis = make_redis(url, timeout_s, cluster=cluster)
        try:
            if partitions is None:
                partitions = await deployed_partitions(redis, prefix) or 1
            return cls(redis, Keys(prefix, partitions), owns_redis=True)
        except BaseException:
            await redis.aclose()
            raise

    async def aclose(self) -> None:
        """Close the connection if :meth:`connect` made it (idempotent)."""
        if self._owns_redis:
            self._owns_redis = False
            await self.redis.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- producing ------------------------------------------------------------------------------

    async def publish(self, symbol: str, price: float, ts: int | None = None) -> str:
        """XADD one tick to its symbol's partition stream; returns the entry id (the tick's id).

        Args:
            ts: the event time, epoch milliseconds (None: the tick's arrival in Redis).
        """
        stream, fields = self._tick(symbol, price, ts)
        return text(await self.redis.xadd(stream, fields))

    async def publish_many(self, ticks: Iterable[TickInput]) -> list[str]:
        """XADD each of ``ticks`` ((symbol, price) or (symbol, price, ts)) in one pipeline, not a
        transaction (on a cluster each tick goes to its partition's node); the entry ids."""
        pipe = self.redis.pipeline(transaction=False)
        for symbol, price, *ts in ticks:
            pipe.xadd(*self._tick(symbol, price, ts[0] if ts else None))
        return [text(entry_id) for entry_id in await pipe.execute()]

    def _tick(self, symbol: str, price: float, ts: int | None) -> tuple[str, dict[Any, Any]]:
        # refused here, where the caller sees it, rather than as a dead letter later
        if not SYMBOL_RE.fullmatch(symbol):
            raise ValueError(f"symbol {symbol[:80]!r} is not 1-64 of A-Z a-z 0-9 . _ : -")
        return self.keys.ticks_for(symbol), Tick.encode(symbol, price, ts)

    # -- reading forecasts ----------------------------------------------------------------------

    def forecast_stream(self, symbol: str) -> str:
        """The stream the daemon publishes ``symbol``'s forecasts to."""
        return self.keys.forecasts(symbol)

    async def latest(self, symbol: str) -> Forecast | None:
        """``symbol``'s newest forecast; None when it has none (or the newest does not parse)."""
        entries = await self.redis.xrevrange(self.forecast_stream(symbol), count=1)
        if not entries:
            return None
        entry_id, fields = entries[0]
        return self._decode(self.forecast_stream(symbol), text(entry_id), fields)

    def path_stream(self, symbol: str) -> str:
        """The stream the daemon publishes ``symbol``'s multi-step paths to."""
        return self.keys.paths(symbol)

    async def latest_path(self, symbol: str) -> Forecast | None:
        """``symbol``'s newest path entry (a :class:`PathForecast`: ``next`` None, ``path`` from
        ``tick``); None when it has none (or the newest does not parse)."""
        stream = self.path_stream(symbol)
        entries = await self.redis.xrevrange(stream, count=1)
        if not entries:
            return None
        entry_id, fields = entries[0]
        return self._decode(stream, text(entry_id), fields, PathForecast)

    async def symbols(self, limit: int | None = None) -> list[str]:
        """Every symbol with history, over all partitions, sorted; with ``limit``, the first
        ``limit`` of them. When there are more than :data:`SYMBOLS_EXACT_MAX` in all (a feed of
        millions of names: the sets only grow), ``limit`` asks each partition for a sample of
        ``limit`` instead, so the work stays bounded: the first ``limit`` of the samples."""
        keys = [self.keys.symbols(p) for p in range(self.keys.partitions)]
        pipe = self.redis.pipeline(transaction=False)
        if limit is not None:
            for key in keys:
                pipe.scard(key)
            if sum(await pipe.execute()) > SYMBOLS_EXACT_MAX:
                for key in keys:
                    pipe.srandmember(key, limit)
                samples = await pipe.execute()
                return sorted({text(m) for found in samples for m in found})[:limit]
        for key in keys:
            pipe.smembers(key)
        members = await pipe.execute()
        return sorted({text(m) for found in members for m in found})[:limit]

    def subscribe(
        self, symbols: Sequence[str], *, start: str = "$", paths: bool = False
    ) -> Subscription:
        """Cursors over ``symbols``' forecast streams, read with :meth:`Subscription.read`.

        Args:
            start: ``"$"``: forecasts published from now on; ``"0"``: every stored one first.
            paths: follow each symbol's paths stream too: its entries come back as
                :class:`PathForecast` among the forecasts.
        """
        return Subscription(self, symbols, start, paths=paths)

    async def forecasts(
        self,
        symbols: Sequence[str],
        *,
        start: str = "$",
        block_ms: int | None = None,
        count: int | None = None,
        paths: bool = False,
    ) -> AsyncIterator[Forecast]:
        """Each forecast of ``symbols`` as it arrives, in order within each symbol.

        Args:
            start: ``"$"``: from now on; ``"0"``: every stored forecast first.
            block_ms: the iteration ends when no forecast arrives for this long (None: never).
            count: the iteration ends after this many entries (None: never).
            paths: each path entry too, as a :class:`PathForecast` (after its tick's forecast
                when both are read together); ``count`` counts them.
        """
        subscription = self.subscribe(symbols, start=start, paths=paths)
        given = 0
        while count is None or given < count:
            wanted = READ_COUNT if count is None else min(READ_COUNT, count - given)
            batch = await subscription.read(block_ms, count=wanted)
            if not batch:
                return
            for forecast in batch[: None if count is None else count - given]:
                given += 1
                yield forecast

    def _decode(
        self, stream: str, entry_id: str, fields: Any, kind: type[Forecast] = Forecast
    ) -> Forecast | None:
        try:
            forecast = kind.decode(fields)
            id_key(forecast.tick.id)  # a stream id: its time is the tick's arrival
            return forecast
        except (ValueError, TypeError, KeyError) as exc:  # json's errors are ValueErrors
            if not self._warned_bad_entry:  # once: a bad producer must not flood the log
                self._warned_bad_entry = True
                log.warning("skipping a forecast entry that does not parse (%s %s): %r",
                            stream, entry_id, exc)  # fmt: skip
            return None


class Subscription:
    """Where reading ``symbols``' forecast streams (and, following paths, their paths streams)
    has got to: each read goes on from there.

    Made by :meth:`Client.subscribe`. Entries that do not parse as forecasts are skipped (and
    counted in ``skipped``); those of a paths stream come back as :class:`PathForecast`.
    """

    def __init__(
        self, client: Client, symbols: Sequence[str], start: str, *, paths: bool = False
    ) -> None:
        keys = client.keys
        self._client = client
        self._symbols = list(dict.fromkeys(symbols))
        self._paths: set[str] = set()
        self._cursors: dict[str, str] = {}
        self._by_partition: dict[int, list[str]] = {}
        for symbol in self._symbols:
            # the forecasts stream first: of a tick's two entries read together (the same id),
            # the forecast comes before the path (the sort by id is stable)
            streams = [keys.forecasts(symbol)]
            if paths:
                streams.append(keys.paths(symbol))
                self._paths.add(keys.paths(symbol))
            self._cursors.update(dict.fromkeys(streams, start))
            self._by_partition.setdefault(keys.partition(symbol), []).extend(streams)
        self._resolved = "$" not in self._cursors.values()
        self.skipped = 0

    async def recent(self, count: int, *, paths: int = 1) -> list[Forecast]:
        """The newest ``count`` forecasts of each symbol and, following paths, its newest
        ``paths`` path entries (the newest is the one to show), symbol by symbol, each
        symbol's oldest first (by tick id; a path after its tick's forecast); reading goes on
        after them."""
        if count < 1 or paths < 1:
            raise ValueError(f"count and paths must be at least 1 (got {count}, {paths})")
        streams = list(self._cursors)
        pipe = self._client.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xrevrange(stream, count=paths if stream in self._paths else count)
        replies = dict(zip(streams, await pipe.execute(), strict=True))
        keys = self._client.keys
        out = []
        for symbol in self._symbols:
            triples = []
            for stream in (keys.forecasts(symbol), keys.paths(symbol)):
                if stream not in replies:
                    continue
                entries = replies[stream]
                self._cursors[stream] = text(entries[0][0]) if entries else "0-0"
                triples += [
                    (stream, text(entry_id), fields) for entry_id, fields in reversed(entries)
                ]
            out += self._take(triples)
        self._resolved = True
        return out

    async def read(self, block_ms: int | None = 0, *, count: int = READ_COUNT) -> list[Forecast]:
        """The forecasts (and, following paths, path entries) published since the last read, in
        order within each symbol (and by tick id across symbols and streams); waits up to
        ``block_ms`` for one (0: not at all; None: until one comes). At most ``count`` from each
        stream."""
        if not self._resolved:
            await self._resolve()
        loop = asyncio.get_running_loop()
        deadline = None if block_ms is None else loop.time() + block_ms / 1000
        redis = self._client.redis
        one_read = len(self._by_partition) == 1 or not is_cluster(redis)
        while True:
            left_ms = (
                BLOCK_MS_MAX if deadline is None else max(0, int((deadline - loop.time()) * 1000))
            )
            if one_read:
                wait_ms = min(left_ms, BLOCK_MS_MAX)
                cursors: dict[Any, Any] = self._cursors
                # block=None: no BLOCK at all (BLOCK 0 would wait for ever)
                reply = await redis.xread(cursors, count=count, block=wait_ms or None)
                entries = parse_stream_reply(reply)
            else:
                entries = await self._sweep(count)
                if not entries and left_ms > 0:
                    await asyncio.sleep(min(SWEEP_PAUSE_S, left_ms / 1000))
            forecasts = self._take(entries)
            # entries that all failed to parse are no reason to return early
            if forecasts or (deadline is not None and loop.time() >= deadline):
                return forecasts

    async def _sweep(self, count: int) -> list[tuple[str, str, dict[Any, Any]]]:
        """One non-blocking XREAD per partition (a cluster's command touches one slot), together."""
        redis = self._client.redis
        reads = [
            redis.xread({s: self._cursors[s] for s in streams}, count=count)
            for streams in self._by_partition.values()
        ]
        return [
            entry for reply in await asyncio.gather(*reads) for entry in parse_stream_reply(reply)
        ]

    async def _resolve(self) -> None:
        """``$`` as each stream's newest id: a later read from ``$`` would miss what arrived
        between two reads (and a cluster's sweep never blocks, so ``$`` would never move)."""
        waiting = [s for s, cursor in self._cursors.items() if cursor == "$"]
        pipe = self._client.redis.pipeline(transaction=False)
        for stream in waiting:
            pipe.xrevrange(stream, count=1)
        for stream, entries in zip(waiting, await pipe.execute(), strict=True):
            self._cursors[stream] = text(entries[0][0]) if entries else "0-0"
        self._resolved = True

    def _take(self, entries: list[tuple[str, str, dict[Any, Any]]]) -> list[Forecast]:
        # stable: each stream's entries keep their order, and a tick's forecast its place
        # before its path (streams are listed forecasts first)
        entries = sorted(entries, key=lambda entry: id_key(entry[1]))
        out = []
        for stream, entry_id, fields in entries:
            self._cursors[stream] = entry_id
            kind = PathForecast if stream in self._paths else Forecast
            forecast = self._client._decode(stream, entry_id, fields, kind)
            if forecast is None:
                self.skipped += 1
            else:
                out.append(forecast)
        return out
