from __future__ import annotations

import zlib

import pytest

from streamcast.keys import Keys, shard_of
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
            {"STREAMCAST_SHARD_INDEX": "3", "STREAMCAST_SHARD_COUNT": "3"},
            "STREAMCAST_SHARD_INDEX=3 must be below STREAMCAST_SHARD_COUNT=3",
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


def test_keys_and_stable_shards():
    keys = Keys("p")
    assert (keys.ticks, keys.dead, keys.forecasts("A"), keys.history("A")) == (
        "p:ticks",
        "p:dead",
        "p:forecasts:A",
        "p:history:A",
    )
    assert keys.group(1, 3) == "p:shard-1-of-3"
    # CRC32: the same on every host and process, unlike hash()
    assert shard_of("AAPL", 3) == zlib.crc32(b"AAPL") % 3
    counts = [0, 0, 0]
    for k in range(300):
        counts[shard_of(f"S{k}", 3)] += 1
    assert min(counts) > 70


def test_windows_fill_roll_and_detect_replays():
    windows = Windows(seq_len=3)
    assert windows.push("A", "1-0", 1.0, None) is None
    assert windows.push("A", "2-0", 2.0, 5) is None
    assert list(windows.push("A", "3-0", 3.0, None)) == [1.0, 2.0, 3.0]
    assert list(windows.push("A", "4-0", 4.0, None)) == [2.0, 3.0, 4.0]
    assert windows.seen("A", "3-0") and windows.seen("A", "4-0") and not windows.seen("A", "4-1")
    assert not windows.seen("B", "1-0")
    assert windows.get("A").last_ts == 5
