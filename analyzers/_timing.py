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

Where some rows are not timed by the host (a device duration, or an end only the watchdog
saw), the frame also gets ``host_timed``: whether a row's host interval (``mono_start_ns`` to
``mono_end_ns``) is its time in the op. The time a rank spent blocked per step
(:func:`~ringwatch.analyzers._work.compute_step_work`) adds such rows' device durations
instead, and the what-if replay, which runs on host intervals, stands aside.
"""

from __future__ import annotations

import polars as pl

#: The columns :func:`with_analysis_durations` reads besides ``duration_ns`` (and drops).
TIMING_COLUMNS = ("device_duration_ns", "end_source")
#: The column :func:`with_analysis_durations` adds where some rows are not timed by the host.
HOST_TIMED = "host_timed"


def with_analysis_durations(events: pl.DataFrame) -> pl.DataFrame:
    """``events`` with ``duration_ns`` as the analyzers should read it (see the module), and
    without :data:`TIMING_COLUMNS`. A frame without them is returned as it is."""
    have = [c for c in TIMING_COLUMNS if c in events.columns]
    if not have or "duration_ns" not in events.columns:
        return events
    dur, host = pl.col("duration_ns"), pl.lit(True)
    if "end_source" in have:
        # a categorical compares as it is (a cast would make a string of every row)
        watchdog = (pl.col("end_source") == "watchdog").fill_null(False)
        dur = pl.when(watchdog).then(None).otherwise(dur)
        host = ~watchdog
    if "device_duration_ns" in have:
        dur = pl.coalesce(pl.col("device_duration_ns"), dur)
        host = host & pl.col("device_duration_ns").is_null()
    out = events.with_columns(dur.cast(pl.Int64).alias("duration_ns"),
                              host.alias(HOST_TIMED)).drop(have)
    return out if not out[HOST_TIMED].all() else out.drop(HOST_TIMED)


def host_timed(events: pl.DataFrame) -> pl.Expr:
    """Whether a row's host interval is its time in the op (see the module)."""
    return pl.col(HOST_TIMED) if HOST_TIMED in events.columns else pl.lit(True)
