"""A collective table (Parquet, CSV or gzipped CSV) in the event schema, from any tool.

The columns are the schema's (``docs/schema.md``); only a few are required, the rest have
defaults (``docs/inputs.md``, "Collective table"):

- required: ``rank``, ``op``, ``t_start_ns``, ``t_end_ns`` (null for a collective that never
  finished), ``pg`` or ``pg_ranks``, ``seq`` or ``idx``;
- derived when absent: ``pg`` from ``pg_ranks`` and ``pg_ranks`` from the ranks seen in the
  group, ``pg_size`` and ``group_rank`` from ``pg_ranks``, ``idx`` from each rank's start
  times, ``seq`` counted per rank and group in ``idx`` order (from 1: the table must then
  start at the same collective on every rank), ``is_p2p`` from ``op``, ``t_issue_ns`` and
  ``mono_*`` from the wall times, ``duration_ns``, ``nbytes`` from ``nbytes_in``/``out``,
  ``status`` (``ok``, or ``pending`` with no end), ``world_size`` (the highest rank + 1);
- constant when absent: ``job_id`` (the file's name), ``host`` (``unknown``: one host,
  so no host is blamed), ``pid`` 0, ``backend`` and ``api`` (``table``), ``end_source``
  ``wait``.

Rows with a value that is not of its column's type or range are left out, counted per
reason in the source's ``problems``; they never reach the analyzers.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

from ringwatch._schema import (
    END_SOURCES,
    OPS,
    STATUSES,
    format_ranks,
    parse_ranks,
    polars_schema,
)
from ringwatch.inputs import Reader
from ringwatch.inputs._rows import FrameSource, conform

KIND = "collective table"
REQUIRED = ("rank", "op", "t_start_ns", "t_end_ns")
ONE_OF = (("pg", "pg_ranks"), ("seq", "idx"))
#: Columns whose every row must have a value.
NOT_NULL = ("rank", "op", "t_start_ns")
_INT32_MAX = (1 << 31) - 1


def _problem_rows(df, bad, reason: str, path: Path, problems: list[str]):
    """``df`` without the rows where ``bad`` holds; a line in ``problems`` if any."""
    import polars as pl

    mask = df.select(bad.fill_null(False).alias("_bad"))["_bad"]  # null: nothing to check
    n = int(mask.sum())
    if n:
        first = df.filter(mask).select(pl.col("_row").first()).item()
        problems.append(f"{path}: {n} row(s) left out: {reason} (first: row {first})")
        df = df.filter(~mask)
    return df


def _read(path: Path):
    """The file as a frame of strings (CSV) or its own types (Parquet)."""
    import polars as pl

    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PAR1":
        return pl.read_parquet(path, glob=False)
    if head[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as f:
            data = f.read()
        return pl.read_csv(io.BytesIO(data), infer_schema=False)
    return pl.read_csv(path, infer_schema=False)


def read_table(path: Path, problems: list[str]):
    """One file's valid rows in the schema (``job_id`` as the file gives it, else null).

    Returns:
        A frame, or None where the file cannot be used at all (the reason in ``problems``).
    """
    import polars as pl

    schema = polars_schema()
    try:
        df = _read(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
        problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
        return None
    missing = [c for c in REQUIRED if c not in df.columns]
    missing += [" or ".join(pair) for pair in ONE_OF if not any(c in df.columns for c in pair)]
    if missing:
        problems.append(f"{path}: not a collective table: no column {', '.join(missing)}")
        return None
    extra = [c for c in df.columns if c not in schema]
    df = df.select([c for c in df.columns if c in schema]).with_row_index("_row", offset=1)
    given = set(df.columns)
    # Types: every value cast (a value that does not cast is a bad row, not a crash).
    casts = []
    for c in given - {"_row"}:
        t = schema[c]
        col = pl.col(c)
        if df.schema[c] == pl.String and t == pl.Boolean:
            col = col.str.to_lowercase().replace_strict(
                {"true": True, "1": True, "false": False, "0": False}, default=None,
                return_dtype=pl.Boolean)
        elif df.schema[c] == pl.String and t != pl.String:
            text = col.str.strip_chars()
            num = text.cast(pl.Float64, strict=False)  # "3.0" is 3; 1.5 is no rank
            num = pl.when((num == num.round()) & (num.abs() < 2.0**53)).then(num)
            col = pl.coalesce(text.str.to_integer(strict=False), num.cast(pl.Int64))
        casts.append(pl.col(c).alias(f"_raw_{c}"))
        casts.append(col.cast(t, strict=False).alias(c))
    df = df.with_columns(casts)
    for c in sorted(given - {"_row"}):
        raw = pl.col(f"_raw_{c}")
        bad_cast = raw.is_not_null() & pl.col(c).is_null()
        if df.schema[f"_raw_{c}"] == pl.String:
            bad_cast = bad_cast & (raw.str.strip_chars() != "")
        reason = f"{c} not a {schema[c]}"
        if c in NOT_NULL:
            bad_cast = bad_cast | pl.col(c).is_null()
            reason = f"{c} missing or not a {schema[c]}"
        df = _problem_rows(df, bad_cast, reason, path, problems)
    df = df.drop([c for c in df.columns if c.startswith("_raw_")])
    # Values.
    checks = [
        (pl.col("rank").is_between(0, _INT32_MAX).not_(), "rank out of range"),
        (pl.col("op").is_in(list(OPS)).not_(), "op not one of ringwatch.OPS"),
        (pl.col("t_end_ns") < pl.col("t_start_ns"), "t_end_ns before t_start_ns"),
    ]
    if "seq" in given:
        checks.append((pl.col("seq") < 0, "negative seq"))
    if "seq" in given and "idx" not in given:
        checks.append((pl.col("seq").is_null(), "no seq (and no idx)"))
    if "idx" in given:
        checks.append((pl.col("idx") < 0, "negative idx"))
        checks.append((pl.col("idx").is_duplicated().over("rank"), "(rank, idx) repeated"))
    if "status" in given:
        checks.append((pl.col("status").is_in(list(STATUSES)).not_(),
                       "status not one of ringwatch.STATUSES"))
    if "end_source" in given:
        checks.append((pl.col("end_source").is_in(list(END_SOURCES)).not_(),
                       "end_source not one of ringwatch.END_SOURCES"))
    if "pg" not in given:
        checks.append((pl.col("pg_ranks").is_null(), "no pg_ranks (and no pg)"))
    for bad, reason in checks:
        df = _problem_rows(df, bad, reason, path, problems)
    if "pg_ranks" in given:
        ok_ranks = []
        for spec, rank in df.select("pg_ranks", "rank").iter_rows():
            try:
                ok_ranks.append(spec is None or rank in set(parse_ranks(spec)))
            except ValueError:
                ok_ranks.append(False)
        df = _problem_rows(df, pl.Series(ok_ranks, dtype=pl.Boolean).not_(),
                           "pg_ranks unreadable or without the row's rank", path, problems)
    if extra:
        problems.append(f"{path}: column(s) {', '.join(extra)} not in the schema, ignored")
    return _defaults(df, given, path)


def _defaults(df, given: set[str], path: Path):
    """The schema's columns the file left out, derived or constant (see the module doc)."""
    import polars as pl

    df = df.drop("_row")
    if "pg" not in given:
        df = df.with_columns(pl.col("pg_ranks").alias("pg"))
    if "pg_ranks" not in given:
        members = df.group_by("pg").agg(pl.col("rank").unique().sort())
        df = df.join(members.select("pg", pl.col("rank").map_elements(
            lambda rs: format_ranks(rs.to_list()), return_dtype=pl.String).alias("pg_ranks")),
            on="pg", how="left")
    else:
        df = df.with_columns(pl.col("pg_ranks").fill_null(pl.col("pg")))
    ranks = df.select("pg_ranks").unique()["pg_ranks"].to_list()
    lists = {s: parse_ranks(s) for s in ranks if s is not None}
    if "pg_size" not in given:
        df = df.with_columns(pl.col("pg_ranks").replace_strict(
            {s: len(r) for s, r in lists.items()}, default=None, return_dtype=pl.Int32)
            .alias("pg_size"))
    if "group_rank" not in given:
        df = df.with_columns(pl.struct("pg_ranks", "rank").map_elements(
            lambda s: lists[s["pg_ranks"]].index(s["rank"]), return_dtype=pl.Int32)
            .alias("group_rank"))
    if "is_p2p" not in given:
        df = df.with_columns(pl.col("op").is_in(["send", "recv"]).alias("is_p2p"))
    if "idx" not in given:
        df = df.with_columns(pl.col("t_start_ns").rank("ordinal").over("rank").sub(1)
                             .cast(pl.Int64).alias("idx"))
    if "seq" not in given:
        df = df.sort("rank", "idx").with_columns(
            pl.when(~pl.col("is_p2p")).then(pl.int_range(1, pl.len() + 1)
                                            .over("rank", "pg", "is_p2p"))
            .otherwise(None).cast(pl.Int64).alias("seq"))
    fills = {
        "host": pl.lit("unknown"), "pid": pl.lit(0), "backend": pl.lit("table"),
        "api": pl.lit("table"), "end_source": pl.lit("wait"),
        "t_issue_ns": pl.col("t_start_ns"), "mono_start_ns": pl.col("t_start_ns"),
        "mono_end_ns": pl.col("t_end_ns"),
        "duration_ns": pl.col("t_end_ns") - pl.col("t_start_ns"),
        "status": pl.when(pl.col("t_end_ns").is_null()).then(pl.lit("pending"))
        .otherwise(pl.lit("ok")),
        "world_size": pl.col("rank").max() + 1,
    }
    if "nbytes" not in given and ("nbytes_in" in given or "nbytes_out" in given):
        fills["nbytes"] = pl.max_horizontal([pl.col(c) for c in ("nbytes_in", "nbytes_out")
                                             if c in given])
    df = df.with_columns([(e.alias(c) if c not in given else pl.col(c).fill_null(e))
                          for c, e in fills.items()])
    return conform(df)


def open_tables(files: list[Path], job_id: str | None) -> list[FrameSource]:
    """The tables as sources: one per job id (the ``job_id`` column, else the file's name).

    Rows of one job spread over several files (one per rank, say) make one source; a
    (rank, idx) given twice keeps the first file's row.
    """
    import polars as pl

    problems: list[str] = []  # of files that gave no row
    per_job: dict[str, list[str]] = {}
    frames = []
    first_file: dict[str, Path] = {}
    for f in sorted(Path(p) for p in files):
        mine: list[str] = []
        df = read_table(f, mine)
        if df is None or df.height == 0:
            problems += mine
            continue
        stem = f.name.split(".")[0]
        df = df.with_columns(pl.col("job_id").fill_null(pl.lit(stem)))
        for jid in df["job_id"].unique().to_list():
            first_file.setdefault(jid, f)
            per_job.setdefault(jid, []).extend(mine)
        frames.append(df)
    if not frames:
        if not problems:
            return []
        return [FrameSource(KIND, Path(files[0]), job_id or Path(files[0]).name.split(".")[0],
                            {}, problems)]
    df = pl.concat(frames, how="vertical")
    if job_id is not None and (df["job_id"] == job_id).any():
        df = df.filter(pl.col("job_id") == job_id)
    out = []
    for (jid,), rows in df.partition_by("job_id", as_dict=True, maintain_order=True).items():
        dup = rows.select(pl.struct("rank", "idx").is_duplicated())["rank"]
        if dup.any():
            n = int(rows.select(pl.struct("rank", "idx").is_first_distinct().not_().sum())
                    .item())
            per_job[jid].append(f"job {jid}: {n} row(s) repeat a (rank, idx) of an earlier file; "
                            "left out")
            rows = rows.unique(["rank", "idx"], keep="first", maintain_order=True)
        rows = rows.sort("rank", "idx")
        last = dict(rows.group_by("rank").agg(pl.col("t_end_ns").max()).drop_nulls()
                    .iter_rows())
        ranks = {r: first_file[jid] for r in rows["rank"].unique().sort().to_list()}
        out.append(FrameSource(KIND, first_file[jid], jid, ranks, problems + per_job[jid], rows,
                               last))
    return out


def _text_head(head: bytes) -> bytes:
    if head[:2] == b"\x1f\x8b":
        try:
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head)
        except zlib.error:
            return b""
    return head


def sniff(path: Path, head: bytes) -> bool:
    """A Parquet file with the required columns (not a ringwatch log segment), or a CSV
    (``.csv``, ``.csv.gz``) whose header names them."""
    name = path.name.lower()
    if head[:4] == b"PAR1" or name.endswith(".parquet"):
        import polars as pl

        try:
            if "ringwatch_schema_version" in pl.read_parquet_metadata(path):
                return False  # a segment of ringwatch's own logs, read as such
            cols = set(pl.read_parquet_schema(path))
        except Exception:  # noqa: BLE001 - not a Parquet file after all
            return False
    elif name.endswith((".csv", ".csv.gz")):
        line = _text_head(head).split(b"\n", 1)[0].decode("utf-8", "replace")
        cols = {c.strip().strip('"') for c in line.split(",")}
    else:
        return False
    return {"rank", "op", "t_start_ns"} <= cols


READER = Reader(kind=KIND, sniff=sniff, open=open_tables)

__all__ = ["ONE_OF", "READER", "REQUIRED", "open_tables", "read_table", "sniff"]
