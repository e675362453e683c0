"""The batch plan: validate entries, keep the symbols' windows, conflate when asked.

The windows are this replica's state. They are rebuilt from the symbols' history streams as
their ticks arrive (after a start, a failed batch or an eviction), never trusted after a failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.daemon.batch import Batch, Part, Stats
from streamcast.daemon.config import DaemonConfig
from streamcast.engine import Engine
from streamcast.keys import Keys
from streamcast.logs import RateLimitedLog
from streamcast.metrics import Metrics
from streamcast.windows import Windows
from streamcast.wire import SYMBOL_RE, DeadLetter, HistoryEntry, Tick, TickError, id_key, text

log = logging.getLogger(__name__)

RESTORE_CHUNK = 200  # symbols whose history one pipeline reads


class Planner:
    """Turns read entries into a :class:`Batch`: ticks to forecast, paths due, dead letters."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        config: DaemonConfig,
        metrics: Metrics,
        stats: Stats,
        engine: Engine,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self.metrics = metrics
        self.stats = stats
        self.clock = clock
        self.windows = Windows(engine.seq_len)
        self.limits = replace(config.limits, positive=engine.normalise)
        self._say = RateLimitedLog(log)
        self._idle_checked = 0.0
        self._ingest = metrics.stage_seconds.labels("ingest")

    def reset(self) -> None:
        """Forget every window: after a failed batch they are never trusted."""
        self.windows = Windows(self.windows.seq_len)

    def forget_partitions(self, partitions: set[int]) -> None:
        """Forget the windows of ``partitions``' symbols: given up, lost, or just taken (another
        replica moved them on meanwhile); they come back from history at their next tick."""
        if not partitions:
            return
        gone = [s for s in self.windows.symbols() if self.keys.partition(s) in partitions]
        self.windows.forget(gone)

    def model_changed(self, normalise: bool) -> None:
        self.limits = replace(self.limits, positive=normalise)

    # -- windows from history --------------------------------------------------------------------

    async def restore(self, entries: Iterable[tuple[str, str, dict[Any, Any]]]) -> None:
        """Rebuild from history the window of each symbol in ``entries`` not yet held."""
        ordered = sorted(self._new_symbols(entries))
        seq_len = self.windows.seq_len
        for start in range(0, len(ordered), RESTORE_CHUNK):
            chunk = ordered[start : start + RESTORE_CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            for symbol in chunk:
                # twice the window: entries that break the rules are skipped, the rest fill it
                pipe.xrevrange(self.keys.history(symbol), count=2 * seq_len)
            replies = await pipe.execute(raise_on_error=False)
            now = self.clock()
            for symbol, history in zip(chunk, replies, strict=True):
                if isinstance(history, redis_errors.ResponseError):
                    # e.g. WRONGTYPE: someone wrote another kind of key there. The symbol fills
                    # its window from live ticks; the shard goes on
                    self.metrics.history_skipped.inc()
                    self._say(
                        logging.WARNING,
                        "history-unreadable",
                        "history of %s cannot be read (%s): its window fills from live ticks",
                        symbol,
                        str(history)[:120],
                    )
                    history = []
                rows = [(e.id, e.price, e.ts) for e in self._valid_history(symbol, history)]
                self.windows.restore(symbol, rows, now)

    def _new_symbols(self, entries: Iterable[tuple[str, str, dict[Any, Any]]]) -> set[str]:
        symbols = set()
        for stream, _, fields in entries:
            raw = fields.get(b"symbol")
            if isinstance(raw, bytes) and len(raw) <= 64:
                symbol = raw.decode("utf-8", "replace")
                if (
                    symbol not in self.windows
                    and SYMBOL_RE.fullmatch(symbol)
                    and self.keys.ticks_for(symbol) == stream
                ):
                    symbols.add(symbol)
        return symbols

    def _valid_history(self, symbol: str, entries: Any) -> list[HistoryEntry]:
        """The newest ``seq_len`` history entries by the edge's rules, oldest first: an imported
        or hand-written bad price never reaches a window (it would fail the engine for the whole
        batch). ``entries`` are newest first (XREVRANGE); older ones than the window needs are
        not decoded (half the restore's cost when the history is clean)."""
        rows: list[HistoryEntry] = []
        bad: list[str] = []
        now_ms = int(self.clock() * 1000)
        for entry_id, fields in entries:
            if len(rows) == self.windows.seq_len:
                break
            try:
                rows.append(HistoryEntry.decode(entry_id, fields, self.limits, now_ms))
            except (KeyError, ValueError) as exc:
                bad.append(f"{text(entry_id)}: {exc}")
        rows.reverse()
        if bad:
            self.metrics.history_skipped.inc(len(bad))
            self._say(
                logging.WARNING,
                "history-bad",
                "history of %s: skipped %d entries that break the edge's rules (first: %s)",
                symbol,
                len(bad),
                bad[0],
            )
        return rows

    # -- the plan --------------------------------------------------------------------------------

    def prepare(
        self,
        entries: list[tuple[str, str, dict[Any, Any]]],
        read_at: float,
        partition_of: Callable[[str], int],
    ) -> Batch:
        """Validate entries and push prices into windows; ``partition_of`` names the partition
        of a stream. Conflating, only each symbol's newest tick with a full window is forecast."""
        batch = Batch(read_at=read_at or self.clock(), partition_of=self.keys.partition)
        now = self.clock()
        deleted = []
        for stream, entry_id, fields in entries:
            part = batch.part(partition_of(stream))
            part.ack_ids.append(entry_id)
            if fields:
                self._take(batch, part, partition_of(stream), entry_id, fields, now)
            else:  # deleted from the stream while pending: nothing to forecast
                deleted.append(f"{stream} {entry_id}")
        if deleted:
            self.metrics.ticks.labels("deleted").inc(len(deleted))
            self._say(
                logging.WARNING,
                "deleted",
                "%d pending entries were deleted from their stream (XDEL or XTRIM) before they "
                "were read: acknowledged, nothing to forecast (%s)",
                len(deleted),
                ", ".join(deleted[:5]) + (" ..." if len(deleted) > 5 else ""),
            )
        if self.config.conflate:
            self._conflate(batch)
        self.metrics.queue_depth.set(len(entries))
        return batch

    def _take(
        self,
        batch: Batch,
        part: Part,
        partition: int,
        entry_id: str,
        fields: dict[Any, Any],
        now: float,
    ) -> None:
        try:
            tick = Tick.decode(entry_id, fields, limits=self.limits)
        except TickError as exc:
            part.dead.append(DeadLetter(entry_id, exc.reason, exc.detail, fields))
            return
        if self.keys.partition(tick.symbol) != partition:
            # a producer wrote it to another partition's stream: its forecast and history
            # belong to a partition (a slot) this transaction does not write
            detail = (
                f"{tick.symbol} belongs to partition {self.keys.partition(tick.symbol)} "
                f"({self.keys.ticks_for(tick.symbol)}), not {partition}"
            )
            part.dead.append(DeadLetter(entry_id, "wrong_partition", detail, fields))
            return
        if self.windows.seen(tick.symbol, entry_id):
            self.stats.duplicates += 1
            self.metrics.ticks.labels("duplicate").inc()
            self._say(
                logging.INFO,
                "duplicate",
                "skipped tick %s of %s: its symbol's window already holds it or a later "
                "tick (redelivered after a restart or a recovery)",
                entry_id,
                tick.symbol,
            )
            return
        last_ts = self.windows.get(tick.symbol).last_ts
        if tick.ts is not None and last_ts is not None and tick.ts < last_ts:
            detail = f"ts {tick.ts} is before the symbol's last {last_ts}"
            part.dead.append(DeadLetter(entry_id, "out_of_order", detail, fields))
            return
        window = self.windows.push(tick.symbol, entry_id, tick.price, tick.ts, now)
        batch.accepted.append(tick)
        self._ingest.observe(max(0.0, batch.read_at - id_key(entry_id)[0] / 1000))
        if window is not None:
            batch.ready.append(tick)
            batch.windows.append(window)
        else:
            self.metrics.ticks.labels("filling").inc()

    def _conflate(self, batch: Batch) -> None:
        """Forecast only each symbol's newest ready tick; the others stay accepted (history,
        the ack) and are counted."""
        newest = {tick.symbol: i for i, tick in enumerate(batch.ready)}
        if len(newest) == len(batch.ready):
            return
        keep = sorted(newest.values())
        skipped = len(batch.ready) - len(keep)
        batch.ready = [batch.ready[i] for i in keep]
        batch.windows = [batch.windows[i] for i in keep]
        self.stats.conflated += skipped
        self.metrics.ticks.labels("conflated").inc(skipped)

    # -- forgetting ------------------------------------------------------------------------------

    def evict(self, now: float, protect: set[str]) -> dict[str, list[str]]:
        """Forget symbols idle past ``symbol_idle_s`` and the least recently ticked beyond
        ``symbols_max`` (never one in ``protect``); {why: symbols}. A forgotten symbol's window
        is rebuilt from history at its next tick."""
        cfg = self.config
        idle: list[str] = []
        if cfg.symbol_idle_s > 0 and now - self._idle_checked >= 1.0:
            self._idle_checked = now
            idle = self.windows.evict_idle(now - cfg.symbol_idle_s, protect)
        over = self.windows.evict_over(cfg.symbols_max, protect)
        gone = {"idle": idle, "cap": over}
        for why, symbols in gone.items():
            if not symbols:
                continue
            self.metrics.symbols_evicted.labels(why).inc(len(symbols))
            self._say(
                logging.INFO,
                f"evict-{why}",
                "forgot %d symbols (%s), e.g. %s; their windows come back from history at their "
                "next tick",
                len(symbols),
                "idle" if why == "idle" else f"more than {cfg.symbols_max}",
                symbols[0],
            )
        return gone
