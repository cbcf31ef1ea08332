"""A collective table (Parquet, CSV, .csv.gz) as input of ``ringwatch analyze``: the required
columns, the defaults, bad rows counted and left out, ringwatch's own segments not claimed."""

from __future__ import annotations

import gzip

import polars as pl
import pytest

from ringwatch._analyze import analyze_job
from ringwatch._schema import polars_schema
from ringwatch.inputs import HEAD_BYTES, open_sources
from ringwatch.inputs._table import READER, open_tables, sniff

T0 = 1_790_000_000_000_000_000
MS = 1_000_000


def _job(world: int = 4, steps: int = 30, late: int | None = None) -> pl.DataFrame:
    """One all-reduce per step on every rank; from the middle step on rank ``late`` arrives
    20 ms after the others, who wait for it."""
    rows = []
    for r in range(world):
        for s in range(steps):
            t = T0 + s * 100 * MS + 40 * MS
            waits = late is not None and s >= steps // 2  # everyone ends with the late one
            end = t + (50 if waits else 30) * MS
            start = t + (20 * MS if waits and r == late else 0)
            rows.append({"rank": r, "pg": "0", "seq": s + 1, "op": "all_reduce",
                         "t_start_ns": start, "t_end_ns": end, "nbytes": 4 << 20})
    return pl.DataFrame(rows)


def _only(path):
    opened = open_sources([str(path)])
    assert len(opened.sources) == 1, (opened.sources, opened.unreadable)
    return opened.sources[0]


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "parquet"])
def test_minimal_columns_in_every_format(tmp_path, fmt):
    df = _job()
    path = tmp_path / f"myjob.{fmt}"
    if fmt == "parquet":
        df.write_parquet(path)
    elif fmt == "csv":
        df.write_csv(path)
    else:
        path.write_bytes(gzip.compress(df.write_csv().encode()))
    src = _only(path)
    assert src.kind == "collective table" and src.job_id == "myjob" and src.problems == []
    ev = src.events()
    assert ev.schema == pl.Schema(polars_schema()) and ev.height == df.height
    row = ev.row(0, named=True)
    # the defaults: derived where the table says enough, constants otherwise
    assert (row["pg_ranks"], row["pg_size"], row["group_rank"], row["world_size"]) == (
        "0-3", 4, 0, 4)
    assert (row["host"], row["status"], row["is_p2p"], row["end_source"]) == (
        "unknown", "ok", False, "wait")
    assert row["t_issue_ns"] == row["mono_start_ns"] == row["t_start_ns"]
    assert row["duration_ns"] == 30 * MS and row["idx"] == 0
    assert ev.filter(pl.col("rank") == 2)["idx"].to_list() == list(range(30))
    assert src.last_write_ns()[0] == df.filter(pl.col("rank") == 0)["t_end_ns"].max()


def test_a_late_rank_is_named_from_a_table(tmp_path):
    path = tmp_path / "j.csv"
    _job(late=3).write_csv(path)
    report = analyze_job(_only(path))
    assert [tuple(f["ranks"]) for f in report["findings"] if f["kind"] == "straggler"] == [(3,)]


def test_pg_ranks_alone_and_idx_alone(tmp_path):
    df = _job().drop("pg", "seq").with_columns(pl.lit("0-3").alias("pg_ranks"),
                                               (pl.col("t_start_ns").rank("ordinal")
                                                .over("rank") + 9).cast(pl.Int64).alias("idx"))
    path = tmp_path / "j.parquet"
    df.write_parquet(path)
    ev = _only(path).events()
    assert set(ev["pg"]) == {"0-3"}
    assert ev.filter(pl.col("rank") == 1)["seq"].to_list() == list(range(1, 31))
    assert ev.filter(pl.col("rank") == 1)["idx"].to_list() == list(range(10, 40))


def test_missing_required_columns_name_them(tmp_path):
    path = tmp_path / "j.csv"
    _job().drop("pg", "seq", "t_end_ns").write_csv(path)
    assert not sniff(tmp_path / "x.csv", b"rank,op\n")
    src = open_tables([path], None)[0]
    assert src.rows is None
    assert src.problems == [f"{path}: not a collective table: no column t_end_ns, pg or "
                            "pg_ranks, seq or idx"]


def test_bad_rows_are_counted_and_named_never_a_crash(tmp_path):
    good = _job(world=2, steps=4).with_columns(pl.all().cast(pl.String))
    bad = pl.DataFrame([
        {"rank": "x", "pg": "0", "seq": "1", "op": "all_reduce", "t_start_ns": "1",
         "t_end_ns": "2", "nbytes": "1"},
        {"rank": "-1", "pg": "0", "seq": "1", "op": "all_reduce", "t_start_ns": "1",
         "t_end_ns": "2", "nbytes": "1"},
        {"rank": "0", "pg": "0", "seq": "9", "op": "all_reduse", "t_start_ns": "1",
         "t_end_ns": "2", "nbytes": "1"},
        {"rank": "0", "pg": "0", "seq": "9", "op": "all_reduce", "t_start_ns": "5",
         "t_end_ns": "2", "nbytes": "1"},
        {"rank": "0", "pg": "0", "seq": "1.5", "op": "all_reduce", "t_start_ns": "1",
         "t_end_ns": "2", "nbytes": "1"},
        {"rank": "1", "pg": "0", "seq": "9", "op": "all_reduce", "t_start_ns": "",
         "t_end_ns": "2", "nbytes": "1"},
        {"rank": "1", "pg": "0", "seq": "9", "op": "all_reduce",
         "t_start_ns": "99999999999999999999999", "t_end_ns": "2", "nbytes": "1"},
    ])
    path = tmp_path / "j.csv"
    pl.concat([good, bad]).write_csv(path)
    src = _only(path)
    assert src.events().height == good.height
    text = "\n".join(src.problems)
    for reason in ("rank missing or not a Int32", "rank out of range",
                   "op not one of ringwatch.OPS", "t_end_ns before t_start_ns",
                   "seq not a Int64", "t_start_ns missing or not a Int64"):
        assert reason in text, text
    assert "2 row(s) left out: t_start_ns missing" in text
    assert "(first: row 9)" in text  # the header is not a row: row 9 is the first bad one


def test_pending_rows_and_a_foreign_column(tmp_path):
    df = _job(world=2, steps=3).with_columns(
        pl.when(pl.col("seq") == 3).then(None).otherwise(pl.col("t_end_ns")).alias("t_end_ns"),
        pl.lit("x").alias("comment"))
    path = tmp_path / "j.parquet"
    df.write_parquet(path)
    src = _only(path)
    ev = src.events()
    assert ev.filter(pl.col("seq") == 3)["status"].to_list() == ["pending", "pending"]
    assert src.events(include_pending=False).height == 4
    assert src.problems == [f"{path}: column(s) comment not in the schema, ignored"]


def test_jobs_by_job_id_and_one_job_over_files(tmp_path):
    df = _job(world=2, steps=3)
    df.filter(pl.col("rank") == 0).write_csv(tmp_path / "part-0.csv")
    df.filter(pl.col("rank") == 1).with_columns(pl.lit("part-0").alias("job_id")).write_csv(
        tmp_path / "part-1.csv")
    both = df.with_columns(pl.when(pl.col("rank") == 0).then(pl.lit("a"))
                           .otherwise(pl.lit("b")).alias("job_id"))
    both.write_parquet(tmp_path / "two.parquet")
    opened = open_sources([str(tmp_path)])
    jobs = {s.job_id: sorted(s.ranks) for s in opened.sources}
    assert jobs == {"part-0": [0, 1], "a": [0], "b": [1]}, jobs
    only = open_sources([str(tmp_path)], job_id="a").sources
    assert [s.job_id for s in only] == ["a"]


def test_a_ringwatch_segment_is_not_a_table(tmp_path):
    path = tmp_path / "seg-00000001.parquet"
    df = _job(world=1, steps=1)
    df.write_parquet(path, metadata={"ringwatch_schema_version": "1.0"})
    assert not sniff(path, path.read_bytes()[:HEAD_BYTES])
    other = tmp_path / "t.parquet"
    df.write_parquet(other)
    assert sniff(other, other.read_bytes()[:HEAD_BYTES]) and READER.kind == "collective table"
    gz = tmp_path / "t.csv.gz"
    gz.write_bytes(gzip.compress(df.write_csv().encode()))
    assert sniff(gz, gz.read_bytes()[:HEAD_BYTES])


def test_an_unreadable_table_is_a_problem(tmp_path):
    path = tmp_path / "j.parquet"
    path.write_bytes(b"PAR1 not really")
    src = open_tables([path], None)[0]
    assert src.rows is None and "unreadable" in src.problems[0]
