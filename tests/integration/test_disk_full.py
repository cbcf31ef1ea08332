"""A log folder on a real filesystem that fills up mid-run (a small tmpfs mounted for the
test): the job finishes with its result, the warning says the disk is full, no temporary file
is left, recording resumes when space comes back, and ``ringwatch logs`` says that writes
failed instead of guessing a kill."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from ringwatch._logs import open_job

from jobtools import JOBS, Job, ringwatch_cmd, torchrun_cmd, wait_for

DISK_BYTES = 2 << 20
FULL = "is full (no space left on device)"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs, unmounted after the test. Needs root, which CI runs as: without it the
    test fails, it does not skip."""
    d = tmp_path / "disk"
    d.mkdir()
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs",
                            str(d)], capture_output=True, text=True, timeout=30)
        why = p.stderr.strip() if p.returncode else None
    except OSError as exc:
        why = str(exc)
    if why is not None:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test (needs root): {why}")
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


class Filler:
    """Keeps a filesystem full: a thread appends to one file whenever a block comes free."""

    def __init__(self, folder: Path, name: str):
        self.path = folder / name
        self.full = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while not self._stop.is_set():
                try:
                    os.write(fd, bytes(4096))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    self.full.set()
                    self._stop.wait(0.01)
        finally:
            os.close(fd)

    def stop(self) -> None:
        """Stop topping up (the file stays: the disk stays as full as it is)."""
        self._stop.set()
        self._thread.join()


def _metas(disk: Path) -> list[dict]:
    out = []
    for p in disk.glob("*/rank-*/meta.json"):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    return out


def test_a_full_log_disk_leaves_the_job_whole_and_the_logs_honest(tmp_path, small_disk):
    prog, stop = tmp_path / "progress", tmp_path / "stop"
    prog.mkdir()
    cmd = ringwatch_cmd("run", "--log-dir", str(small_disk), "--flush-interval-s", "0.2", "--",
                        *torchrun_cmd(2, [str(JOBS / "loop.py"), "--progress", str(prog),
                                          "--sleep-ms", "20", "--stop-file", str(stop)]))
    job = Job(cmd, cwd=tmp_path)
    fillers: list[Filler] = []
    try:
        wait_for(lambda: len(m := _metas(small_disk)) == 2
                 and all(x["rows_written"] for x in m), 90, "both ranks to write a segment")
        fillers.append(Filler(small_disk, "filler-1"))
        wait_for(fillers[-1].full.is_set, 30, "the disk to fill")
        wait_for(lambda: job.output.count(FULL) == 2, 30, "both ranks to say the disk is full")
        fillers[-1].stop()
        fillers[-1].path.unlink()  # space comes back: recording resumes
        wait_for(lambda: job.output.count("succeed again") == 2, 30, "writes to succeed again")
        back = {m["rank"]: (m["write_failures"], m["write_dropped"]) for m in _metas(small_disk)}
        fillers.append(Filler(small_disk, "filler-2"))  # full again, to the end of the job
        wait_for(fillers[-1].full.is_set, 30, "the disk to fill again")
        time.sleep(1.0)  # a few flushes fail again
        fillers[-1].stop()  # stays full; the final meta.json must fit in what ringwatch kept
        stop.touch()
        rc = job.finish(timeout=120)
    finally:
        for f in fillers:
            f.stop()
        job.kill_all()
    out = job.output
    assert rc == 0, out
    done = dict(re.findall(r"rank (\d) ok: (\d+) iterations", out))
    assert sorted(done) == ["0", "1"] and done["0"] == done["1"], out
    full = [line for line in out.splitlines() if FULL in line]
    assert len(full) == 2 and all(line.startswith("[ringwatch] log folder ")
                                  and line.endswith("rows dropped, the job goes on")
                                  for line in full), full
    assert "thrift" not in out and "out of specification" not in out, out
    assert sorted(p.name for p in small_disk.rglob("*.tmp")) == []

    job_logs = open_job(small_disk)
    meta = job_logs.meta()
    ev = job_logs.events()
    assert sorted(meta) == [0, 1], meta
    for rank, m in meta.items():
        assert m["final"] is True and m["write_disk_full"] is True, m
        assert m["write_failures"] > back[rank][0] > 0, (back, m)  # failed, then again
        assert m["write_dropped"] > back[rank][1] > 0, (back, m)
        idx = sorted(ev.filter(pl.col("rank") == rank)["idx"].to_list())
        lost = set(range(idx[-1] + 1)) - set(idx)
        assert lost and idx[-1] > min(lost), "nothing was recorded after the space came back"
        # every row recorded is on disk or counted as dropped, none twice
        assert len(idx) + m["write_dropped"] == m["counters"]["recorded"], (len(idx), m)

    logs = subprocess.run(ringwatch_cmd("logs", str(small_disk)), capture_output=True,
                          text=True, timeout=120)
    assert logs.returncode == 0, logs.stderr
    ranks = [line for line in logs.stdout.splitlines() if line.startswith("  rank")]
    assert len(ranks) == 2, logs.stdout
    for line, rank in zip(ranks, (0, 1), strict=True):
        assert f"log writes failed (disk full): {meta[rank]['write_dropped']} rows dropped" \
            in line, logs.stdout
    assert "killed" not in logs.stdout, logs.stdout
