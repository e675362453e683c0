"""A retrain on histories that hold prices the live edge would refuse, on a real redis-server.

One bad value in one symbol's history used to fail every retrain (a normalised window that
starts at 0 or 1e-320); now the bad prices are left out, and the outcome names the symbol.
"""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry

from streamcast.data import synthetic_prices
from streamcast.history import import_series
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.model import save_model
from streamcast.registry import Registry
from streamcast.retrain import RetrainConfig, Retrainer


@pytest.mark.slow
async def test_bad_prices_in_one_symbol_are_left_out_and_named_and_the_retrain_runs(
    redis_client, tiny_model, tmp_path
):
    keys = Keys("dirty")
    prices = synthetic_prices(3, 600, seed=3)
    for name, series in zip(("AAA", "BBB"), prices[:2], strict=True):
        await import_series(redis_client, keys, name, series, maxlen=10_000)
    # CCC's history written raw, as an older version or another writer could have: a 0, a
    # denormal and a text that is not a number in the middle
    raw = [repr(float(p)) for p in prices[2]]
    raw[300], raw[301], raw[302] = "0", "1e-320", "abc"
    pipe = redis_client.pipeline(transaction=False)
    for i, text in enumerate(raw):
        pipe.xadd(keys.history("CCC"), {"price": text}, id=f"0-{i + 1}")
    pipe.sadd(keys.symbols(keys.partition("CCC")), "CCC")
    await pipe.execute()
    # DDD has too few prices to be used at all
    await import_series(redis_client, keys, "DDD", prices[0][:60], maxlen=10_000)

    model_dir = tmp_path / "tiny"
    info = save_model(tiny_model, model_dir, normalise=True)
    registry = Registry(redis_client, keys, tmp_path / "cache")
    await registry.ensure_current(model_dir)
    job = Retrainer(
        redis_client,
        keys,
        registry,
        RetrainConfig(epochs=1, batch_size=64, max_points=600, min_windows=100),
        metrics=Metrics(CollectorRegistry()),
    )
    result = await job.run_once()

    assert result.outcome in ("promoted", "rejected"), result.reason
    assert result.current == info.version
    assert math.isfinite(result.candidate_mse) and math.isfinite(result.current_mse)
    assert result.skipped == {"CCC": 3}
    assert (
        "CCC: left out 3 bad price(s) (1 non_finite_price, 1 non_positive_price, "
        "1 price_out_of_range)" in result.reason
    ), result.reason
    assert "DDD: unusable, 60 valid price(s) of 60 read, at least 102 needed" in result.reason
    assert "--no-normalise" not in result.reason
    # the windows are those of AAA, BBB and CCC less its 3 bad prices
    assert result.windows == 2 * (600 - 50) + (597 - 50)
    (event,) = [e for e in await registry.events(5) if e["event"] == "retrain"]
    assert event["skipped"] == "CCC:3" and "CCC: left out 3" in event["reason"]
