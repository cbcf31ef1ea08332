"""Which duration of a collective the analyzers read: the device's where there is one, never an
end the NCCL watchdog discovered.

On a GPU the host issues a collective and returns (asynchronous launch); the kernel runs when
the stream reaches it, waits there for the last peer to arrive, transfers, and ends. The
device-side duration (CUDA events around the kernel: NCCL's own timing, or a profiler's kernel
span) is therefore what a blocking collective's host duration is on a CPU backend: time waiting
for late peers plus the transfer, the last to arrive spending least. The host's end of an NCCL
collective is when the watchdog thread noticed it (an upper bound, up to ~100 ms late, varying
from poll to poll): a lateness built on it measures the watchdog. So ``duration_ns`` becomes:

* ``device_duration_ns`` where the row has one;
* null where the end was only seen by the watchdog (``end_source == "watchdog"``): such a row
  still counts as entered and finished (hangs), but says nothing of who came late;
* the host duration otherwise (the rank blocked until done, or a completion callback).
"""

from __future__ import annotations

import polars as pl

#: The columns :func:`with_analysis_durations` reads besides ``duration_ns`` (and drops).
TIMING_COLUMNS = ("device_duration_ns", "end_source")


def with_analysis_durations(events: pl.DataFrame) -> pl.DataFrame:
    """``events`` with ``duration_ns`` as the analyzers should read it (see the module), and
    without :data:`TIMING_COLUMNS`. A frame without them is returned as it is."""
    have = [c for c in TIMING_COLUMNS if c in events.columns]
    if not have or "duration_ns" not in events.columns:
        return events
    dur = pl.col("duration_ns")
    if "end_source" in have:
        dur = pl.when(pl.col("end_source").cast(pl.Utf8) == "watchdog").then(None) \
            .otherwise(dur)
    if "device_duration_ns" in have:
        dur = pl.coalesce(pl.col("device_duration_ns"), dur)
    return events.with_columns(dur.cast(pl.Int64).alias("duration_ns")).drop(have)
