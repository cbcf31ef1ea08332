"""Segments on disk and reading them back: compaction, crash leftovers, pending, bad files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest

from ringwatch._clock import FakeClock
from ringwatch._logs import (
    META_FILE,
    PENDING_FILE,
    LogError,
    list_jobs,
    open_job,
    rank_dirs,
    read_events,
    select_segments,
)
from ringwatch._schema import COLUMN_NAMES, SCHEMA_VERSION, polars_schema
from ringwatch.agent.capture._writer import SegmentWriter, events_to_columns, rank_dir

from fakes import JOB, group, identity, issue_collective, issue_p2p, recorder

WALL0 = 1_700_000_000_000_000_000
MONO0 = 1_000_000_000


class Rank:
    """One rank's recorder and writer on a shared fake clock."""

    def __init__(self, log_dir: Path, rank: int = 0, *, compact_segments: int = 32,
                 job_id: str = JOB):
        self.clock = FakeClock(mono_ns=MONO0, wall_ns=WALL0)
        self.rec = recorder(rank=rank, clock=self.clock)
        self.rec.identity = identity(rank, job_id=job_id)
        self.g = group(self.rec, group_rank=rank)
        self.dir = rank_dir(log_dir, job_id, rank)
        self.writer = SegmentWriter(self.dir, self.rec.identity,
                                    compact_segments=compact_segments, clock=self.clock)

    def run(self, n: int, dur_ns: int = 1_000):
        evs = []
        for _ in range(n):
            ev = issue_collective(self.rec, self.g)
            self.clock.advance(dur_ns)
            self.rec.end(ev)
            self.clock.advance(10)
            evs.append(ev)
        return evs

    def flush(self):
        return self.writer.write(self.rec.drain())


def seg_names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("seg-"))


# ---- writer ------------------------------------------------------------------------------------


def test_rank_dir_layout(tmp_path):
    assert rank_dir(tmp_path, "j", 3) == tmp_path / "j" / "rank-00003"


def test_events_to_columns_times_and_sizes_come_from_the_fake_clock(tmp_path):
    r = Rank(tmp_path)
    (ev,) = r.run(1, dur_ns=2_500)
    ev.device_ns = 1_111
    cols = events_to_columns([ev], r.rec.identity, WALL0 - MONO0)
    assert list(cols) == list(COLUMN_NAMES)
    one = {k: v[0] for k, v in cols.items()}
    assert one["t_issue_ns"] == one["t_start_ns"] == WALL0
    assert one["t_end_ns"] == WALL0 + 2_500
    assert one["mono_start_ns"] == MONO0 and one["mono_end_ns"] == MONO0 + 2_500
    assert one["duration_ns"] == 2_500
    assert one["device_duration_ns"] == 1_111
    assert one["nbytes"] == 400 and one["seq"] == 1 and one["idx"] == 0
    assert one["pg"] == "0" and one["pg_ranks"] == "0-1" and one["pg_size"] == 2
    assert one["job_id"] == JOB and one["host"] == "host-a" and one["pid"] == 4242
    assert one["status"] == "ok" and one["end_source"] == "wait"


def test_events_to_columns_unfinished_and_timeless_rows(tmp_path):
    r = Rank(tmp_path)
    ev = issue_collective(r.rec, r.g)  # still pending
    lost = r.rec.unseen_event(r.g, "unknown", "flight_recorder", seq=9, idx=None,
                              mono_start=None)
    s = issue_p2p(r.rec, r.g, "send", 1, nbytes=64)
    cols = events_to_columns([ev, lost, s], r.rec.identity, WALL0 - MONO0)
    assert cols["t_end_ns"][0] is None and cols["duration_ns"][0] is None
    assert cols["status"][0] == "pending"
    assert cols["t_issue_ns"][1] is None and cols["t_start_ns"][1] is None
    assert cols["nbytes_in"][2] == 64 and cols["nbytes_out"][2] == 0 and cols["nbytes"][2] == 64
    assert cols["peer"][2] == 1 and cols["is_p2p"][2] is True


def test_segment_frame_has_the_schema(tmp_path):
    r = Rank(tmp_path)
    r.run(2)
    path = r.flush()
    assert path.name == "seg-00000001.parquet"
    df = pl.read_parquet(path)
    assert dict(df.schema) == polars_schema()
    assert pl.read_parquet_metadata(path)["ringwatch_schema_version"] == SCHEMA_VERSION


def test_write_nothing_writes_no_file(tmp_path):
    r = Rank(tmp_path)
    assert r.writer.write([]) is None
    assert not r.dir.exists()


def test_segments_compact_and_read_back_once_in_idx_order(tmp_path):
    r = Rank(tmp_path, compact_segments=3)
    for _ in range(7):
        r.run(2)
        r.flush()
    # 1..3 and 4..6 were merged; 7 waits for more.
    assert seg_names(r.dir) == ["seg-00000001-00000003.parquet",
                                "seg-00000004-00000006.parquet", "seg-00000007.parquet"]
    assert r.writer.rows_written == 14
    df = open_job(tmp_path).events()
    assert df["idx"].to_list() == list(range(14))
    assert df["seq"].to_list() == list(range(1, 15))
    assert df["duration_ns"].to_list() == [1_000] * 14
    assert df["t_start_ns"][1] - df["t_start_ns"][0] == 1_010
    merged = pl.read_parquet(r.dir / "seg-00000001-00000003.parquet")
    assert merged["idx"].to_list() == list(range(6))
    assert (pl.read_parquet_metadata(r.dir / "seg-00000004-00000006.parquet")
            ["ringwatch_schema_version"] == SCHEMA_VERSION)


def test_out_of_order_finish_is_written_in_idx_order(tmp_path):
    r = Rank(tmp_path)
    a = issue_collective(r.rec, r.g)
    b = issue_collective(r.rec, r.g)
    r.rec.end(b)
    r.rec.end(a)
    r.flush()
    assert pl.read_parquet(r.dir / "seg-00000001.parquet")["idx"].to_list() == [0, 1]


def test_explicit_compact_needs_two_segments(tmp_path):
    r = Rank(tmp_path)
    r.run(1)
    r.flush()
    assert r.writer.compact() is None
    r.run(1)
    r.flush()
    out = r.writer.compact()
    assert out.name == "seg-00000001-00000002.parquet"
    assert seg_names(r.dir) == [out.name]


def test_a_new_writer_continues_the_numbering(tmp_path):
    r = Rank(tmp_path, compact_segments=2)
    for _ in range(3):
        r.run(1)
        r.flush()
    again = SegmentWriter(r.dir, r.rec.identity, clock=r.clock)
    r.run(1)
    assert again.write(r.rec.drain()).name == "seg-00000004.parquet"


def test_crash_leftovers_never_duplicate_rows(tmp_path):
    r = Rank(tmp_path, compact_segments=100)
    for _ in range(4):
        r.run(3)
        r.flush()
    saved = {n: (r.dir / n).read_bytes() for n in seg_names(r.dir)}
    r.writer.compact()
    # A crash between writing the range file and deleting its parts: some parts remain.
    for n in ("seg-00000002.parquet", "seg-00000004.parquet"):
        (r.dir / n).write_bytes(saved[n])
    r.run(3)
    r.flush()  # the next segment after the range
    names = [p.name for p in r.dir.iterdir()]
    assert select_segments(names) == ["seg-00000001-00000004.parquet", "seg-00000005.parquet"]
    job = open_job(tmp_path)
    df = job.events()
    assert df["idx"].to_list() == list(range(15))
    assert df.height == 15
    assert job.problems == []


def test_select_segments_pure():
    names = ["seg-00000001.parquet", "seg-00000002.parquet", "seg-00000001-00000002.parquet",
             "seg-00000003.parquet", "seg-00000003-00000010.parquet", "seg-00000011.parquet",
             "pending.parquet", "meta.json", ".seg-00000012.parquet.1.tmp", "seg-1.parquet",
             "seg-00000012.parquet.bak"]
    assert select_segments(names) == ["seg-00000001-00000002.parquet",
                                      "seg-00000003-00000010.parquet", "seg-00000011.parquet"]
    assert select_segments([]) == []
    assert select_segments(["seg-00000005.parquet", "seg-00000002.parquet"]) == [
        "seg-00000002.parquet", "seg-00000005.parquet"]


def test_pending_rows_are_merged_only_when_not_in_a_segment(tmp_path):
    r = Rank(tmp_path)
    done = r.run(2)
    hung = issue_collective(r.rec, r.g)
    late = issue_collective(r.rec, r.g)
    r.flush()
    r.writer.write_pending(r.rec.pending_snapshot())
    assert (r.dir / PENDING_FILE).exists()
    # `late` finished and reached a segment, but the process died before the pending
    # snapshot was replaced: it is in both files.
    r.clock.advance(500)
    r.rec.end(late)
    r.flush()
    df = open_job(tmp_path).events()
    assert df["idx"].to_list() == [done[0].idx, done[1].idx, hung.idx, late.idx]
    by_idx = dict(zip(df["idx"].to_list(), df["status"].to_list(), strict=True))
    assert by_idx[hung.idx] == "pending" and by_idx[late.idx] == "ok"
    assert df.filter(pl.col("idx") == hung.idx)["t_end_ns"][0] is None
    without = open_job(tmp_path).events(include_pending=False)
    assert without["idx"].to_list() == [0, 1, late.idx]


def test_pending_alone_is_read_and_removed_when_nothing_is_pending(tmp_path):
    r = Rank(tmp_path)
    ev = issue_collective(r.rec, r.g)
    r.writer.write_pending(r.rec.pending_snapshot())
    df = read_events(tmp_path)
    assert df["idx"].to_list() == [ev.idx] and df["status"].to_list() == ["pending"]
    r.rec.end(ev)
    r.flush()
    r.writer.write_pending(r.rec.pending_snapshot())
    assert not (r.dir / PENDING_FILE).exists()
    assert read_events(tmp_path)["status"].to_list() == ["ok"]


def test_unreadable_files_are_skipped_and_reported(tmp_path):
    r = Rank(tmp_path)
    for _ in range(3):
        r.run(2)
        r.flush()
    seg2 = r.dir / "seg-00000002.parquet"
    data = seg2.read_bytes()
    seg2.write_bytes(data[: len(data) // 2])  # truncated (disk full)
    (r.dir / "seg-00000009.parquet").write_bytes(b"not a parquet file at all")
    (r.dir / ".seg-00000010.parquet.77.tmp").write_bytes(b"half-written temp file")
    job = open_job(tmp_path)
    df = job.events()
    assert df["idx"].to_list() == [0, 1, 4, 5]
    assert len(job.problems) == 2
    assert any("seg-00000002.parquet" in p for p in job.problems)
    assert any("seg-00000009.parquet" in p for p in job.problems)
    assert all(".tmp" not in p for p in job.problems)


def test_reading_twice_reports_each_bad_file_once(tmp_path):
    r = Rank(tmp_path)
    r.run(2)
    r.flush()
    (r.dir / "seg-00000002.parquet").write_bytes(b"garbage")
    job = open_job(tmp_path)
    job.events()
    job.events()
    job.rank_events(0)
    assert len(job.problems) == 1, job.problems


def test_cli_check_lists_an_unreadable_file_once(tmp_path, capsys):
    from ringwatch._cli import main

    for rk in (0, 1):
        r = Rank(tmp_path, rk)
        r.run(3)
        r.flush()
    assert main(["logs", str(tmp_path), "--check"]) == 0, capsys.readouterr()
    capsys.readouterr()
    (r.dir / "seg-00000002.parquet").write_bytes(b"garbage")
    assert main(["logs", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert sum("seg-00000002.parquet" in line for line in out.splitlines()) == 1, out


def _write_with_version(df: pl.DataFrame, path: Path, version: str | None) -> None:
    meta = None if version is None else {"ringwatch_schema_version": version}
    df.write_parquet(path, metadata=meta)


def test_other_major_schema_version_is_refused_and_reported(tmp_path):
    r = Rank(tmp_path)
    r.run(2)
    r.flush()
    r.run(2)
    r.flush()
    seg2 = r.dir / "seg-00000002.parquet"
    major = int(SCHEMA_VERSION.split(".")[0])
    _write_with_version(pl.read_parquet(seg2), seg2, f"{major + 1}.0")
    job = open_job(tmp_path)
    assert job.events()["idx"].to_list() == [0, 1]
    assert len(job.problems) == 1 and "seg-00000002.parquet" in job.problems[0]
    assert f"{major + 1}.0" in job.problems[0]


def test_file_without_schema_version_is_refused(tmp_path):
    r = Rank(tmp_path)
    r.run(1)
    r.flush()
    seg = r.dir / "seg-00000001.parquet"
    _write_with_version(pl.read_parquet(seg), seg, None)
    job = open_job(tmp_path)
    assert job.events().height == 0
    assert len(job.problems) == 1


def test_same_major_other_minor_is_read_missing_columns_null(tmp_path):
    r = Rank(tmp_path)
    r.run(2)
    r.flush()
    seg = r.dir / "seg-00000001.parquet"
    major = SCHEMA_VERSION.split(".")[0]
    old = pl.read_parquet(seg).drop("device_duration_ns").with_columns(
        pl.lit("x").alias("some_future_column"))
    _write_with_version(old, seg, f"{major}.99")
    job = open_job(tmp_path)
    df = job.events()
    assert job.problems == []
    assert df.columns == list(COLUMN_NAMES)
    assert dict(df.schema) == polars_schema()
    assert df["device_duration_ns"].null_count() == 2


def test_meta_is_written_and_read(tmp_path):
    r = Rank(tmp_path)
    r.run(3)
    r.flush()
    r.writer.write_meta({"counters": r.rec.counters(), "final": True})
    job = open_job(tmp_path)
    meta = job.meta()
    assert list(meta) == [0]
    m = meta[0]
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["rows_written"] == 3 and m["rank"] == 0 and m["job_id"] == JOB
    assert m["wall_minus_mono_ns"] == WALL0 - MONO0
    assert m["counters"]["recorded"] == 3 and m["final"] is True
    assert not list(r.dir.glob(".*"))  # no temporary file left behind


def test_bad_meta_is_reported_missing_meta_is_skipped(tmp_path):
    a = Rank(tmp_path, 0)
    b = Rank(tmp_path, 1)
    for r in (a, b):
        r.run(1)
        r.flush()
    (a.dir / META_FILE).write_text("{ not json")
    job = open_job(tmp_path)
    assert job.meta() == {}
    assert len(job.problems) == 1 and META_FILE in job.problems[0]


def test_events_of_several_ranks_sorted_by_rank_then_idx(tmp_path):
    ranks = [Rank(tmp_path, rk) for rk in (1, 0)]
    for r in ranks:
        r.run(3)
        r.flush()
    job = open_job(tmp_path)
    assert list(job.ranks) == [0, 1]
    df = job.events()
    assert df.select("rank", "idx").rows() == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert job.rank_events(1)["rank"].unique().to_list() == [1]


def test_events_with_categorical_strings_hold_the_same_rows(tmp_path, monkeypatch):
    import polars as pl

    from ringwatch._logs import JobLogs

    for rk in (1, 0):
        r = Rank(tmp_path, rk)
        r.run(3)
        r.flush()
    job = open_job(tmp_path)
    plain = job.events()
    cols = ["host", "pg", "op", "seq", "status"]
    for fast in (True, False):  # one read of every file, and the per-rank path
        if not fast:
            monkeypatch.setattr(JobLogs, "_read_all", lambda *a, **k: None)
        cat = job.events(categorical=True)
        strings = [c for c, t in plain.schema.items() if t == pl.String]
        assert {"host", "pg", "op", "status"} <= set(strings)
        assert all(cat[c].dtype == pl.Categorical for c in strings), cat.schema
        assert cat.with_columns(pl.col(strings).cast(pl.String)).equals(plain)
        part = job.events(columns=cols, categorical=True)
        assert part.columns == [c for c in plain.columns if c in {"rank", "idx", *cols}]
        assert part["op"].dtype == pl.Categorical and part["seq"].dtype == plain["seq"].dtype


def test_rank_dirs_ignores_other_entries(tmp_path):
    (tmp_path / "rank-00000").mkdir()
    (tmp_path / "rank-00012").mkdir()
    (tmp_path / "rank-xyz").mkdir()
    (tmp_path / "rank-00003").write_text("a file, not a folder")
    assert list(rank_dirs(tmp_path)) == [0, 12]


# ---- jobs --------------------------------------------------------------------------------------


def _job(log_dir: Path, job_id: str, mtime: float) -> None:
    r = Rank(log_dir, job_id=job_id)
    r.run(1)
    r.flush()
    for f in r.dir.iterdir():
        os.utime(f, (mtime, mtime))


def test_list_jobs_oldest_first_and_open_job_picks_the_newest(tmp_path):
    _job(tmp_path, "b-newest", 3_000_000)
    _job(tmp_path, "a-oldest", 1_000_000)
    _job(tmp_path, "c-middle", 2_000_000)
    (tmp_path / "not-a-job").mkdir()
    (tmp_path / "stray.txt").write_text("x")
    assert list_jobs(tmp_path) == ["a-oldest", "c-middle", "b-newest"]
    assert open_job(tmp_path).job_id == "b-newest"
    assert open_job(tmp_path, "a-oldest").path == tmp_path / "a-oldest"


def test_open_job_on_a_job_folder_itself(tmp_path):
    _job(tmp_path, "only", 1_000_000)
    job = open_job(tmp_path / "only")
    assert job.job_id == "only" and list(job.ranks) == [0]
    assert job.events().height == 1


def test_list_jobs_of_missing_folder_is_empty(tmp_path):
    assert list_jobs(tmp_path / "nope") == []


def test_open_job_errors(tmp_path):
    with pytest.raises(LogError):
        open_job(tmp_path)  # empty folder
    with pytest.raises(LogError):
        open_job(tmp_path / "missing")
    (tmp_path / "job-without-ranks").mkdir()
    with pytest.raises(LogError):
        open_job(tmp_path)
    _job(tmp_path, "real", 1_000_000)
    with pytest.raises(LogError, match="other"):
        open_job(tmp_path, "other")
    with pytest.raises(LogError):
        read_events(tmp_path / "missing")
    assert issubclass(LogError, ValueError)


def test_flight_recorder_copy_is_read_back(tmp_path):
    r = Rank(tmp_path)
    r.run(1)
    r.flush()
    job = open_job(tmp_path)
    assert job.flight_recorder(0) is None
    (r.dir / "flight_recorder.json").write_text(json.dumps({"entries": [], "version": "2.10"}))
    assert open_job(tmp_path).flight_recorder(0) == {"entries": [], "version": "2.10"}


def test_copied_job_folder_reads_the_same(tmp_path):
    r = Rank(tmp_path / "a")
    r.run(4)
    r.flush()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert open_job(tmp_path / "a").events().equals(open_job(tmp_path / "b").events())


def test_a_job_id_with_pattern_characters_reads_back(tmp_path):
    import polars as pl

    from ringwatch._logs import JobLogs

    from fakes import frame, uniform

    odd = tmp_path / "job[1]*?"
    odd.mkdir()
    path = odd / "rank-0.parquet"
    frame(uniform(ranks=(0,))).write_parquet(path, metadata={"ringwatch_schema_version": "1.0"})
    job = JobLogs.__new__(JobLogs)
    job.problems = []
    got = job._read(path)
    assert got is not None and got.height == 3, job.problems
    part = job._read(path, columns=("rank", "seq"))
    assert part.columns == ["rank", "seq"] and part["seq"].to_list() == [1, 2, 3]
    assert isinstance(got, pl.DataFrame)
