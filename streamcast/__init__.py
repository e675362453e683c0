"""streamcast: a streaming online LSTM forecaster.

``from streamcast import Forecaster`` loads TensorFlow on first use only, so that the command line
and the data helpers start instantly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamcast.version import __version__

__all__ = ["Forecaster", "__version__"]

if TYPE_CHECKING:
    from streamcast.forecaster import Forecaster


def __getattr__(name: str) -> Any:
    if name == "Forecaster":
        from streamcast.forecaster import Forecaster

        return Forecaster
    raise AttributeError(f"module 'streamcast' has no attribute {name!r}")
