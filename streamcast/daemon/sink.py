"""The forecast sink: one script call with every write a batch makes, and the ack, fenced by the
partitions' leases.

Forecasts (entry id = tick id), history, the symbol sets, dead letters, the acknowledged marks and
XACK land together or not at all: a crash before the call redelivers the batch, after it the batch
is done. A Lua script runs atomically, as MULTI/EXEC does, and lets the fence be part of the
transaction: it first checks that the lease key of every partition it writes for still holds this
replica's token and, if one does not (another replica took it while this one stalled), writes
nothing and names those partitions; the batch is then written again without them, unpublished and
unacknowledged there, and they are reported lost. One round trip, where WATCH, the lease read and
MULTI/EXEC took three, and one reply to parse instead of one a command; a renewal of our own lease
no longer aborts the write, as it did under WATCH. Redis refuses a script's writes until its
first one lands where it refuses writes at all (maxmemory, a replica, a failed save, too few
replicas), and the script stops at the first such refusal: refused whole, as EXEC was (no
shebang flags: fakeredis, the demo's embedded server, does not read them). On a Redis Cluster a
script may touch one slot only, so each partition gets its own call (every key of a partition
shares its hash tag). Every command Redis refused inside the script is counted and logged; a
forecast that was not written becomes a ``publish_failed`` dead letter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.connect import is_cluster
from streamcast.daemon.batch import Batch, Stats
from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.faults import REDIS_DOWN, write_refusal
from streamcast.keys import Keys
from streamcast.logs import RateLimitedLog
from streamcast.metrics import Metrics
from streamcast.tasks import settled
from streamcast.wire import DeadLetter, HistoryEntry, id_key

log = logging.getLogger(__name__)

Op = tuple[str, str, str]  # (what, entry id, key) of each queued command
ARGS_MAX = 1000  # ids or names a command takes at most (Lua unpacks ~8,000 values at most)

# KEYS: the n lease keys, then every key the commands write. ARGV: the token, n, the commands
# whose arguments are all text (forecasts, history, symbol sets, marks, acks) as one JSON array
# of [name, key index, arguments...], then the others (dead letters, which may hold any bytes)
# each as its name, its key's index in KEYS, its argument count and its arguments. One JSON
# argument instead of thousands: redis-py packs a command's arguments one by one in Python.
# Returns {0, lease indices not held with the token} having written nothing, or {1, replies}
# (a refused command's reply is its error, the others' still land).
PUBLISH = """
local token, n = ARGV[1], tonumber(ARGV[2])
local lost = {}
for i = 1, n do
  if redis.pcall('GET', KEYS[i]) ~= token then lost[#lost + 1] = i end
end
if #lost > 0 then return {0, lost} end
-- Redis refuses a script's writes until its first one lands at maxmemory (OOM), on a replica
-- (READONLY), after a failed save (MISCONF), without enough replicas (NOREPLICAS), or with a
-- stale master (MASTERDOWN): one of these means nothing was written, and the whole call is
-- refused (as EXEC was), acks included
local refusals = {OOM = 1, READONLY = 1, MISCONF = 1, NOREPLICAS = 1, MASTERDOWN = 1}
local function refused(r)
  return type(r) == 'table' and type(r.err) == 'string'
    and refusals[string.match(r.err, '^(%u+)')] ~= nil
end
local out = {}
for _, c in ipairs(cjson.decode(ARGV[3])) do
  local r = redis.pcall(c[1], KEYS[c[2]], unpack(c, 3))
  if refused(r) then return r end
  out[#out + 1] = r
end
local a = 4
while a <= #ARGV do
  local argc = tonumber(ARGV[a + 2])
  local r = redis.pcall(ARGV[a], KEYS[tonumber(ARGV[a + 1])], unpack(ARGV, a + 3, a + 2 + argc))
  if refused(r) then return r end
  out[#out + 1] = r
  a = a + 3 + argc
end
return {1, out}
"""
PUBLISH_SHA = hashlib.sha1(PUBLISH.encode()).hexdigest()


class Script:
    """The keys and arguments of one publish script call, built command by command: the text
    ones (:meth:`text`) first, then the others (:meth:`add`), which is the order of the
    replies."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.texts: list[list[Any]] = []
        self.args: list[Any] = []
        self._index: dict[str, int] = {}

    def key(self, key: str) -> int:
        """``key``'s 1-based index in KEYS, declared on first use (a cluster checks them)."""
        index = self._index.get(key)
        if index is None:
            self.keys.append(key)
            index = self._index[key] = len(self.keys)
        return index

    def text(self, command: str, key: str, *args: str) -> None:
        """A command whose arguments are all text (sent in the JSON array, where a number would
        reach Redis as a Lua double)."""
        if self.args:
            raise RuntimeError("text commands come before the others (the order of the replies)")
        self.texts.append([command, self.key(key), *args])

    def add(self, command: str, key: str, *args: Any) -> None:
        self.args += (command, self.key(key), len(args), *args)

    def argv(self, token: str, leases: int) -> tuple[Any, ...]:
        """EVALSHA's arguments after the digest: the key count, KEYS, then ARGV."""
        payload = json.dumps(self.texts, separators=(",", ":"))
        return (len(self.keys), *self.keys, token, leases, payload, *self.args)


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[i : i + ARGS_MAX] for i in range(0, len(items), ARGS_MAX)]


def _flat(fields: Mapping[Any, Any]) -> list[Any]:
    return [x for pair in fields.items() for x in pair]


class Sink(Protocol):
    """What the consume loop calls on the place forecasts go."""

    acked_high: dict[int, tuple[int, int]]  # by partition: the newest tick id acknowledged here
    # partitions the last write found another's, even if it then failed (an outage)
    found_lost: set[int]

    async def write(self, batch: Batch) -> set[int]: ...


class ForecastSink:
    """Writes batches for one consumer group (a :class:`Sink`).

    ``publisher`` runs the script and must not retry by itself: a retried call whose reply
    was lost would write its dead letters twice. ``redis`` (retrying) does the follow-ups.
    """

    def __init__(
        self,
        publisher: Redis,
        redis: Redis,
        keys: Keys,
        token: str,
        config: DaemonConfig,
        metrics: Metrics,
        stats: Stats,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.publisher = publisher
        self.redis = redis
        self.keys = keys
        self.token = token  # this replica's lease token: the fence
        self.group = keys.group
        self.config = config
        self.metrics = metrics
        self.stats = stats
        self.clock = clock
        self.cluster = is_cluster(publisher)
        self.acked_high: dict[int, tuple[int, int]] = {}  # by partition, acknowledged here
        self.found_lost: set[int] = set()
        self._say = RateLimitedLog(log)

    async def write(self, batch: Batch) -> set[int]:
        """Publish the batch and acknowledge its entries, fenced by the partitions' leases; then
        count what was published. Returns the partitions found lost (dropped from the batch)."""
        partitions = sorted(batch.parts)
        self.found_lost = set()
        # one transaction on one server; one per partition (slot) on a cluster, side by side
        groups = [[p] for p in partitions] if self.cluster else [partitions]
        outcomes = await settled(*(self._write(g, batch) for g in groups if g))
        lost = set().union(*outcomes) if outcomes else set()
        batch.drop(lost)
        self._count(batch)  # after the write: only what is durable is counted
        return lost

    async def _write(self, partitions: list[int], batch: Batch) -> set[int]:
        """The script call of ``partitions``' share of the batch; the partitions lost."""
        lost: set[int] = set()
        while live := [p for p in partitions if p not in lost]:
            script = Script()
            for p in live:
                script.key(self.keys.lease(p))
            ops, highs = self._queue(script, batch, set(live), int(self.clock() * 1000))
            done, results = await self._call(script, len(live))
            if not done:
                # the leases (1-based) another replica holds: nothing was written; go again
                # without their partitions
                lost |= {live[int(i) - 1] for i in results}
                self.found_lost |= lost  # known even if a later try fails
                continue
            await self._errors(ops, results, batch)
            for p, high in highs.items():
                if high > self.acked_high.get(p, (0, 0)):
                    self.acked_high[p] = high
            return lost
        return lost

    async def _call(self, script: Script, leases: int) -> tuple[bool, list[Any]]:
        """Run the publish script (by its digest; by its text where Redis has not cached it:
        after a restart or SCRIPT FLUSH). No retry of its own: one that ran and whose reply was
        lost would write its dead letters twice."""
        args = script.argv(self.token, leases)
        try:
            reply = await self.publisher.evalsha(PUBLISH_SHA, *args)
        except redis_errors.NoScriptError:
            reply = await self.publisher.eval(PUBLISH, *args)
        done, results = reply
        return bool(done), list(results)

    def _queue(
        self, script: Script, batch: Batch, partitions: set[int], now_ms: int
    ) -> tuple[list[Op], dict[int, tuple[int, int]]]:
        cfg, keys = self.config, self.keys
        ops: list[Op] = []
        mine = keys.partition
        trim = ("MAXLEN", "~")
        forecasts_maxlen, history_maxlen = str(cfg.forecasts_maxlen), str(cfg.history_maxlen)
        for forecast in batch.forecasts:
            tick = forecast.tick
            if mine(tick.symbol) not in partitions:
                continue
            key = keys.forecasts(tick.symbol)
            fields = forecast.encode(now_ms)
            script.text("XADD", key, *trim, forecasts_maxlen, tick.id, *_flat(fields))
            ops.append(("forecast", tick.id, key))
        symbols: dict[int, set[str]] = {}
        for tick in batch.accepted:
            p = mine(tick.symbol)
            if p not in partitions:
                continue
            key = keys.history(tick.symbol)
            fields = HistoryEntry.of(tick).encode()
            script.text("XADD", key, *trim, history_maxlen, tick.id, *_flat(fields))
            ops.append(("history", tick.id, key))
            symbols.setdefault(p, set()).add(tick.symbol)
        for p, names in symbols.items():
            for some in _chunks(sorted(names)):
                script.text("SADD", keys.symbols(p), *some)
                ops.append(("symbols", "", keys.symbols(p)))
        highs: dict[int, tuple[int, int]] = {}
        for p in sorted(partitions):
            ids = batch.parts[p].ack_ids
            if not ids:
                continue
            high = max(id_key(i) for i in ids)
            highs[p] = high
            if high > self.acked_high.get(p, (0, 0)):
                script.text("SET", keys.acked(p), f"{high[0]}-{high[1]}")
                ops.append(("acked", "", keys.acked(p)))
            for some in _chunks(ids):
                script.text("XACK", keys.ticks(p), self.group, *some)
                ops.append(("ack", "", keys.ticks(p)))
        dead_maxlen = str(cfg.dead_maxlen)
        for p in sorted(partitions):
            for letter in batch.parts[p].dead:  # any bytes: not in the JSON
                fields = letter.encode()
                script.add("XADD", keys.dead(p), *trim, dead_maxlen, "*", *_flat(fields))
                ops.append(("dead", letter.tick_id, keys.dead(p)))
        return ops, highs

    def _count(self, batch: Batch) -> None:
        m, forecasts = self.metrics, batch.forecasts
        withheld = sum(f.next is None for f in forecasts)
        self.stats.batches += 1
        self.stats.forecasts += len(forecasts)
        self.stats.dead += len(batch.dead)
        self.stats.accepted += len(batch.accepted)
        m.batch_size.observe(len(batch.ack_ids))
        m.ticks.labels("forecast").inc(len(forecasts))
        m.ticks.labels("dead").inc(len(batch.dead))
        m.forecasts.labels("next").inc(len(forecasts) - withheld)
        if withheld:
            m.forecasts_withheld.labels("next").inc(withheld)
            self._say(
                logging.WARNING,
                "withheld-next",
                "the model's next was not finite for %d ticks of this batch: published without "
                "it, with a reason",
                withheld,
            )
        for letter in batch.dead:
            m.dead_letters.labels(letter.reason).inc()
        done_ms = int(self.clock() * 1000)
        for tick in batch.ready:
            m.latency.observe(max(0.0, done_ms - id_key(tick.id)[0]) / 1000)
            if tick.ts is not None:
                m.event_latency.observe(max(0.0, done_ms - tick.ts) / 1000)
        if batch.computed_at:
            m.stage_seconds.labels("publish").observe(max(0.0, done_ms / 1000 - batch.computed_at))

    async def _errors(self, ops: list[Op], results: list[Any], batch: Batch) -> None:
        """Count and log every command of the transaction that Redis refused; none is skipped
        silently. A forecast that was not written becomes a dead letter saying why."""
        failed: list[tuple[str, str, str]] = []  # (entry id, forecasts key, why)
        duplicates: list[tuple[str, str]] = []
        for (what, entry_id, key), result in zip(ops, results, strict=True):
            if not isinstance(result, Exception):
                continue
            said = str(result)
            reason = write_refusal(result)
            self.metrics.write_errors.labels(what, reason).inc()
            if reason == "duplicate_id":
                if what == "forecast":
                    duplicates.append((entry_id, key))
                self._say(
                    logging.WARNING,
                    f"dup-{what}",
                    "%s %s: %s has a later entry",
                    what,
                    entry_id,
                    key,
                )
                continue
            self._say(
                logging.ERROR,
                f"err-{what}",
                "writing %s %s to %s failed: %s",
                what,
                entry_id,
                key,
                said,
            )
            if what == "forecast":
                failed.append((entry_id, key, said))
        failed += await self._never_written(duplicates)
        if failed:
            await self._publish_failed(failed, batch)

    async def _never_written(self, duplicates: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
        """Of forecasts refused as duplicate ids, those that are not in their stream. Most were
        written before (a redelivery after their history was lost): nothing to do. But a stray
        later entry in the stream refuses a forecast that was never written: say so."""
        if not duplicates:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, key in duplicates:
            pipe.xrange(key, entry_id, entry_id)
        found = await pipe.execute(raise_on_error=False)
        return [
            (entry_id, key, f"{key} holds a later entry than this tick")
            for (entry_id, key), entry in zip(duplicates, found, strict=True)
            if not entry
        ]

    async def _publish_failed(self, failed: list[tuple[str, str, str]], batch: Batch) -> None:
        # by id and key: partition streams hand out ids independently
        symbol_of = {(t.id, self.keys.forecasts(t.symbol)): t.symbol for t in batch.ready}
        # not published: counted, scored and given a path as what they become, not as forecasts
        batch.withdraw(
            {(symbol_of.get((entry_id, key), ""), entry_id) for entry_id, key, _ in failed}
        )
        letters: list[tuple[str, DeadLetter]] = []
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, key, why in failed:
            symbol = symbol_of.get((entry_id, key), "")
            letter = DeadLetter(
                entry_id,
                "publish_failed",
                f"writing its forecast failed: {why[:200]}",
                {"symbol": symbol},
            )
            letters.append((symbol, letter))
            pipe.xadd(
                self.keys.dead(self.keys.partition(symbol)),
                letter.encode(),
                maxlen=self.config.dead_maxlen,
                approximate=True,
            )
        replies: list[Any]
        try:
            replies = await pipe.execute(raise_on_error=False)
        except (*REDIS_DOWN, redis_errors.RedisError) as exc:
            replies = [exc] * len(failed)
        unwritten = [
            (entry_id, reply)
            for (entry_id, _, _), reply in zip(failed, replies, strict=True)
            if isinstance(reply, Exception)
        ]
        for (symbol, letter), reply in zip(letters, replies, strict=True):
            if not isinstance(reply, Exception):
                batch.dead_letter(symbol, letter)  # written: counted with the batch's
        if not unwritten:
            return
        for _, reply in unwritten:
            why = "unreachable" if isinstance(reply, REDIS_DOWN) else write_refusal(reply)
            self.metrics.write_errors.labels("publish_failed", why).inc()
        # the ticks are acknowledged already: the log is all that is left to say which (a line
        # a batch, never folded: each names ticks lost)
        ids = [entry_id for entry_id, _ in unwritten]
        more = f" and {len(ids) - 20} more" if len(ids) > 20 else ""
        log.error(
            "%d forecasts were not written, and neither were their dead letters (%s): ticks %s%s",
            len(ids),
            unwritten[0][1],
            ", ".join(ids[:20]),
            more,
        )
