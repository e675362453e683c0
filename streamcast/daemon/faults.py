"""How the daemon tells Redis outages and Redis refusals apart."""

from __future__ import annotations

from redis import exceptions as redis_errors

from streamcast.connect import REDIS_DOWN as REDIS_DOWN

_REFUSAL_CLASSES = (
    # redis-py turns these replies into classes and drops the code from the message
    (redis_errors.OutOfMemoryError, "OOM"),
    (redis_errors.ReadOnlyError, "READONLY"),
    (redis_errors.ExecAbortError, "EXECABORT"),
    (redis_errors.NoScriptError, "NOSCRIPT"),
)


def refusal(exc: Exception) -> str:
    """The error code of Redis's reply (OOM, READONLY, NOGROUP, WRONGTYPE, ...), else ERR."""
    for cls, code in _REFUSAL_CLASSES:
        if isinstance(exc, cls):
            return code
    said = str(exc)
    # redis-py prefixes a pipeline's errors: "Command # 1 (HGET ...) of pipeline caused error: "
    said = said.split("caused error: ", 1)[-1] if said.startswith("Command # ") else said
    word = said.split(" ", 1)[0]
    return word if word.isupper() and word.isalpha() and len(word) <= 16 else "ERR"


def write_refusal(exc: Exception) -> str:
    """Why Redis refused a write, as a metric label: ``duplicate_id`` for an XADD whose id is not
    after the stream's last (a redelivery, or a stray later entry), else :func:`refusal`'s code
    in lower case."""
    return "duplicate_id" if "equal or smaller" in str(exc) else refusal(exc).lower()
