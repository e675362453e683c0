"""The ``streamcast`` command line: a parser and a function for each command.

Only the two programs configure logging: this one and the retrain trainer, which runs as its own
process (``python -m streamcast.retrain``).

Heavy imports (TensorFlow, matplotlib) happen inside the commands that need them, so ``--help``
and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamcast.data import DataError
from streamcast.version import __version__

if TYPE_CHECKING:
    import numpy as np

    from streamcast.model import ModelConfig
    from streamcast.replay import LogTail

log = logging.getLogger("streamcast")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback, exit status 2."""


def _tensorflow_logging(verbose: bool) -> None:
    """Before anything imports TensorFlow: its C++ log level, everything with ``-v``.

    Without ``-v`` TensorFlow's own lines (oneDNN, CUDA probing on machines without a GPU) are
    noise: our log says which device runs. A user who sets the variable keeps their choice.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _quiet_tensorflow() -> None:
    """Import TensorFlow, its start-up lines silenced unless TF_CPP_MIN_LOG_LEVEL is 0 (``-v``).

    TensorFlow writes them to file descriptor 2 before its log level applies (they come before
    absl::InitializeLog), so only pointing that descriptor elsewhere for the import stops them.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        import tensorflow  # noqa: F401
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _layers(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,50,100,1, got {text!r}") from None
    return sizes


# -- train ---------------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a CSV file or the project's synthetic series and save it",
        description="Window, split 90/10, train the LSTM, score it on the held-out 10%% and save "
        "model.keras + model.json to --out.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="CSV file: a bare column or a headed CSV")
    source.add_argument(
        "--sine",
        action="store_true",
        help="the tutorial's sine (5001 points), made by the project itself",
    )
    source.add_argument(
        "--synthetic",
        type=_positive_int,
        metavar="SYMBOLS",
        help="train on this many of the project's own synthetic price series",
    )
    p.add_argument("--column", help="column of a headed CSV (default: Close)")
    p.add_argument("--points", type=_positive_int, default=3000, help="points per synthetic series")
    p.add_argument("--epochs", type=_positive_int, default=8)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--learning-rate", type=float, help="initial rate (default: the optimiser's)")
    p.add_argument(
        "--cosine-decay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decay the learning rate to zero over the run (default: on)",
    )
    p.add_argument("--validation-split", type=_fraction, default=0.05)
    p.add_argument(
        "--early-stopping",
        type=_positive_int,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without improvement",
    )
    p.add_argument(
        "--normalise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="normalise each window to its first value (default: when every value is > 0)",
    )
    p.add_argument(
        "--residual",
        action="store_true",
        help="the network predicts the change from the last value (an untrained one = naive)",
    )
    p.add_argument("--layers", type=_layers, default=[1, 50, 100, 1], help="default 1,50,100,1")
    p.add_argument("--dropout", type=_fraction, default=0.2)
    p.add_argument(
        "--config", type=Path, help="JSON model config with a 'layers' list (overrides --layers)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="directory for model.keras + model.json")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from streamcast.training import TrainOptions

    series, data_info = _training_series(args)
    options = TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        cosine_decay=args.cosine_decay,
        validation_split=args.validation_split,
        early_stopping_patience=args.early_stopping,
        seed=args.seed,
        normalise=args.normalise,
        residual=args.residual,
        config=_model_config(args),
    )
    _quiet_tensorflow()
    from streamcast.training import NormaliseError, train_and_save

    try:
        info = train_and_save(series, options, args.out, data_info)
    except NormaliseError as exc:
        raise UserError(f"{exc}; train with --no-normalise for series that cross zero") from None
    print(
        f"saved model {info.version} to {args.out}: test MSE {info.metrics['mse']:.4g}, "
        f"naive {info.metrics['naive_mse']:.4g}, skill {info.metrics['skill']:+.3f}"
    )
    return 0


def _training_series(args: argparse.Namespace) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The series ``train`` learns from (--data, --sine or --synthetic) and where they came from."""
    from streamcast.data import load_series, sine_series, synthetic_prices

    if args.data is not None:
        series = load_series(args.data, args.column)
        return [series], {
            "source": str(args.data),
            "column": args.column,
            "points": len(series),
            "range": f"values 1..{len(series)} of the file, oldest first",
        }
    if args.sine:
        series = sine_series()
        return [series], {"source": "sine:5001", "points": len(series)}
    if args.column:
        raise UserError("--column applies to --data files only")
    prices = synthetic_prices(args.synthetic, args.points, seed=args.seed)
    return list(prices), {
        "source": f"synthetic:{args.synthetic}x{args.points}:seed={args.seed}",
        "points": int(prices.size),
        "range": f"{args.synthetic} symbols x steps 0..{args.points - 1}",
    }


def _model_config(args: argparse.Namespace) -> ModelConfig:
    """The network from --config (a JSON layer list) or else --layers and --dropout."""
    from streamcast.model import ModelConfig, ModelError

    try:
        if args.config is None:
            return ModelConfig.from_sizes(args.layers, dropout=args.dropout)
        try:
            raw = json.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{args.config}: cannot read the model config ({exc})") from None
        return ModelConfig.from_dict(raw.get("model", raw) if isinstance(raw, dict) else raw)
    except ModelError as exc:
        raise UserError(str(exc)) from None


# -- evaluate ------------------------------------------------------------------------------


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="the tutorial's point / full / multiple predictions on the test split, with figures",
        description="Forecast the last 10%% of a series' windows in price space, write a PNG per "
        "mode and metrics.json (model vs the naive forecast, skill, error by horizon, and the "
        "coverage and width of 80%% and 95%% bands calibrated online through the test span).",
    )
    p.add_argument("--model", type=Path, help="model directory (default: the shipped model)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--column")
    p.add_argument("--mode", choices=["point", "full", "multiple", "all"], default="all")
    p.add_argument("--horizon", type=_positive_int, default=50, help="steps per multiple-mode path")
    p.add_argument(
        "--train-fraction", type=_fraction, default=0.9, help="windows before the test split"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="directory for the PNGs and metrics.json"
    )
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from streamcast.data import load_series
    from streamcast.model import DEFAULT_MODEL_DIR

    series = load_series(args.data, args.column)
    modes = ("point", "full", "multiple") if args.mode == "all" else (args.mode,)
    run_evaluation(
        args.model or DEFAULT_MODEL_DIR,
        series,
        name=args.data.name,
        out=args.out,
        modes=modes,
        horizon=args.horizon,
        train_fraction=args.train_fraction,
    )
    return 0


def run_evaluation(
    model_dir: Path,
    series: np.ndarray,
    *,
    name: str,
    out: Path,
    modes: Sequence[str] = ("point", "full", "multiple"),
    horizon: int = 50,
    train_fraction: float = 0.9,
) -> dict[str, Any]:
    """Evaluate ``modes`` on the test split of ``series``; write PNGs and metrics.json to ``out``."""
    from streamcast.data import held_out_windows, make_windows

    test = held_out_windows(make_windows(series), train_fraction)
    n_test = len(test)
    if n_test < 1:
        raise UserError(f"{name}: no test windows with a train fraction of {train_fraction}")
    _quiet_tensorflow()
    from streamcast.evaluate import evaluate
    from streamcast.forecaster import Forecaster

    try:
        from streamcast.plots import plot_evaluation
    except ModuleNotFoundError as exc:  # the `plots` extra, which the image leaves out
        if exc.name != "matplotlib":
            raise
        raise UserError("the figures need matplotlib: pip install 'streamcast[plots]'") from None

    with Forecaster.load(model_dir) as forecaster:
        if forecaster.normalise and (series <= 0).any():
            raise UserError(f"{name}: has values <= 0 but model {forecaster.version} is normalised")
        report: dict[str, Any] = {
            "model": forecaster.version,
            "model_dir": str(model_dir),
            "data": name,
            "test_windows": int(n_test),
            "modes": {},
            "intervals": {},  # per mode: coverage and width of the online-calibrated bands
        }
        out.mkdir(parents=True, exist_ok=True)
        for mode in modes:
            result = evaluate(forecaster, test, mode, horizon=horizon)
            figure = plot_evaluation(result, out / f"{mode}.png", title=name)
            report["modes"][mode] = result.metrics
            if result.intervals:
                report["intervals"][mode] = result.intervals
            m = result.metrics
            print(
                f"{mode:>8}: MSE {m['model']['mse']:.4g}  naive {m['naive']['mse']:.4g}  "
                f"skill {m['skill']:+.3f}  MAE {m['model']['mae']:.4g}  "
                f"direction {m['model']['direction_accuracy']:.1%}  -> {figure}"
            )
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"metrics: {out / 'metrics.json'}")
    return report


# -- experiment ----------------------------------------------------------------------------


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment",
        help="the tutorial end to end: train on the sine (or --data) and evaluate all three modes",
        description="Train with the default settings, then write the point, full and multiple "
        "figures and metrics.json to --out. Needs no data file: the sine is built in.",
    )
    p.add_argument("--data", type=Path, help="CSV file (default: the built-in sine)")
    p.add_argument("--column")
    p.add_argument("--epochs", type=_positive_int, default=8)
    p.add_argument("--out", type=Path, default=Path("runs/sine"))
    p.set_defaults(func=_experiment)


def _experiment(args: argparse.Namespace) -> int:
    from streamcast.data import load_series, sine_series
    from streamcast.training import TrainOptions

    if args.data is not None:
        series = load_series(args.data, args.column)
        name, data_info = args.data.name, {"source": str(args.data), "column": args.column}
    else:
        series = sine_series()
        name, data_info = "sine", {"source": "sine:5001"}
    data_info["points"] = len(series)
    _quiet_tensorflow()
    from streamcast.training import train_and_save

    model_dir = args.out / "model"
    info = train_and_save([series], TrainOptions(epochs=args.epochs), model_dir, data_info)
    print(f"trained {info.version} in {info.training['seconds']:.0f} s -> {model_dir}")
    run_evaluation(model_dir, series, name=name, out=args.out)
    return 0


# -- the streaming service ---------------------------------------------------------------


def _settings(**overrides: Any) -> Any:
    from streamcast.settings import SettingsError, load_settings

    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        raise UserError(str(exc)) from None


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="the daemon: ticks from Redis in, forecasts out (settings from STREAMCAST_* / .env)",
        description="Reads STREAMCAST_REDIS_URL, STREAMCAST_KEY_PREFIX, STREAMCAST_MODEL_PATH, "
        "STREAMCAST_HTTP_HOST/PORT, STREAMCAST_SHARD_INDEX/COUNT, STREAMCAST_BATCH_MAX_SIZE, "
        "STREAMCAST_BATCH_MAX_WAIT_MS, STREAMCAST_PATH_REFRESH_S and more (see the README).",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    settings = _settings()
    _quiet_tensorflow()
    from streamcast.service import serve

    return asyncio.run(serve(settings))


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="publish a CSV (or the synthetic series) as ticks, as a simulated live feed",
    )
    p.add_argument("file", nargs="?", type=Path, help="CSV file (default: synthetic series)")
    p.add_argument("--column")
    p.add_argument("--symbol", default=None, help="symbol name (default: the file name, or SYN)")
    p.add_argument(
        "--symbols", type=_positive_int, default=1, help="fan out to N symbols with distinct paths"
    )
    p.add_argument("--points", type=_positive_int, default=5000, help="points per synthetic series")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--rate",
        type=float,
        default=100.0,
        metavar="TICKS_PER_S",
        help="sent evenly, each tick at its own time (default: 100)",
    )
    pace.add_argument("--as-fast-as-possible", action="store_true")
    p.add_argument("--loop", action="store_true", help="start over at the end, until Ctrl+C")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_replay)


def feed_from_args(args: argparse.Namespace) -> tuple[Any, list[str]]:
    from streamcast.data import load_series
    from streamcast.replay import fan_out, symbol_names, synthetic_feed

    if args.file is not None:
        series = load_series(args.file, args.column)
        paths = fan_out(series, args.symbols, seed=args.seed)
        base = args.symbol or args.file.stem.upper()
    else:
        paths = synthetic_feed(args.symbols, args.points, seed=args.seed)
        base = args.symbol or "SYN"
    from streamcast.wire import SYMBOL_RE

    names = symbol_names(base, args.symbols)
    if not all(SYMBOL_RE.fullmatch(n) for n in names):
        raise UserError(f"symbol {base!r} must be 1-64 of A-Z a-z 0-9 . _ : - (use --symbol)")
    return paths, names


def _replay(args: argparse.Namespace) -> int:
    from streamcast.replay import Progress, replay

    if args.rate is not None and args.rate <= 0 and not args.as_fast_as_possible:
        raise UserError(f"--rate must be > 0, got {args.rate}")
    settings = _settings()
    keys = settings.keys
    paths, names = feed_from_args(args)

    async def run(redis: Any) -> int:
        await _check_partitions(redis, keys)
        progress = Progress(None if args.loop else paths.size)
        sent = await replay(
            redis,
            keys,
            paths,
            names,
            rate=None if args.as_fast_as_possible else args.rate,
            loop=args.loop,
            progress=progress,
        )
        progress.close()
        return sent

    sent = _with_redis(settings, run)
    streams = _ticks_streams(keys, names)
    print(f"replayed {sent} ticks for {len(names)} symbol(s) to {streams}")
    return 0


def _ticks_streams(keys: Any, names: Sequence[str]) -> str:
    """The partition streams ``names``' ticks go to, for a message."""
    streams = [keys.ticks(p) for p in sorted({keys.partition(n) for n in names})]
    if len(streams) == 1:
        return streams[0]
    shown = ", ".join(streams[:4]) + (", ..." if len(streams) > 4 else "")
    return f"{len(streams)} of {keys.partitions} partition streams ({shown})"


async def _check_partitions(redis: Any, keys: Any) -> None:
    """Refuse a partition count other than the deployment's (its daemon wrote it in the meta
    hash): ticks would go to, and forecasts be looked for in, streams the daemon does not use."""
    from streamcast.client import deployed_partitions

    deployed = await deployed_partitions(redis, keys.prefix)
    if deployed is not None and deployed != keys.partitions:
        raise UserError(
            f"STREAMCAST_PARTITIONS is {keys.partitions}, but the deployment on this Redis has "
            f"{deployed} partitions ({keys.meta}): set STREAMCAST_PARTITIONS={deployed}"
        )


def _with_redis(settings: Any, work: Callable[[Any], Any]) -> Any:
    """Run ``await work(redis)`` with a checked connection from the settings, then close it."""
    import asyncio

    from streamcast.connect import make_redis
    from streamcast.settings import build

    async def run() -> Any:
        # STREAMCAST_REDIS_CLUSTER applies: the URL may name any node of a Redis Cluster
        redis = build(make_redis, settings, "redis_")
        try:
            await _check_redis(redis, settings.redis_url_redacted)
            return await work(redis)
        finally:
            await redis.aclose()

    return asyncio.run(run())


async def _check_redis(redis: Any, shown_url: str) -> None:
    from redis import exceptions

    try:
        await redis.ping()
    except exceptions.AuthenticationError:
        raise UserError(f"redis at {shown_url} refused the credentials") from None
    except exceptions.ResponseError as exc:
        raise UserError(f"redis at {shown_url}: {exc}") from None
    except (exceptions.ConnectionError, exceptions.TimeoutError, OSError) as exc:
        raise UserError(f"cannot reach redis at {shown_url} ({exc})") from None
    except exceptions.RedisClusterException as exc:  # not a RedisError: no node answered
        raise UserError(f"redis cluster at {shown_url}: {exc}") from None


def _add_watch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "watch", help="print each forecast and path of the given symbols as it arrives"
    )
    p.add_argument("symbols", nargs="+", metavar="SYMBOL")
    p.add_argument(
        "--from-start", action="store_true", help="print the stored forecasts and paths first"
    )
    p.add_argument(
        "--count",
        "--limit",
        dest="count",
        type=_positive_int,
        metavar="N",
        help="exit after N forecasts (the paths between them are not counted)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='a JSON object per forecast or path per line ("kind": "forecast" or "path", then '
        "the entry's fields), flushed",
    )
    p.set_defaults(func=_watch)


def _watch(args: argparse.Namespace) -> int:
    from streamcast.replay import watch
    from streamcast.wire import SYMBOL_RE

    bad = [s for s in args.symbols if not SYMBOL_RE.fullmatch(s)]
    if bad:
        raise UserError(f"symbol {bad[0]!r} is not 1-64 of A-Z a-z 0-9 . _ : -")
    settings = _settings()
    keys = settings.keys

    async def run(redis: Any) -> int:
        await _check_partitions(redis, keys)
        return await watch(
            redis,
            keys,
            args.symbols,
            limit=args.count,
            start="0" if args.from_start else "$",
            as_json=args.json,
            # the lag in the table's header: the daemon's group, summed over the partitions
            group=keys.group,
        )

    _with_redis(settings, run)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="everything at once, no server needed: embedded Redis, a synthetic feed, the daemon",
        description="Starts an embedded Redis (unless STREAMCAST_REDIS_URL is set), replays a "
        "synthetic multi-symbol feed, runs the daemon and its HTTP endpoints, and prints live "
        "forecasts until Ctrl+C.",
    )
    p.add_argument("--symbols", type=_positive_int, default=8)
    p.add_argument("--rate", type=float, default=40.0, metavar="TICKS_PER_S")
    p.add_argument("--port", type=int, default=0, help="embedded Redis port (default: a free one)")
    p.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl+C)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from streamcast.demo import run_demo

    _quiet_tensorflow()
    # a live table on a terminal; with -v, everything as lines (debug logging is the point)
    table = sys.stdout.isatty() and not args.verbose
    with _logs_under_table(table and sys.stderr.isatty()) as tail:
        demo = run_demo(
            symbols=args.symbols,
            rate=args.rate,
            port=args.port,
            seconds=args.seconds,
            table=table,
            notes=lambda: list(tail.lines) if tail is not None else [],
        )
        return asyncio.run(demo)


@contextlib.contextmanager
def _logs_under_table(active: bool) -> Iterator[LogTail | None]:
    """While the live table is on the terminal, log lines go under it (the newest few), not
    across it: lines written below a table redrawn in place would be wiped at the next frame.
    Errors are written out whole (tracebacks too) once the table is done."""
    if not active:
        yield None
        return
    from streamcast.replay import LogTail

    root = logging.getLogger()
    kept = root.handlers[:]
    tail = LogTail()
    tail.setFormatter(logging.Formatter(LOG_FORMAT))
    root.handlers = [tail]
    try:
        yield tail
    finally:
        root.handlers = kept
        for message in tail.errors:
            print(message, file=sys.stderr)


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="exit 0 if the local daemon answers /healthz (or /readyz with --ready): for probes",
        description="For container health checks: GET http://127.0.0.1:STREAMCAST_HTTP_PORT/healthz "
        "(or /readyz), exit 0 on 200 and 1 otherwise with one line saying why.",
    )
    p.add_argument("--ready", action="store_true", help="check /readyz (Redis reachable, serving)")
    p.add_argument("--url", help="base URL (default: http://127.0.0.1:STREAMCAST_HTTP_PORT)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    settings = _settings()
    host = settings.http_host if settings.http_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    base = args.url or f"http://{host}:{settings.http_port}"
    url = base.rstrip("/") + ("/readyz" if args.ready else "/healthz")
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            print(f"ok: {url} answered {response.status}")
            return 0
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")[:300]
        print(f"not ok: {url} answered {exc.code}: {body}", file=sys.stderr)
    except urllib.error.URLError as exc:
        print(f"not ok: {url}: {exc.reason}", file=sys.stderr)
    except OSError as exc:
        print(f"not ok: {url}: {exc}", file=sys.stderr)
    return 1


# -- history, retrain, models ----------------------------------------------------------------


def _add_history(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("history", help="the per-symbol history store that retraining reads")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    imp = verbs.add_parser(
        "import",
        help="load a CSV as a symbol's history (kept: the newest STREAMCAST_HISTORY_MAXLEN)",
    )
    imp.add_argument("file", type=Path)
    imp.add_argument("--symbol", required=True)
    imp.add_argument("--column", help="column of a headed CSV (default: Close)")
    imp.add_argument("--replace", action="store_true", help="drop the symbol's history first")
    imp.add_argument(
        "--allow-non-positive",
        action="store_true",
        help="accept prices <= 0 (only for a model trained with --no-normalise; a normalised "
        "model divides by prices, so by default they must be > 0, as for live ticks)",
    )
    imp.set_defaults(func=_history_import)


def _history_import(args: argparse.Namespace) -> int:
    from streamcast.history import HistoryError, import_series, load_prices
    from streamcast.wire import TickLimits

    settings = _settings()
    # the live edge's rules: one bad price would fail every retrain that reads this history
    limits = TickLimits(
        price_min=settings.price_min,
        price_max=settings.price_max,
        positive=not args.allow_non_positive,
    )
    try:
        series = load_prices(args.file, args.column, limits=limits)
    except HistoryError as exc:
        raise UserError(str(exc)) from None

    async def run(redis: Any) -> int:
        return await import_series(
            redis,
            settings.keys,
            args.symbol,
            series,
            maxlen=settings.history_maxlen,
            replace=args.replace,
            limits=limits,
        )

    try:
        kept = _with_redis(settings, run)
    except HistoryError as exc:
        raise UserError(str(exc)) from None
    note = (
        f" (the newest {kept} of {len(series)}: STREAMCAST_HISTORY_MAXLEN)"
        if kept < len(series)
        else ""
    )
    print(f"imported {kept} prices of {args.file} as the history of {args.symbol}{note}")
    return 0


def _add_retrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain",
        help="retrain once from the history store; promote the candidate if it beats the current",
        description="Takes the cluster-wide retrain lock, trains a candidate in a child process on "
        "the history of every symbol (or --symbols), scores it and the current model on the most "
        "recent part of each symbol's history, and promotes it only if it is better by the "
        "margin. Defaults come from STREAMCAST_RETRAIN_*.",
    )
    p.add_argument("--symbols", help="comma-separated symbols (default: all with history)")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--margin", type=_fraction, help="required relative improvement, e.g. 0.01")
    p.add_argument("--max-points", type=_positive_int, help="newest prices read per symbol")
    p.add_argument("--min-windows", type=_positive_int)
    p.add_argument(
        "--residual",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the candidate as a residual model (default: as the current model)",
    )
    p.add_argument("--time-limit", type=float, metavar="SECONDS")
    p.set_defaults(func=_retrain)


def _retrain(args: argparse.Namespace) -> int:
    from streamcast.registry import Registry
    from streamcast.retrain import Retrainer
    from streamcast.settings import retrain_config
    from streamcast.wire import TickLimits

    settings = _settings()
    if args.learning_rate is not None and not args.learning_rate >= 0:
        raise UserError(f"--learning-rate must be >= 0, got {args.learning_rate}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise UserError(f"--time-limit must be > 0, got {args.time_limit}")
    config = retrain_config(
        settings,
        symbols=tuple(s for s in args.symbols.split(",") if s) if args.symbols else None,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        margin=args.margin,
        max_points=args.max_points,
        min_windows=args.min_windows,
        residual=args.residual,
        time_limit_s=args.time_limit,
        limits=TickLimits(price_min=settings.price_min, price_max=settings.price_max),
    )

    async def run(redis: Any) -> Any:
        keys = settings.keys
        registry = Registry(redis, keys, settings.model_cache_dir)
        retrainer = Retrainer(
            redis,
            keys,
            registry,
            config,
            initial_model=settings.model_path,
            history_url=settings.redis_url,  # the trainer child reads the history itself
        )
        return await retrainer.run_once()

    result = _with_redis(settings, run)
    scores = ", ".join(
        f"{name} {value:.4g}"
        for name, value in (
            ("candidate", result.candidate_mse),
            ("current", result.current_mse),
            ("naive", result.naive_mse),
        )
        if value is not None
    )
    print(
        f"{result.outcome}: {result.reason}"
        + (f" [held-out MSE: {scores}]" if scores else "")
        + (f" -> {result.candidate}" if result.outcome == "promoted" else "")
    )
    return 1 if result.outcome == "failed" else 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the model registry: list, show, add, promote, rollback")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("list", help="every registered version; * marks the current one")
    show = verbs.add_parser("show", help="one version's sidecar (default: the current one)")
    show.add_argument("version", nargs="?")
    add = verbs.add_parser("add", help="register a saved model directory")
    add.add_argument("directory", type=Path)
    add.add_argument("--promote", action="store_true", help="and make it current")
    promote = verbs.add_parser("promote", help="make a registered version current everywhere")
    promote.add_argument("version")
    verbs.add_parser("rollback", help="make the previously promoted version current again")
    log_ = verbs.add_parser("log", help="the newest registry events: retrains, promotions")
    log_.add_argument("--count", type=_positive_int, default=20)
    p.set_defaults(func=_models)


def _models(args: argparse.Namespace) -> int:
    from streamcast.registry import Registry

    settings = _settings()

    async def run(redis: Any) -> None:
        registry = Registry(redis, settings.keys, settings.model_cache_dir)
        current = await registry.current()
        if args.verb == "list":
            rows = await registry.versions()
            if not rows:
                print("no versions registered (the daemon registers its model on first start)")
            for row in rows:
                mark = "*" if current and row.version == current.version else " "
                skill = row.info.test_skill()
                shown = f"test skill {skill:+.3f}" if skill is not None else ""
                source = row.info.data.get("source", "")
                print(f"{mark} {row.version}  {row.info.created}  {shown}  {source}")
        elif args.verb == "show":
            version = args.version or (current.version if current else None)
            if version is None:
                raise UserError("no current version; name one")
            info = await registry.info(version)
            print(json.dumps(dataclasses.asdict(info), indent=2, sort_keys=True))
        elif args.verb == "add":
            info = await registry.register(args.directory)
            print(f"registered {info.version}")
            if args.promote:
                await _promote(registry, info.version)
        elif args.verb == "promote":
            await _promote(registry, args.version)
        elif args.verb == "rollback":
            version = await registry.rollback(reason="models rollback (command line)")
            print(f"rolled back to {version}")
        else:
            for event in await registry.events(args.count):
                print("  ".join(f"{k}={v}" for k, v in event.items()))

    _with_redis(settings, run)
    return 0


async def _promote(registry: Any, version: str) -> None:
    """Fetch (sha256-checked) and load the version before pointing every replica at it."""
    import asyncio

    from streamcast.model import load_model

    path = await registry.fetch(version)
    _quiet_tensorflow()
    await asyncio.get_running_loop().run_in_executor(None, load_model, path)
    await registry.promote(version, reason="promoted from the command line")
    print(f"promoted {version}")


# -- main ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamcast",
        description="Streaming online LSTM forecaster: Redis streams in, batched forecasts out.",
    )
    parser.add_argument("--version", action="version", version=f"streamcast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_demo,
        _add_serve,
        _add_check,
        _add_replay,
        _add_watch,
        _add_experiment,
        _add_train,
        _add_evaluate,
        _add_history,
        _add_retrain,
        _add_models,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _tensorflow_logging(args.verbose)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=LOG_FORMAT,
    )
    func: Callable[[argparse.Namespace], int] = args.func
    from streamcast.model import ModelError
    from streamcast.service import ServeError

    try:
        return func(args)
    except (UserError, DataError, ModelError, ServeError) as exc:
        print(f"streamcast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"streamcast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
