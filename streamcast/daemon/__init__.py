"""The streaming service: read ticks with a consumer group, forecast in batches, publish and ack.

One batch, from read to ack (each step a module of this package)::

    source   XREADGROUP on the partition streams this replica owns: pending entries first
             (from a cursor), then new ones, sized to a byte budget
    plan     validate each entry (a bad one, or one of a symbol outside its partition, becomes
             a dead letter with its reason), push prices into the symbol windows (rebuilt from
             history when missing), conflate when asked
    compute  the engine, off the event loop: a 1-step forecast for every tick with a full
             window, with its calibrated band (``calibration``) -> one Forecast per tick
    sink     one script call, fenced by the partitions' leases: forecasts (entry id = tick
             id), history, dead letters, the acknowledged marks and XACK

A crash anywhere before the publish redelivers the batch; after it the batch is done. On restart
the windows are rebuilt from history, and a redelivered tick already in history is acknowledged
without a second forecast, so none is lost and none is doubled.

Beside the consume loop (``loop``) run the partitions' ownership (``ownership``: leases in
Redis, shared fairly among the live replicas), the path lane (``paths``: the multi-step paths,
after the 1-step forecasts and never before them), housekeeping (heartbeat, lag, gauges, the
calibration saved every few seconds; reclaiming dead consumers' entries every
``claim_interval_s``), trimming (``trim``), and the model watcher and retrain schedule
(``models``). ``batch`` is a batch in flight and the counts, ``config`` the settings as one
type, ``faults`` how an outage is told from a refusal.
"""

from streamcast.daemon.batch import Batch, Stats
from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.loop import Daemon

__all__ = ["Batch", "Daemon", "DaemonConfig", "Stats"]
