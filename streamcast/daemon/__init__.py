"""The streaming service: read ticks with a consumer group, forecast in batches, publish and ack.

One batch, from read to ack (each step a module of this package)::

    source   XREADGROUP: own pending entries first, then new ones (sized to a byte budget)
    plan     validate each entry (bad ones become dead letters), drop other shards' symbols,
             push prices into the symbol windows (rebuilt from history when missing), and
             choose the symbols whose multi-step path is due
    compute  the engine, off the event loop: a 1-step forecast for every tick with a full
             window, a path for the due ones -> one Forecast per tick
    sink     one atomic script call, fenced by the leases: forecasts (entry id = tick id),
             history, dead letters, the acknowledged mark and XACK

A crash anywhere before the publish redelivers the batch; after it the batch is done. On restart
the windows are rebuilt from history, and a redelivered tick already in history is acknowledged
without a second forecast, so none is lost and none is doubled.

Beside the loop (``loop``) run the lease keeper (``leasing``: one live consumer per group),
housekeeping (heartbeat, lag, reclaiming), trimming (``trim``), the model watcher and the retrain
schedule (``models``).
"""

from streamcast.daemon.batch import Batch, Stats
from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.loop import Daemon

__all__ = ["Batch", "Daemon", "DaemonConfig", "Stats"]
