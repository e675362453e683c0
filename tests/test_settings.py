from __future__ import annotations

import zlib

import pytest

from streamcast.keys import Keys, partition_of
from streamcast.settings import SettingsError, load_settings, redact_url
from streamcast.windows import Windows


def test_defaults_and_environment(monkeypatch):
    monkeypatch.setenv("STREAMCAST_KEY_PREFIX", "prod")
    monkeypatch.setenv("STREAMCAST_SHARD_INDEX", "2")
    monkeypatch.setenv("STREAMCAST_SHARD_COUNT", "3")
    settings = load_settings()
    assert settings.key_prefix == "prod" and settings.consumer == "replica-2"
    assert settings.batch_max_size == 512 and settings.http_port == 8000


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        (
            {"STREAMCAST_BATCH_MAX_SIZE": "0"},
            "STREAMCAST_BATCH_MAX_SIZE: Input should be greater than or equal to 1",
        ),
        ({"STREAMCAST_HTTP_PORT": "http"}, "STREAMCAST_HTTP_PORT: Input should be a valid integer"),
        (
            {"STREAMCAST_REDIS_URL": "http://x"},
            "STREAMCAST_REDIS_URL: Value error, must start with redis://",
        ),
        ({"STREAMCAST_KEY_PREFIX": "a b"}, "STREAMCAST_KEY_PREFIX: String should match pattern"),
        (
            {"STREAMCAST_ENGINE_BATCHING": "gpu"},
            "STREAMCAST_ENGINE_BATCHING: Input should be 'auto', 'one_call' or 'chunked'",
        ),
        (
            {"STREAMCAST_SHARD_INDEX": "3", "STREAMCAST_SHARD_COUNT": "3"},
            "STREAMCAST_SHARD_INDEX=3 must be below STREAMCAST_SHARD_COUNT=3",
        ),
        (
            {"STREAMCAST_PARTITIONS": "0"},
            "STREAMCAST_PARTITIONS: Input should be greater than or equal to 1 (got '0')",
        ),
        (
            {"STREAMCAST_PARTITIONS": "4097"},
            "STREAMCAST_PARTITIONS: Input should be less than or equal to 4096",
        ),
        (
            {
                "STREAMCAST_ASSIGNMENT": "static",
                "STREAMCAST_SHARD_COUNT": "4",
                "STREAMCAST_PARTITIONS": "2",
            },
            "STREAMCAST_SHARD_COUNT=4 replicas cannot share STREAMCAST_PARTITIONS=2 partitions "
            "statically",
        ),
        (
            {"STREAMCAST_ASSIGNMENT": "sticky"},
            "STREAMCAST_ASSIGNMENT: Input should be 'lease' or 'static'",
        ),
        # a hash tag in the prefix would put every partition's keys in one slot
        (
            {"STREAMCAST_KEY_PREFIX": "app{x}"},
            "STREAMCAST_KEY_PREFIX: String should match pattern '^[A-Za-z0-9._:-]{1,64}$' "
            "(got 'app{x}')",
        ),
        (
            {"STREAMCAST_KEY_PREFIX": "app{"},
            "STREAMCAST_KEY_PREFIX: String should match pattern",
        ),
        # bounds that refuse every tick: the daemon would come up ready and forecast nothing
        (
            {"STREAMCAST_PRICE_MIN": "5", "STREAMCAST_PRICE_MAX": "1"},
            "STREAMCAST_PRICE_MIN=5 must be below STREAMCAST_PRICE_MAX=1: every tick would be "
            "refused",
        ),
        ({"STREAMCAST_PRICE_MIN": "inf"}, "STREAMCAST_PRICE_MIN: Input should be a finite number"),
        ({"STREAMCAST_PRICE_MAX": "nan"}, "STREAMCAST_PRICE_MAX: Input should be a finite number"),
        (
            {"STREAMCAST_REDIS_CLUSTER": "maybe"},
            "STREAMCAST_REDIS_CLUSTER: Input should be a valid boolean",
        ),
    ],
)
def test_bad_values_name_the_variable_and_the_rule(monkeypatch, env, needle):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert needle in str(info.value)


def test_password_never_appears_in_errors_or_redacted_urls(monkeypatch):
    assert redact_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://user:s3cret@h/0") == "rediss://user:***@h/0"
    monkeypatch.setenv("STREAMCAST_REDIS_URL", "ftp://:s3cret@h")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "s3cret" not in str(info.value)


def test_keys_carry_their_partitions_hash_tag_and_partitions_are_stable():
    keys = Keys("p", 3)
    a = keys.partition("A")
    assert (keys.ticks(1), keys.dead(1), keys.symbols(2), keys.acked(0)) == (
        "p:{p1}:ticks",
        "p:{p1}:dead",
        "p:{p2}:symbols",
        "p:{p0}:acked",
    )
    assert (keys.forecasts("A"), keys.history("A")) == (
        f"p:{{p{a}}}:forecasts:A",
        f"p:{{p{a}}}:history:A",
    )
    assert keys.ticks_for("A") == keys.ticks(a) and keys.all_ticks() == [
        "p:{p0}:ticks",
        "p:{p1}:ticks",
        "p:{p2}:ticks",
    ]
    assert keys.group == "p:forecasters"
    # the registry's keys share one tag (one slot: its transactions are allowed on a cluster)
    registry = [keys.model("v1"), keys.models, keys.model_current, keys.model_promotions]
    assert all("{models}" in key for key in [*registry, keys.model_log])
    # CRC32: the same on every host and process, unlike hash()
    assert partition_of("AAPL", 3) == zlib.crc32(b"AAPL") % 3 == Keys("q", 3).partition("AAPL")
    counts = [0, 0, 0]
    for k in range(300):
        counts[partition_of(f"S{k}", 3)] += 1
    assert min(counts) > 70
    with pytest.raises(ValueError, match=r"partitions must be at least 1 \(got 0\)"):
        Keys("p", 0)


def test_partitions_prefix_and_cluster_settings_reach_the_keys_and_the_client(monkeypatch):
    from streamcast.connect import is_cluster, make_redis
    from streamcast.settings import build

    settings = load_settings(_env_file=None)
    assert settings.keys == Keys() and settings.redis_cluster is None
    monkeypatch.setenv("STREAMCAST_KEY_PREFIX", "prod")
    monkeypatch.setenv("STREAMCAST_PARTITIONS", "12")
    monkeypatch.setenv("STREAMCAST_ASSIGNMENT", "static")
    monkeypatch.setenv("STREAMCAST_SHARD_INDEX", "11")
    monkeypatch.setenv("STREAMCAST_SHARD_COUNT", "12")
    settings = load_settings(_env_file=None)
    assert settings.keys == Keys("prod", 12) and settings.assignment == "static"
    # lease assignment: more replicas than partitions is allowed (the others stand by)
    monkeypatch.setenv("STREAMCAST_ASSIGNMENT", "lease")
    monkeypatch.setenv("STREAMCAST_PARTITIONS", "2")
    assert load_settings(_env_file=None).keys.partitions == 2
    # the cluster setting is make_redis's: named, nothing is asked of the server (none runs)
    monkeypatch.setenv("STREAMCAST_REDIS_URL", "redis://127.0.0.1:1/0")
    for text, cluster in (("true", True), ("false", False)):
        monkeypatch.setenv("STREAMCAST_REDIS_CLUSTER", text)
        settings = load_settings(_env_file=None)
        assert settings.redis_cluster is cluster
        assert is_cluster(build(make_redis, settings, "redis_")) is cluster


def test_windows_fill_roll_and_detect_replays():
    windows = Windows(seq_len=3)
    assert windows.push("A", "1-0", 1.0, None) is None
    assert windows.push("A", "2-0", 2.0, 5) is None
    assert list(windows.push("A", "3-0", 3.0, None)) == [1.0, 2.0, 3.0]
    assert list(windows.push("A", "4-0", 4.0, None)) == [2.0, 3.0, 4.0]
    assert windows.seen("A", "3-0") and windows.seen("A", "4-0") and not windows.seen("A", "4-1")
    assert not windows.seen("B", "1-0")
    assert windows.get("A").last_ts == 5


# -- one path from settings to the parts, defaults declared once --------------------------------


def mapped_settings() -> dict[str, tuple[object, str]]:
    """{setting: (part, parameter)} for every setting that configures a part's parameter."""
    import inspect

    from streamcast.settings import PARTS, Settings

    out: dict[str, tuple[object, str]] = {}
    for part, prefix in PARTS:
        for name in inspect.signature(part).parameters:
            if prefix + name in Settings.model_fields:
                out[prefix + name] = (part, name)
    return out


def test_every_setting_with_a_part_takes_that_parts_default():
    import inspect

    from streamcast.settings import CONVERT, Settings

    mapped = mapped_settings()
    assert {"batch_max_size", "retrain_margin", "price_min", "http_max_connections"} <= set(mapped)
    assert {"assignment", "redis_cluster", "key_prefix"} <= set(mapped)
    # STREAMCAST_PARTITIONS is Keys.partitions without the key_ prefix (Settings.keys passes it)
    assert Settings.model_fields["partitions"].default == Keys().partitions == 1
    for setting, (part, name) in mapped.items():
        declared = inspect.signature(part).parameters[name].default  # type: ignore[arg-type]
        if declared is inspect.Parameter.empty:
            continue  # the part needs it given (the URL, the port): the setting owns it
        value = Settings.model_fields[setting].default
        value = CONVERT[setting](value) if setting in CONVERT else value
        assert value == declared, f"{setting}: {value!r} in settings, {declared!r} in the part"


def literal_defaults(source: str) -> set[str]:
    """Settings fields of ``source`` whose default is written as a literal value."""
    import ast

    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ClassDef) and node.name == "Settings"):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            value = item.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Field":
                value = value.args[0] if value.args else None
            # a call reads the default from somewhere; a name is a constant declared elsewhere
            if value is None or isinstance(value, ast.Name):
                continue
            if not any(isinstance(n, ast.Call) for n in ast.walk(value)):
                found.add(item.target.id)
    return found


def test_no_default_of_a_part_is_declared_again_in_settings():
    """A default written in settings.py for a setting whose part declares one would be a second
    declaration: the two drift apart (they did: retrain margin 0.01 vs 0.0, retrain interval
    3600 vs 0). Settings read it from the part with ``default(part, name)``."""
    import inspect
    from pathlib import Path

    import streamcast.settings as settings_module

    owned = {
        setting
        for setting, (part, name) in mapped_settings().items()
        if inspect.signature(part).parameters[name].default is not inspect.Parameter.empty  # type: ignore[arg-type]
    }
    source = Path(settings_module.__file__).read_text()
    assert owned & literal_defaults(source) == set()
    # the check itself: a literal default is found, one read from the part is not
    sample = (
        "class Settings:\n"
        "    batch_max_size: int = Field(512, ge=1)\n"
        "    retrain_margin: float = 0.01\n"
        "    path_steps: int = Field(default(_D, 'path_steps'), ge=1)\n"
    )
    assert literal_defaults(sample) == {"batch_max_size", "retrain_margin"}


def test_default_settings_build_the_parts_defaults():
    from streamcast.daemon import DaemonConfig
    from streamcast.retrain import RetrainConfig
    from streamcast.settings import Settings, daemon_config, retrain_config

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    built = daemon_config(settings)
    assert built.consumer.startswith("replica-0:")  # unique per process
    assert built == DaemonConfig(consumer=built.consumer)
    assert retrain_config(settings) == RetrainConfig()
    assert retrain_config(settings, epochs=7, margin=None).epochs == 7


def test_engine_batching_defaults_to_the_engines_and_reaches_it(monkeypatch):
    """STREAMCAST_ENGINE_BATCHING is passed to the engine serve loads (Forecaster is not in
    PARTS, its workers default being None where the setting's is 0: checked by hand here)."""
    from streamcast.forecaster import Forecaster
    from streamcast.service import load_engine
    from streamcast.settings import Settings, default

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.engine_batching == default(Forecaster, "batching") == "auto"
    assert settings.engine_workers == 0 and default(Forecaster, "workers") is None
    monkeypatch.setenv("STREAMCAST_ENGINE_BATCHING", "one_call")
    monkeypatch.setenv("STREAMCAST_BATCH_MAX_SIZE", "2")  # three buckets to warm up, not ten
    monkeypatch.setenv("STREAMCAST_PATHS_PER_BATCH_MAX", "2")
    monkeypatch.setenv("STREAMCAST_PARTITIONS", "2")
    with load_engine(load_settings(_env_file=None)) as engine:
        assert (engine.batching, engine.chunk_size, engine.workers) == ("one_call", 4096, 1)
        # the 1-step batches' and the path lane's step counts (paths roll 1 or 5 steps a call);
        # a read of 2 partitions may return 2 + 2 entries (COUNT rounds up per stream): 4 rows
        assert engine.compiled_shapes == [(1, 1), (1, 5), (2, 1), (2, 5), (4, 1), (4, 5)]
