"""Logs on a full disk: a failed write leaves no temporary file, the warning says the disk is
full whatever layer failed, recording resumes when space comes back, and the summary says
what happened instead of guessing a kill.

The filesystem is faked at one seam each: polars' Parquet write (which reports ENOSPC only in
its own words), ``Path.write_text`` (a plain OSError) and ``os.statvfs``. The real full disk is
tests/integration/test_disk_full.py.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import polars as pl
import pytest

from ringwatch._config import CaptureConfig
from ringwatch._logs import META_FILE, RESERVE_FILE, open_job
from ringwatch._summary import ending_notes, summary_lines
from ringwatch.agent.capture import _runtime
from ringwatch.agent.capture._runtime import Runtime
from ringwatch.agent.capture._writer import DiskFullError, SegmentWriter, disk_full, rank_dir

from fakes import JOB, group, issue_collective, recorder

POLARS_MESSAGE = "Invalid thrift: transport error"


def statvfs(free_bytes: int, *, free_inodes: int = 1000):
    """An ``os.statvfs`` answer with ``free_bytes`` available (4 KiB blocks)."""
    blocks = free_bytes // 4096
    return os.statvfs_result((4096, 4096, 128, blocks, blocks, 1000, free_inodes,
                              free_inodes, 0, 255))


def polars_fails(monkeypatch, *, free_bytes: int) -> None:
    """polars' write leaves a partial file and fails with its own message; the folder's
    filesystem has ``free_bytes`` left."""
    def write_parquet(self, path, **_kw):
        Path(path).write_bytes(b"PAR1" + bytes(100))
        raise pl.exceptions.ComputeError(POLARS_MESSAGE)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", write_parquet)
    monkeypatch.setattr(os, "statvfs", lambda _p: statvfs(free_bytes))


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


class Rank:
    """A recorder, its writer and the runtime that flushes it, with warnings collected."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.rec = recorder()
        self.g = group(self.rec)
        self.dir = rank_dir(tmp_path, JOB, 0)
        self.writer = SegmentWriter(self.dir, self.rec.identity)
        self.rt = Runtime(self.rec, self.writer, CaptureConfig(fr_backfill=False),
                          read_seq=lambda pg: pg.seq, fr_dump=lambda: None)
        self.said: list[tuple[str, str]] = []
        monkeypatch.setattr(_runtime, "warn_once", self._warn_once)

    def _warn_once(self, cause: str, msg: str) -> None:
        if cause not in {c for c, _ in self.said}:
            self.said.append((cause, msg))

    def run(self, n: int) -> None:
        for _ in range(n):
            self.rec.end(issue_collective(self.rec, self.g))

    def meta(self) -> dict:
        return json.loads((self.dir / META_FILE).read_text())


def test_disk_full_is_told_from_any_layer_of_the_cause_chain():
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        raise RuntimeError("flush failed") from full
    except RuntimeError as exc:
        wrapped = exc
    assert disk_full(full) and disk_full(wrapped)
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(RuntimeError(POLARS_MESSAGE)) and not disk_full(None)


def test_a_parquet_write_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    r = Rank(tmp_path, monkeypatch)
    r.run(1)
    r.rt.flush()  # the folder exists, with one segment
    polars_fails(monkeypatch, free_bytes=0)
    r.run(2)
    with pytest.raises(DiskFullError) as caught:
        r.writer.write(r.rec.drain())
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value.__cause__) == POLARS_MESSAGE
    assert leftovers(r.dir) == []
    assert [p.name for p in r.dir.glob("seg-*")] == ["seg-00000001.parquet"]


def test_a_failure_with_room_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    r = Rank(tmp_path, monkeypatch)
    r.run(1)
    r.rt.flush()
    polars_fails(monkeypatch, free_bytes=10 << 30)
    r.run(1)
    with pytest.raises(pl.exceptions.ComputeError, match="Invalid thrift"):
        r.writer.write(r.rec.drain())
    assert leftovers(r.dir) == []
    r.run(1)
    r.rt.flush()
    (cause, msg), = r.said
    assert cause == "write" and "Invalid thrift" in msg and "full" not in msg, msg


def test_a_text_write_that_fails_removes_its_temporary_file(tmp_path, monkeypatch):
    r = Rank(tmp_path, monkeypatch)
    r.run(1)
    r.rt.flush()

    def write_text(self, _text, *_a, **_kw):
        self.touch()  # created, then no block to write to
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError) as caught:
        r.writer.write_meta({"final": False})
    assert disk_full(caught.value) and leftovers(r.dir) == []


def test_full_disk_warns_plainly_counts_the_rows_and_recording_resumes(tmp_path, monkeypatch):
    r = Rank(tmp_path, monkeypatch)
    r.run(2)
    r.rt.flush()
    with monkeypatch.context() as m:
        polars_fails(m, free_bytes=0)
        r.run(3)
        r.rt.flush()
        r.run(4)
        r.rt.flush()
    (cause, msg), = r.said
    assert cause == "write_full"
    assert msg == (f"log folder {r.dir} is full (no space left on device): 3 rows dropped, "
                   "the job goes on")
    assert leftovers(r.dir) == []
    meta = r.meta()  # meta.json is plain text: the fake disk still had room for it
    assert (meta["write_failures"], meta["write_dropped"], meta["write_disk_full"]) == (
        2, 7, True)
    assert meta["counters"]["dropped"] == 7 and meta["write_error"] == "disk full"
    # space came back: the next rows are written, and meta keeps what was lost
    r.run(5)
    r.rt.close()
    assert r.said[-1][0] == "write_back" and "7 rows were dropped" in r.said[-1][1]
    assert open_job(tmp_path).events()["idx"].to_list() == [0, 1, *range(9, 14)]
    meta = r.meta()
    assert meta["final"] is True and meta["write_dropped"] == 7
    (line,) = [x for x in summary_lines(open_job(tmp_path)) if x.startswith("  rank")]
    assert line.endswith("7 rows, 1 group(s); log writes failed (disk full): 7 rows dropped")


def test_the_final_meta_uses_the_reserve_when_the_disk_is_full(tmp_path, monkeypatch):
    r = Rank(tmp_path, monkeypatch)
    r.run(1)
    r.rt.flush()
    assert (r.dir / RESERVE_FILE).stat().st_size > 0
    real = Path.write_text

    def write_text(self, text, *a, **kw):
        if (r.dir / RESERVE_FILE).exists():  # every block is taken but the reserve's
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *a, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)
    polars_fails(monkeypatch, free_bytes=0)
    r.run(2)
    r.rt.flush()  # neither the segment nor the meta
    assert r.meta()["final"] is False and r.meta()["write_failures"] == 0
    assert (r.dir / RESERVE_FILE).exists()
    r.rt.close()  # the final meta gives up the reserve and is written
    meta = r.meta()
    assert meta["final"] is True and (meta["write_failures"], meta["write_dropped"]) == (1, 2)
    assert not (r.dir / RESERVE_FILE).exists() and leftovers(r.dir) == []
    assert [c for c, _ in r.said] == ["write_full"]


def test_the_reserve_is_not_spent_on_a_meta_that_is_not_final(tmp_path, monkeypatch):
    r = Rank(tmp_path, monkeypatch)
    r.run(1)
    r.rt.flush()
    monkeypatch.setattr(Path, "write_text", lambda *_a, **_k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError):
        r.writer.write_meta({"final": False})
    assert (r.dir / RESERVE_FILE).exists()


def test_what_the_summary_says_of_how_a_rank_ended(tmp_path):
    d = tmp_path / "rank-00000"
    d.mkdir()
    ok = {"final": True, "write_failures": 0, "counters": {"dropped": 0}}
    assert ending_notes(ok, d) == []
    full = {"final": True, "write_failures": 3, "write_dropped": 40, "write_disk_full": True,
            "write_error": "disk full", "counters": {"dropped": 45}}
    assert ending_notes(full, d) == ["log writes failed (disk full): 40 rows dropped",
                                     "5 DROPPED (buffer full)"]
    other = {**full, "write_disk_full": False, "write_error": "Permission denied"}
    assert ending_notes(other, d)[0] == "log writes failed (Permission denied): 40 rows dropped"
    cut = {"final": False, "write_failures": 0, "counters": {}}
    assert ending_notes(cut, d) == [
        "no final meta.json: the rank was killed, or its last write failed"]
    (d / RESERVE_FILE).write_bytes(b"")  # the final meta was never tried
    (d / ".seg-00000002.parquet.77.tmp").write_bytes(b"")
    assert ending_notes(cut, d) == [
        "no final meta.json: the rank was killed (or is still running)",
        "1 temporary file(s) left (a write cut short, or under way)"]
    assert ending_notes(None, d) == [
        "no meta.json: none written yet (killed before its first flush, or its writes failed)"]
