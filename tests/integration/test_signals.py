"""What survives when ranks are killed: SIGKILL leaves only readable files, SIGTERM loses
nothing, and a hung job's logs say who waited in which collective."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import polars as pl

from ringwatch._logs import SEGMENT_RE, open_job
from ringwatch.analyzers import check_consistency

from jobtools import JOBS, Job, ringwatch_cmd, torchrun_cmd, wait_for


def _progress(d: Path, rank: int) -> int:
    try:
        return int((d / f"rank-{rank}").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _loop_job(tmp_path: Path, *flags: str, flush_s: str, nproc: int = 4) -> tuple[Job, Path]:
    prog = tmp_path / "progress"
    prog.mkdir()
    cmd = ringwatch_cmd("run", "--log-dir", "logs", "--flush-interval-s", flush_s, "--",
                        *torchrun_cmd(nproc, [str(JOBS / "loop.py"), "--progress", str(prog),
                                              *flags]))
    return Job(cmd, cwd=tmp_path), prog


def _rank_dir(tmp_path: Path, rank: int) -> Path | None:
    hits = list((tmp_path / "logs").glob(f"*/rank-{rank:05d}"))
    return hits[0] if hits else None


def test_sigkill_leaves_only_readable_segments(tmp_path):
    job, prog = _loop_job(tmp_path, "--sleep-ms", "1", flush_s="0.1")
    try:
        def victim_pid():
            d = _rank_dir(tmp_path, 1)
            if d is None or not (d / "meta.json").exists():
                return None
            if len([p for p in d.iterdir() if SEGMENT_RE.match(p.name)]) < 3:
                return None
            return json.loads((d / "meta.json").read_text())["pid"]

        pid = wait_for(victim_pid, 60, "rank 1 to write segments")
        os.kill(pid, signal.SIGKILL)  # mid-run: it may be in the middle of a write
        job.finish(timeout=120)  # torchrun sees the dead worker and stops the others
    finally:
        job.kill_all()
    logs = open_job(tmp_path / "logs")
    for d in logs.ranks.values():
        for p in d.iterdir():
            if p.suffix == ".parquet" and not p.name.startswith("."):
                pl.read_parquet(p)  # every visible file is complete
    ev = logs.events()
    assert logs.problems == []
    assert ev.filter(pl.col("rank") == 1).height >= _progress(prog, 1) - 50
    assert ev.filter(pl.col("rank") == 1).height > 0
    assert logs.meta()[1]["final"] is False  # killed: no final flush, yet readable


def test_sigterm_loses_nothing_buffered(tmp_path):
    # A long flush interval: everything the ranks recorded is still in memory at SIGTERM.
    job, prog = _loop_job(tmp_path, "--sleep-ms", "2", flush_s="600")
    try:
        wait_for(lambda: min(_progress(prog, r) for r in range(4)) >= 100, 90, "100 iterations")
        assert _rank_dir(tmp_path, 0) is not None
        assert not any(_rank_dir(tmp_path, 0).glob("seg-*.parquet"))  # nothing flushed yet
        job.signal(signal.SIGTERM)  # to `ringwatch run`, which forwards it to torchrun
        job.finish(timeout=60)
    finally:
        job.kill_all()
    logs = open_job(tmp_path / "logs")
    ev = logs.events()
    for rank in range(4):
        done = _progress(prog, rank)
        mine = ev.filter((pl.col("rank") == rank) & (pl.col("op") == "all_reduce")
                         & (pl.col("status") == "ok"))
        # every all-reduce the rank completed is in its log, numbered without holes
        assert mine.height >= done, (rank, mine.height, done)
        assert mine["seq"].max() - mine["seq"].min() + 1 == mine.height
        assert logs.meta()[rank]["final"] is True


def test_hung_rank_shows_as_pending_on_the_others(tmp_path):
    job, prog = _loop_job(tmp_path, "--sleep-ms", "1", "--stall-rank", "3", "--stall-at", "20",
                          flush_s="0.2")
    try:
        wait_for(lambda: all(_progress(prog, r) == 20 for r in range(4)), 60, "the stall")
        time.sleep(1.0)  # ranks 0-2 now wait in all-reduce #21 that rank 3 never joins
        job.signal(signal.SIGTERM)
        job.finish(timeout=60)
    finally:
        job.kill_all()
    ev = open_job(tmp_path / "logs").events()
    world = ev.filter(pl.col("pg") == "0")
    last_ok = world.filter(pl.col("status") == "ok").group_by("rank").agg(pl.col("seq").max())
    first_seq = world["seq"].min()
    assert dict(last_ok.iter_rows()) == {r: first_seq + 19 for r in range(4)}
    pending = world.filter(pl.col("status") == "pending")
    assert sorted(pending["rank"].to_list()) == [0, 1, 2]
    assert pending["seq"].unique().to_list() == [first_seq + 20]
    assert pending["op"].unique().to_list() == ["all_reduce"]
    assert pending["t_end_ns"].null_count() == 3
    assert check_consistency(ev, upto_common=True).ok
    assert not check_consistency(ev).ok  # rank 3 never issued the last one
