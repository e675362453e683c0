"""The ``streamcast`` command line: a parser and a function for each command.

The commands live by kind: ``tutorial`` (train, evaluate, experiment), ``service`` (serve,
replay, watch, demo, check) and ``ops`` (history import, retrain, models); ``common`` holds
what they share.

Only the two programs configure logging: this one and the retrain trainer, which runs as its own
process (``python -m streamcast.trainer``).

Heavy imports (TensorFlow, matplotlib) happen inside the commands that need them, so ``--help``
and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from streamcast.cli.common import LOG_FORMAT, UserError, _quiet_tensorflow, _tensorflow_logging
from streamcast.cli.ops import _add_history, _add_models, _add_retrain
from streamcast.cli.service import _add_check, _add_demo, _add_replay, _add_serve, _add_watch
from streamcast.cli.tutorial import _add_evaluate, _add_experiment, _add_train
from streamcast.data import DataError
from streamcast.version import __version__

__all__ = ["UserError", "_quiet_tensorflow", "_tensorflow_logging", "build_parser", "main"]

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


class Terminated(SystemExit):
    """SIGTERM (``docker stop``, ``kill``): a command stops as on Ctrl+C, at once. While the
    daemon runs (``serve``, and ``demo`` once its model is loaded) its own handler stands over
    this one and the first SIGTERM stops it in order (drained); this one is back for the
    closing. Installed and removed by :func:`main` alone: code that calls the commands' parts
    directly (tests) gets none."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(128 + signum)


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

    # without a handler, a process 1 (a container's) ignores SIGTERM: `docker stop` would wait
    # out its grace period and kill a replay or a watch
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return func(args)
    except (UserError, DataError, ModelError, ServeError) as exc:
        print(f"streamcast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"streamcast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"streamcast {args.command}: terminated", file=sys.stderr)
        return int(exc.code or 143)
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)
