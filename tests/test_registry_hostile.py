"""The model registry against hostile or inconsistent versions, on a real redis-server.

A version name is a Redis key and a cache directory name; a version whose sidecar names another
version would be reloaded by every replica at every model check; a bad current version needs
fallbacks to try.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from redis import Redis as SyncRedis

from streamcast.cli import main
from streamcast.keys import Keys
from streamcast.model import ModelError, save_model
from streamcast.registry import Registry, VersionError, check_version

POISON = "x/../../victim"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model):
    """Two saved versions of the tiny model (different weights, so different versions)."""
    root = tmp_path_factory.mktemp("hostile-models")
    first = save_model(tiny_model, root / "a", normalise=True)
    weights = tiny_model.get_weights()
    tiny_model.set_weights([w * 1.02 for w in weights])
    second = save_model(tiny_model, root / "b", normalise=True)
    tiny_model.set_weights(weights)
    assert first.version != second.version
    return root / "a", root / "b", first.version, second.version


def renamed(source, target, version):
    """A copy of a saved model whose sidecar says ``version`` (the bytes and sha256 unchanged)."""
    shutil.copytree(source, target)
    sidecar = json.loads((target / "model.json").read_text())
    sidecar["version"] = version
    (target / "model.json").write_text(json.dumps(sidecar))
    return target


async def write_raw(redis, keys: Keys, key_version: str, directory, *, current: bool = False):
    """A registry entry written straight into Redis, as a buggy or hostile writer would."""
    blob = (directory / "model.keras").read_bytes()
    sidecar = (directory / "model.json").read_text()
    sha = json.loads(sidecar)["sha256"]
    await redis.hset(
        keys.model(key_version), mapping={"keras": blob, "sidecar": sidecar, "sha256": sha}
    )
    await redis.zadd(keys.models, {key_version: 1})
    if current:
        await redis.hset(keys.model_current, mapping={"version": key_version, "reason": "raw"})
        await redis.lpush(keys.model_promotions, key_version)


# -- 1. a version name is never a path --------------------------------------------------------


@pytest.mark.parametrize(
    "version",
    ["x/../../victim", "../victim", "..", "a..b", ".hidden", "-rf", "a/b", "a b", "", "v" * 65],
)
def test_check_version_refuses_names_that_are_not_one_plain_path_component(version):
    with pytest.raises(VersionError, match="is not a valid name"):
        check_version(version)


@pytest.mark.parametrize("version", ["20240101T000000Z-0123abcd", "v1", "model_2.1-rc", "A" * 64])
def test_check_version_accepts_plain_names(version):
    assert check_version(version) == version


async def test_register_refuses_a_sidecar_version_with_a_path_in_it(redis_client, saved, tmp_path):
    dir_a, _, _, _ = saved
    poisoned = renamed(dir_a, tmp_path / "poisoned", POISON)
    registry = Registry(redis_client, Keys("reg-poison"), tmp_path / "cache")
    with pytest.raises(VersionError, match=r"model\.json: model version 'x/\.\./\.\./victim'"):
        await registry.register(poisoned)
    assert await redis_client.keys("*") == []


def test_models_add_promote_refuses_a_path_version_with_exit_2(
    redis_server, saved, tmp_path, monkeypatch, capsys
):
    dir_a, _, _, _ = saved
    poisoned = renamed(dir_a, tmp_path / "poisoned", POISON)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STREAMCAST_REDIS_URL", redis_server.url)
    monkeypatch.setenv("STREAMCAST_KEY_PREFIX", "cli-poison")
    monkeypatch.setenv("STREAMCAST_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["models", "add", str(poisoned), "--promote"]) == 2
    err = capsys.readouterr().err
    assert "streamcast models: error:" in err and "'x/../../victim' is not a valid name" in err
    assert "Traceback" not in err
    assert main(["models", "promote", "../victim"]) == 2
    assert "'../victim' is not a valid name" in capsys.readouterr().err
    with SyncRedis(port=redis_server.port) as raw:
        assert raw.keys("*") == [], "nothing was registered"
    assert not (tmp_path / "cache").exists()


async def test_fetch_refuses_a_poisoned_entry_and_never_touches_outside_the_cache(
    redis_client, saved, tmp_path
):
    dir_a, _, _, _ = saved
    keys = Keys("fetch-poison")
    # the entry bypasses `models add`: written raw, consistent (its sidecar names it), current
    world = tmp_path / "world"  # the redis-server's directory is tmp_path: keep out of it
    await write_raw(redis_client, keys, POISON, renamed(dir_a, world / "p", POISON), current=True)
    cache = world / "cache"
    # earlier fetches of versions "x" and ".x" would have left these: with them, the name
    # resolves through the cache to world / "victim"
    (cache / "x").mkdir(parents=True)
    (cache / ".x").mkdir()
    victim = world / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    registry = Registry(redis_client, keys, cache)

    with pytest.raises(VersionError, match=re.escape("'x/../../victim' is not a valid name")):
        await registry.fetch(POISON)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert (victim / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in world.iterdir()) == ["cache", "p", "victim"]
    assert sorted(p.name for p in cache.iterdir()) == [".x", "x"]
    # every other way in refuses it too
    with pytest.raises(VersionError):
        await registry.promote(POISON, reason="x")
    with pytest.raises(VersionError):
        await registry.info(POISON)
    assert await registry.versions() == []
    assert await registry.previous_versions() == []


async def test_fetch_refuses_a_cache_entry_that_links_outside_the_cache(
    redis_client, saved, tmp_path
):
    dir_a, _, va, _ = saved
    keys = Keys("fetch-link")
    registry = Registry(redis_client, keys, tmp_path / "cache")
    await registry.register(dir_a)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / va).symlink_to(victim, target_is_directory=True)
    with pytest.raises(ModelError, match="outside the cache"):
        await registry.fetch(va)
    assert [p.name for p in victim.iterdir()] == ["keep.txt"]


async def test_rollback_refuses_a_poisoned_promotions_entry(redis_client, saved, tmp_path):
    dir_a, _, va, _ = saved
    keys = Keys("rollback-poison")
    registry = Registry(redis_client, keys, tmp_path / "cache")
    await registry.register(dir_a)
    await registry.promote(va, reason="first")
    await redis_client.rpush(keys.model_promotions, "../../victim")  # [va, ../../victim]
    with pytest.raises(VersionError, match=re.escape("'../../victim'")):
        await registry.rollback()
    current = await registry.current()
    assert current is not None and current.version == va


# -- 2. a version whose sidecar names another version ----------------------------------------


async def test_fetch_refuses_a_version_whose_sidecar_names_another(redis_client, saved, tmp_path):
    dir_a, _, va, _ = saved
    keys = Keys("mismatch")
    await write_raw(redis_client, keys, "renamed-1", dir_a, current=True)
    registry = Registry(redis_client, keys, tmp_path / "cache")
    with pytest.raises(
        ModelError, match=f"model renamed-1 in the registry: its sidecar says version '{va}'"
    ):
        await registry.fetch("renamed-1")
    assert not (tmp_path / "cache" / "renamed-1").exists()
    # a cached copy whose sidecar names another version is not served from the cache either
    good = Registry(redis_client, keys, tmp_path / "cache")
    shutil.copytree(dir_a, tmp_path / "cache" / "renamed-1")
    with pytest.raises(ModelError, match="its sidecar says version"):
        await good.fetch("renamed-1")


async def test_add_refuses_a_version_registered_with_another_sidecar_or_other_bytes(
    redis_client, saved, tmp_path
):
    dir_a, dir_b, va, _ = saved
    keys = Keys("mismatch-add")
    registry = Registry(redis_client, keys, tmp_path / "cache")
    # the key of va holds an entry whose sidecar says another version: add does not bless it
    await write_raw(redis_client, keys, va, renamed(dir_a, tmp_path / "other", "other-name"))
    with pytest.raises(
        ModelError, match=f"model {va} in the registry: its sidecar says version 'other-name'"
    ):
        await registry.register(dir_a)
    # a registered version's bytes never change: other bytes under the same name are refused
    keys2 = Keys("mismatch-bytes")
    registry2 = Registry(redis_client, keys2, tmp_path / "cache2")
    await registry2.register(dir_a)
    imposter = renamed(dir_b, tmp_path / "imposter", va)
    with pytest.raises(
        ModelError, match=f"model version {va} is already registered with other bytes"
    ):
        await registry2.register(imposter)
    fetched = await registry2.fetch(va)
    assert (fetched / "model.keras").read_bytes() == (dir_a / "model.keras").read_bytes()
    assert await registry2.register(dir_a) is not None  # the same model again: idempotent


# -- 3. fallbacks for a bad current version ---------------------------------------------------


async def test_previous_versions_lists_earlier_promotions_newest_first_without_the_current(
    redis_client, saved, tmp_path
):
    dir_a, dir_b, va, vb = saved
    keys = Keys("fallback")
    registry = Registry(redis_client, keys, tmp_path / "cache")
    assert await registry.previous_versions() == []
    await registry.ensure_current(dir_a)
    assert await registry.previous_versions() == []
    await registry.register(dir_b)
    await registry.promote(vb, reason="better")
    assert await registry.previous_versions() == [va]
    await registry.promote(va, reason="back")  # promotions: [va, vb, va]
    assert await registry.previous_versions() == [vb]
    # invalid names and versions no longer in the registry are no fallback
    await redis_client.rpush(keys.model_promotions, "../evil", "deleted-version")
    assert await registry.previous_versions() == [vb]
    assert await registry.rollback() == vb
    assert await registry.previous_versions() == [va]


# -- 4. a hand-edited current entry ---------------------------------------------------------------


def test_a_hand_edited_current_entry_is_said_served_past_and_mended_by_a_promote(
    redis_server, saved, tmp_path, monkeypatch, capsys, caplog
):
    """`HSET current promoted_at <not a time>` or `HDEL current version`: before, a KeyError or
    ValueError out of every reader: `serve` exited with a traceback, the watchers logged one at
    every check, and `models promote` (the repair) failed the same way."""
    import asyncio
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from streamcast.connect import make_redis
    from streamcast.daemon.config import DaemonConfig
    from streamcast.daemon.models import ModelWatcher
    from streamcast.metrics import Metrics
    from streamcast.service import initial_model_path
    from streamcast.settings import load_settings

    dir_a, _, va, _ = saved
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STREAMCAST_REDIS_URL", redis_server.url)
    monkeypatch.setenv("STREAMCAST_KEY_PREFIX", "cli-current")
    monkeypatch.setenv("STREAMCAST_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    keys = Keys("cli-current")
    assert main(["models", "add", str(dir_a), "--promote"]) == 0
    with SyncRedis(port=redis_server.port) as raw:
        raw.hset(keys.model_current, "promoted_at", "2026-11-29")
    capsys.readouterr()
    assert main(["models", "list"]) == 0  # an unreadable time is only not known
    assert f"* {va}" in capsys.readouterr().out
    with SyncRedis(port=redis_server.port) as raw:
        raw.hdel(keys.model_current, "version")
    assert main(["models", "list"]) == 2
    err = capsys.readouterr().err
    assert "names no version" in err and "streamcast models promote VERSION" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

    settings = load_settings(model_path=dir_a)

    async def readers() -> tuple:
        redis = make_redis(redis_server.url)
        try:
            registry = Registry(redis, keys, tmp_path / "cache")
            start = await initial_model_path(registry, settings)
            watcher = ModelWatcher(
                registry,
                keys,
                loader=lambda path: None,
                config=DaemonConfig(),
                metrics=Metrics(CollectorRegistry()),
                serving=lambda: SimpleNamespace(version="v0"),
            )
            await watcher.check()  # said, served past
            return start, watcher.incoming
        finally:
            await redis.aclose()

    start, incoming = asyncio.run(readers())
    assert start == settings.model_path and incoming is None
    assert any("serving v0 on" in r.getMessage() for r in caplog.records)
    assert main(["models", "promote", va]) == 0  # the repair
    capsys.readouterr()
    assert main(["models", "list"]) == 0 and f"* {va}" in capsys.readouterr().out
