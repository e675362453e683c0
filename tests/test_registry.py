"""The history store, the model registry and the retrain lock, on a real redis-server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from streamcast.history import HistoryError, import_series, read_series, symbols
from streamcast.keys import Keys
from streamcast.model import ModelError, save_model
from streamcast.registry import PromotionConflict, Registry
from streamcast.retrain import RetrainLock


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tiny_model):
    """Two saved versions of the tiny model (different weights, so different versions)."""
    root = tmp_path_factory.mktemp("models")
    first = save_model(tiny_model, root / "a", normalise=True)
    weights = tiny_model.get_weights()
    tiny_model.set_weights([w * 1.01 for w in weights])
    second = save_model(tiny_model, root / "b", normalise=True)
    tiny_model.set_weights(weights)
    assert first.version != second.version
    return root / "a", root / "b", first.version, second.version


# -- history -----------------------------------------------------------------------------------


async def test_import_gives_old_ids_keeps_the_newest_under_the_cap_and_reads_back(redis_client):
    keys = Keys("h")
    prices = 100 + np.arange(25, dtype=float)
    kept = await import_series(redis_client, keys, "AAA", prices, maxlen=20, page=7)
    assert kept == 20
    entries = await redis_client.xrange(keys.history("AAA"))
    assert [e[0].decode() for e in entries] == [f"0-{i}" for i in range(6, 26)]
    assert await symbols(redis_client, keys) == ["AAA"]
    # paged reads (page 3) return the newest max_points, oldest first
    np.testing.assert_array_equal(
        await read_series(redis_client, keys, "AAA", 8, page=3), prices[-8:]
    )
    np.testing.assert_array_equal(await read_series(redis_client, keys, "AAA", 100), prices[-20:])
    assert len(await read_series(redis_client, keys, "NONE", 10)) == 0
    # a live tick appended after the import (id = tick id) follows the imported ones
    await redis_client.xadd(keys.history("AAA"), {"price": "1.5"}, id="1700000000000-0")
    assert (await read_series(redis_client, keys, "AAA", 2)).tolist() == [124.0, 1.5]


async def test_import_refuses_a_non_empty_history_unless_replacing(redis_client):
    keys = Keys("h2")
    await import_series(redis_client, keys, "B", np.ones(5), maxlen=100)
    with pytest.raises(HistoryError, match="already holds 5 entries"):
        await import_series(redis_client, keys, "B", np.ones(3), maxlen=100)
    assert await import_series(redis_client, keys, "B", np.ones(3), maxlen=100, replace=True) == 3
    assert await redis_client.xlen(keys.history("B")) == 3
    with pytest.raises(HistoryError, match="value 2 of 2: non_finite_price: nan is not finite"):
        await import_series(redis_client, keys, "C", np.array([1.0, np.nan]), maxlen=100)
    with pytest.raises(HistoryError, match="symbol"):
        await import_series(redis_client, keys, "bad symbol", np.ones(3), maxlen=100)


# -- registry ----------------------------------------------------------------------------------


async def test_register_fetch_promote_and_rollback(redis_client, saved_models, tmp_path):
    dir_a, dir_b, va, vb = saved_models
    registry = Registry(redis_client, Keys("r"), tmp_path / "cache")
    assert await registry.current() is None
    assert await registry.ensure_current(dir_a) == va
    assert await registry.ensure_current(dir_b) == va, "a current version is kept"
    await registry.register(dir_b)
    await registry.register(dir_b)  # idempotent
    assert [v.version for v in await registry.versions()] == [va, vb]

    fetched = await registry.fetch(vb)
    assert (fetched / "model.keras").read_bytes() == (dir_b / "model.keras").read_bytes()

    with pytest.raises(PromotionConflict, match="not "):
        await registry.promote(vb, reason="test", expect="someone-else")
    await registry.promote(vb, reason="better", expect=va)
    current = await registry.current()
    assert current is not None and current.version == vb and current.reason == "better"
    assert await registry.rollback() == va
    assert (await registry.current()).version == va  # type: ignore[union-attr]
    with pytest.raises(ModelError, match="nothing to roll back"):
        await registry.rollback()
    events = [e["event"] for e in await registry.events()]
    assert events == ["rollback", "promoted", "promoted"]
    with pytest.raises(ModelError, match="no model version"):
        await registry.promote("nope", reason="x")


async def test_corrupt_versions_are_refused_and_a_damaged_cache_is_refetched(
    redis_client, saved_models, tmp_path
):
    dir_a, _, va, _ = saved_models
    keys = Keys("corrupt")
    registry = Registry(redis_client, keys, tmp_path / "cache")
    await registry.register(dir_a)
    path = await registry.fetch(va)
    # the cached file is damaged: fetched again from Redis
    (path / "model.keras").write_bytes(b"garbage")
    path = await registry.fetch(va)
    assert (path / "model.keras").read_bytes() == (dir_a / "model.keras").read_bytes()
    # the bytes in Redis are tampered with: refused, and the cache is not touched
    blob = bytearray(await redis_client.hget(keys.model(va), "keras"))
    blob[100] ^= 0xFF
    await redis_client.hset(keys.model(va), "keras", bytes(blob))
    fresh = Registry(redis_client, keys, tmp_path / "other-cache")
    with pytest.raises(ModelError, match="corrupt"):
        await fresh.fetch(va)
    assert not (tmp_path / "other-cache" / va).exists()
    # a changed file is refused at registration too
    (tmp_path / "m").mkdir()
    for name in ("model.keras", "model.json"):
        (tmp_path / "m" / name).write_bytes((dir_a / name).read_bytes())
    (tmp_path / "m" / "model.keras").write_bytes(b"x" * 100)
    with pytest.raises(ModelError, match="does not match the sidecar"):
        await registry.register(tmp_path / "m")


async def test_promotion_is_announced_to_subscribers(redis_client, saved_models, tmp_path):
    dir_a, _, va, _ = saved_models
    keys = Keys("announce")
    registry = Registry(redis_client, keys, tmp_path)
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(keys.model_channel)
    await registry.ensure_current(dir_a)
    message = None
    for _ in range(20):
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message:
            break
    await pubsub.aclose()
    assert message is not None and message["data"] == va.encode()


# -- the retrain lock --------------------------------------------------------------------------


async def test_retrain_lock_has_one_holder_renewal_and_release_by_token(redis_client):
    a = RetrainLock(redis_client, "lock", ttl_s=1.0)
    b = RetrainLock(redis_client, "lock", ttl_s=1.0)
    assert await a.acquire()
    assert not await b.acquire()
    assert not await b.renew() and not await b.release()
    assert await a.renew()
    assert await a.release()
    assert await b.acquire()
    # an expired holder cannot renew or release the next holder's lock
    await asyncio.sleep(1.2)
    assert await a.acquire()
    assert not await b.renew() and not await b.release()
    assert await redis_client.get("lock") == a.token.encode()
