"""The operators' commands: ``history import``, ``retrain`` and ``models``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from streamcast.cli.common import (
    UserError,
    _fraction,
    _positive_int,
    _quiet_tensorflow,
    _settings,
    _with_redis,
)

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
        # only where it is shown: a broken current entry must not stop its repair (promote)
        shown = args.verb == "list" or (args.verb == "show" and not args.version)
        current = await registry.current() if shown else None
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
