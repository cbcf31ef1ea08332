"""A :class:`~ringwatch.inputs.Source` over rows already in memory, in the event schema.

The readers of other tools' files (profiler traces, collective tables) turn what they read into
one polars frame of the schema's columns; :class:`FrameSource` serves it as
:meth:`JobLogs.events <ringwatch._logs.JobLogs.events>` serves ringwatch's own logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringwatch._schema import polars_schema


def empty_frame():
    """No rows, every column of the schema."""
    import polars as pl

    return pl.DataFrame(schema=polars_schema())


def conform(df):
    """``df`` with exactly the schema's columns, types and order (missing ones null)."""
    import polars as pl

    schema = polars_schema()
    return df.select([pl.col(c).cast(t) if c in df.columns else pl.lit(None, t).alias(c)
                      for c, t in schema.items()])


@dataclass
class FrameSource:
    """One job's rows, read from files that are not ringwatch logs.

    Attributes:
        kind: What was read (``"profiler traces"``, ``"collective table"``).
        path: The folder (or first file) read.
        job_id: The job's id.
        ranks: ``rank -> the file it came from``.
        problems: One line per file, or part of one, that could not be used.
        rows: The rows in the schema (every column), sorted by (rank, idx).
        last_ns: ``rank -> wall ns`` of the newest time the input shows for the rank.
    """

    kind: str
    path: Path
    job_id: str
    ranks: dict[int, Any]
    problems: list[str] = field(default_factory=list)
    rows: Any = None
    last_ns: dict[int, int] = field(default_factory=dict)

    def events(self, *, include_pending: bool = True, columns: list[str] | None = None,
               categorical: bool = False):
        """All ranks' rows, by (rank, idx); see :meth:`ringwatch._logs.JobLogs.events`.

        Raises:
            ValueError: ``columns`` names a column the schema does not have.
        """
        import polars as pl

        df = empty_frame() if self.rows is None else self.rows
        if not include_pending:
            df = df.filter(pl.col("status") != "pending")
        if columns is not None:
            unknown = set(columns) - set(polars_schema())
            if unknown:
                raise ValueError(f"not columns of the schema: {sorted(unknown)}")
            keep = dict.fromkeys(("rank", "idx", *columns))
            df = df.select([c for c in polars_schema() if c in keep])
        if categorical:
            strings = [c for c, t in df.schema.items() if t == pl.String]
            df = df.with_columns(pl.col(strings).cast(pl.Categorical))
        return df

    def last_write_ns(self) -> dict[int, int]:
        """``rank -> wall ns`` of the newest time the input shows for each rank."""
        return dict(self.last_ns)


__all__ = ["FrameSource", "conform", "empty_frame"]
