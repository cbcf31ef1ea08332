"""The online window's per-step frames kept across a restart of the service, and the send/recv
table it keeps beside its rows.

A window's state (:meth:`~ringwatch.analyzers._online.OnlineWindow.state`) carries, besides
its baselines, the newest steps of a pipeline's step and blocked times and of its receive table
(:func:`~ringwatch.analyzers._p2p_links.receive_table`): a window reopened after a restart
judges the steps it held, not only those after it (an onset just before the restart stays where
it was). Each is written as columns, bounded to :data:`STATE_ROWS` rows (the newest whole steps
that fit), and read back checked: the columns of its schema, of one length, no missing or
negative number (a host name may be missing: one the service has not heard of).
"""

from __future__ import annotations

import polars as pl

from ringwatch.analyzers._p2p_links import RECV_SCHEMA

#: Rows a state keeps of each frame: every step of the window up to 1,024 ranks (a pipeline's
#: step times; fewer with several send/recv peers), the newest steps that fit beyond.
STATE_ROWS = 65_536

WORK_SCHEMA = {"rank": pl.Int32, "step": pl.Int64, "step_ms": pl.Float64,
               "blocked_ms": pl.Float64, "work_ms": pl.Float64}


def frame_state(df: pl.DataFrame | None, schema: dict) -> dict | None:
    """``df``'s newest whole steps that fit in :data:`STATE_ROWS` rows, as columns (None for
    no rows)."""
    if df is None or df.is_empty():
        return None
    per_step = df.group_by("step").len().sort("step", descending=True)
    fits = per_step.filter(pl.col("len").cum_sum() <= STATE_ROWS)["step"]
    kept = df.filter(pl.col("step").is_in(fits.implode()))
    return {c: kept[c].to_list() for c in schema}


def frame_from_state(cols, schema: dict, what: str) -> pl.DataFrame | None:
    """The frame :func:`frame_state` wrote; ``ValueError`` on anything else."""
    if cols is None:
        return None
    if not isinstance(cols, dict) or set(cols) != set(schema) \
            or len({len(v) if isinstance(v, list) else -1 for v in cols.values()}) != 1 \
            or len(next(iter(cols.values()))) > STATE_ROWS:
        raise ValueError(f"{what}: not the columns of a window's {what}")
    frame = pl.DataFrame(cols, schema=schema, strict=True)
    if frame.is_empty():
        return None
    # numbers: none missing, none negative; names (a host) may be missing (unknown)
    numbers = [c for c, t in schema.items() if t.is_numeric()]
    lowest = frame.select(pl.min_horizontal(*numbers).min())
    if frame.select(numbers).null_count().sum_horizontal().item() or lowest.item() < 0:
        raise ValueError(f"{what}: missing or negative values")
    return frame.sort(*[c for c in ("rank", "peer", "step") if c in schema])


def merge_steps(old: pl.DataFrame | None, new: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """``new`` over ``old``: a row whose ``keys`` were seen before replaces it."""
    if old is None:
        return new
    return pl.concat([old.join(new.select(keys), on=keys, how="anti"), new],
                     how="vertical_relaxed")


def recv_frame(recv: pl.DataFrame) -> pl.DataFrame:
    """A receive table in :data:`~ringwatch.analyzers._p2p_links.RECV_SCHEMA` (the columns
    cast, others dropped)."""
    return recv.select([pl.col(c).cast(t) for c, t in RECV_SCHEMA.items()])


__all__ = ["RECV_SCHEMA", "STATE_ROWS", "WORK_SCHEMA", "frame_from_state", "frame_state",
           "merge_steps", "recv_frame"]
