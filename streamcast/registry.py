"""The model registry: versions in Redis, a current-version pointer, a file cache, events.

Every replica on any host reaches the same Redis, so versions live there:

* ``<prefix>:{models}:model:<version>``: a hash with the ``.keras`` bytes, the sidecar JSON and
  the sha256;
* ``<prefix>:{models}:versions``: every registered version, scored by registration time;
* ``<prefix>:{models}:current``: a hash with the serving version, when and why it was promoted,
  changed together with the promotions list and the log in one MULTI/EXEC (and WATCHed, so two
  promotions never interleave);
* ``<prefix>:{models}:log``: a stream of events (retrain outcomes with both scores, promotions,
  rollbacks); ``<prefix>:models:events``: a pub/sub channel that tells replicas to look,
  published to once the transaction is done.

Every key shares the hash tag ``{models}``: on a Redis Cluster they lie in one slot, so each
transaction (and WATCH) here is allowed there too.

A fetched version is written to a file cache (a directory per version) after its bytes' sha256
matches both the registry's and the sidecar's, and the model loader checks it again on load.

A version name becomes a Redis key and a directory name, so every name that comes in (a sidecar,
the command line, the promotions list, a retrain's result) passes :func:`check_version` first,
and a version whose sidecar names another version is refused: a replica would load it again at
every model check, since it compares the registry's name with the name the loaded sidecar gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.connect import outage_behind
from streamcast.keys import Keys
from streamcast.model import MODEL_FILE, SIDECAR_FILE, ModelError, ModelInfo, sha256_file
from streamcast.wire import text

log = logging.getLogger(__name__)

LOG_MAXLEN = 10_000
# a version is one path component: no "/", no leading "." or "-", no ".." anywhere
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class VersionError(ModelError):
    """A version name that cannot be used as a key and a cache directory name."""


def check_version(version: object) -> str:
    """``version`` when it is a valid version name; else raise :class:`VersionError` naming it.

    Valid: 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit, without "..".
    """
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version) or ".." in version:
        shown = repr(version)[:80]
        raise VersionError(
            f"model version {shown} is not a valid name: 1-64 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, without '..'"
        )
    return version


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamcast" / "models"


@dataclass(frozen=True)
class Current:
    version: str
    promoted_at: float | None  # unix seconds; None: not known (a hand-edited entry)
    reason: str

    @classmethod
    def of(cls, fields: dict[str, str], key: str) -> Current | None:
        """The current entry's hash (None when empty). Without a version (a hand-edited hash)
        it is a :class:`ModelError` saying how to mend it; an unreadable ``promoted_at`` is
        only not known."""
        if not fields:
            return None
        version = fields.get("version", "")
        if not version:
            raise ModelError(
                f"the registry's current entry ({key}) names no version: "
                "promote one (`streamcast models promote VERSION`)"
            )
        try:
            promoted_at: float | None = float(fields.get("promoted_at", ""))
        except ValueError:
            promoted_at = None
        if promoted_at is not None and not math.isfinite(promoted_at):
            promoted_at = None
        return cls(version=version, promoted_at=promoted_at, reason=fields.get("reason", ""))


@dataclass(frozen=True)
class Version:
    version: str
    registered_at: float
    info: ModelInfo


class Registry:
    """Register, fetch, promote and roll back model versions for one key prefix."""

    def __init__(self, redis: Redis, keys: Keys, cache_dir: Path | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    async def register(self, directory: str | Path) -> ModelInfo:
        """Store a saved model directory as a version (idempotent); return its sidecar."""
        directory = Path(directory)
        info = ModelInfo.read(directory / SIDECAR_FILE)
        try:
            check_version(info.version)
        except VersionError as exc:
            raise VersionError(f"{directory / SIDECAR_FILE}: {exc}") from None
        model_path = directory / MODEL_FILE
        if not model_path.is_file():
            raise ModelError(f"{model_path}: model file missing")
        blob = model_path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if digest != info.sha256:
            raise ModelError(
                f"{model_path}: sha256 {digest[:12]}… does not match the sidecar's "
                f"{info.sha256[:12]}…; refusing to register a model file that changed"
            )
        key = self.keys.model(info.version)
        sidecar = (directory / SIDECAR_FILE).read_text(encoding="utf-8")
        await self._check_unchanged(info.version, digest)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"keras": blob, "sidecar": sidecar, "sha256": digest})
        pipe.zadd(self.keys.models, {info.version: int(time.time() * 1000)}, nx=True)
        await pipe.execute()
        log.info("registered model %s (%d bytes)", info.version, len(blob))
        return info

    async def _check_unchanged(self, version: str, digest: str) -> None:
        """Refuse to overwrite a registered version with other bytes or a mismatched entry."""
        reply: Any = await self.redis.hmget(self.keys.model(version), ["sidecar", "sha256"])
        sidecar, stored = reply
        if sidecar is None and stored is None:
            return
        if stored is not None and text(stored) != digest:
            raise ModelError(
                f"model version {version} is already registered with other bytes (sha256 "
                f"{text(stored)[:12]}…, this file {digest[:12]}…); a version never changes: "
                "save the model again to get a new version"
            )
        if sidecar is not None:
            _parse_sidecar(version, sidecar)  # an entry whose sidecar names another version

    async def ensure_current(self, directory: str | Path) -> str:
        """The current version; when there is none yet, register ``directory`` and make it so."""
        current = await self.current()
        if current is not None:
            return current.version
        info = await self.register(directory)
        with contextlib.suppress(PromotionConflict):  # another replica set one first: theirs
            await self.promote(info.version, reason="initial model", expect=None)
        current = await self.current()
        assert current is not None
        return current.version

    # -- reading -----------------------------------------------------------------------------

    async def current(self) -> Current | None:
        """The current version, or None when none was ever promoted (see :meth:`Current.of`)."""
        raw = await self.redis.hgetall(self.keys.model_current)
        return Current.of({text(k): text(v) for k, v in raw.items()}, self.keys.model_current)

    async def info(self, version: str) -> ModelInfo:
        check_version(version)
        raw = await self.redis.hget(self.keys.model(version), "sidecar")
        if raw is None:
            raise ModelError(f"no model version {version!r} in the registry")
        return _parse_sidecar(version, raw)

    async def versions(self) -> list[Version]:
        """Every registered version, oldest first."""
        rows: Any = await self.redis.zrange(self.keys.models, 0, -1, withscores=True)
        out = []
        for member, score in rows:
            version = text(member)
            try:
                check_version(version)
                raw = await self.redis.hget(self.keys.model(version), "sidecar")
                if raw is None:
                    continue
                out.append(Version(version, score / 1000, _parse_sidecar(version, raw)))
            except ModelError as exc:
                log.warning("skipping an unusable registry entry: %s", exc)
        return out

    async def previous_versions(self) -> list[str]:
        """Versions promoted before the current one, newest first: fallbacks to try in turn.

        Each appears once; the current version, names that are not valid and versions no longer
        in the registry are left out.
        """
        current = await self.current()
        raw: Any = await self.redis.lrange(self.keys.model_promotions, 0, -1)
        out: list[str] = []
        for member in raw:
            version = text(member)
            if (current is not None and version == current.version) or version in out:
                continue
            try:
                check_version(version)
            except VersionError as exc:
                log.warning("skipping a promotion of an invalid version: %s", exc)
                continue
            if await self.redis.exists(self.keys.model(version)):
                out.append(version)
        return out

    async def subscribe(self) -> Any:
        """A pub/sub connection subscribed to the announcements of new current versions (the
        message data is the version); ``aclose()`` it when done."""
        # a cluster client picks the pub/sub node from its slot map, which it has only once it
        # has run a command (redis-py 8.1 raises KeyError otherwise); idempotent, and a plain
        # client's initialize() does nothing here
        await self.redis.initialize()
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.keys.model_channel)
        except BaseException:
            await pubsub.aclose()
            raise
        return pubsub

    async def events(self, count: int = 20) -> list[dict[str, str]]:
        """The newest registry events, newest first."""
        entries: Any = await self.redis.xrevrange(self.keys.model_log, count=count)
        return [
            {"id": text(eid), **{text(k): text(v) for k, v in fields.items()}}
            for eid, fields in entries
        ]

    async def fetch(self, version: str) -> Path:
        """A local directory holding ``version``, from the file cache or fetched and checked.

        Raises :class:`ModelError` (:class:`VersionError` for a bad name) for a version that is
        missing, corrupt, or whose sidecar names another version.
        """
        target = cache_path(self.cache_dir, version)
        if (target / SIDECAR_FILE).is_file() and (target / MODEL_FILE).is_file():
            try:
                info = ModelInfo.read(target / SIDECAR_FILE)
            except ModelError:
                info = None
            if (
                info is not None
                and info.version == version
                and sha256_file(target / MODEL_FILE) == info.sha256
            ):
                return target
            log.warning("cached model %s is damaged; fetching it again", version)
        reply: Any = await self.redis.hmget(
            self.keys.model(version), ["keras", "sidecar", "sha256"]
        )
        blob, sidecar, digest = reply
        if blob is None or sidecar is None:
            raise ModelError(f"no model version {version!r} in the registry")
        info = _parse_sidecar(version, sidecar)
        actual = hashlib.sha256(blob).hexdigest()
        if actual != info.sha256 or (digest is not None and text(digest) != actual):
            raise ModelError(
                f"model {version} in the registry is corrupt: its bytes hash to {actual[:12]}…, "
                f"the sidecar says {info.sha256[:12]}…"
            )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.cache_dir))
        try:
            (staging / MODEL_FILE).write_bytes(blob)
            (staging / SIDECAR_FILE).write_bytes(
                sidecar if isinstance(sidecar, bytes) else str(sidecar).encode()
            )
            target = cache_path(
                self.cache_dir, version
            )  # again: the cache may have changed meanwhile
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    # -- changing the current version --------------------------------------------------------

    async def promote(
        self, version: str, *, reason: str, expect: str | bool | None = False, **event: Any
    ) -> None:
        """Point every replica at ``version``, atomically, and tell them.

        ``expect``: the version that must be current for the change to happen (``None``: none
        must be); ``False`` (the default) promotes whatever is current.
        """
        check_version(version)
        if not await self.redis.exists(self.keys.model(version)):
            raise ModelError(f"no model version {version!r} in the registry")
        await self._set_current(version, reason, expect, "promoted", push=True, event=event)

    async def rollback(self, reason: str = "rollback") -> str:
        """Make the previously promoted version current again; return it."""
        promotions = [text(v) for v in await self.redis.lrange(self.keys.model_promotions, 0, 1)]
        if len(promotions) < 2:
            raise ModelError("nothing to roll back to: fewer than two versions were ever promoted")
        current, previous = promotions
        check_version(previous)
        await self._set_current(previous, reason, current, "rollback", push=False, event={})
        return previous

    async def add_event(self, event: dict[str, Any]) -> None:
        """Append an event (a retrain outcome, say) to the registry's log."""
        fields: dict[Any, Any] = {k: _field(v) for k, v in event.items() if v is not None}
        await self.redis.xadd(self.keys.model_log, fields, maxlen=LOG_MAXLEN, approximate=True)

    async def _set_current(
        self,
        version: str,
        reason: str,
        expect: str | bool | None,
        kind: str,
        *,
        push: bool,
        event: dict[str, Any],
    ) -> None:
        keys = self.keys
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                await pipe.watch(keys.model_current, keys.model_promotions)
                raw = await pipe.hget(keys.model_current, "version")
                now = text(raw) if raw is not None else None
                if expect is not False and now != expect:
                    await pipe.reset()
                    raise PromotionConflict(
                        f"the current version is {now or 'none'}, not {expect or 'none'}: "
                        "someone else changed it"
                    )
                pipe.multi()
                promoted_at = time.time()
                pipe.hset(
                    keys.model_current,
                    mapping={
                        "version": version,
                        "promoted_at": repr(promoted_at),
                        "reason": reason,
                    },
                )
                if push:
                    pipe.lpush(keys.model_promotions, version)
                else:
                    pipe.lpop(keys.model_promotions)
                pipe.ltrim(keys.model_promotions, 0, 999)
                fields: dict[Any, Any] = {
                    "event": kind,
                    "version": version,
                    "previous": now or "",
                    "reason": reason,
                }
                fields.update({k: _field(v) for k, v in event.items() if v is not None})
                pipe.xadd(keys.model_log, fields, maxlen=LOG_MAXLEN, approximate=True)
                await pipe.execute()
        except redis_errors.WatchError as exc:
            outage_behind(exc)  # Redis went away mid-promotion: not a conflict
            raise PromotionConflict("the current version changed during the promotion") from None
        log.info("%s model %s (was %s): %s", kind, version, now or "none", reason)
        await self._announce(version)

    async def _announce(self, version: str) -> None:
        """Tell every replica to look now (they also check every ``model_check_s``).

        After the transaction, not in it: redis-py's cluster pipeline refuses PUBLISH (and the
        channel's name hashes to another slot than {models}); on a cluster a PUBLISH reaches the
        subscribers of every node. A lost announcement (Redis gone just now) only delays the
        replicas to their next check.
        """
        try:
            await self.redis.publish(self.keys.model_channel, version)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            log.warning(
                "model %s is current, but announcing it failed (%s): replicas see it at their "
                "next check",
                version,
                type(exc).__name__,
            )


class PromotionConflict(ModelError):
    """The current version was not what the caller expected (another replica got there first)."""


def cache_path(cache_dir: Path, version: str) -> Path:
    """The cache directory of ``version``, refused unless it lies directly in ``cache_dir``."""
    check_version(version)
    root = cache_dir.resolve()
    target = cache_dir / version
    # defence in depth: a name that passed the check, or a link planted in the cache, must
    # still not make fetch remove and replace a directory elsewhere
    if target.resolve().parent != root or target.is_symlink():
        raise ModelError(
            f"model {version}: cache path {target} leads outside the cache {root}; refused"
        )
    return target


def _field(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse_sidecar(version: str, raw: Any) -> ModelInfo:
    """The sidecar of registry entry ``version``; refused if it names another version."""
    check_version(version)
    info = ModelInfo.parse(raw, f"model {version} in the registry")
    if info.version != version:
        raise ModelError(
            f"model {version} in the registry: its sidecar says version {str(info.version)[:80]!r}; "
            "a version whose sidecar names another is refused (it would be reloaded forever)"
        )
    return info
