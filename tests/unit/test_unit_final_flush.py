"""The final flush and ends already due: a future's waiter wakes before the future's
callbacks run, so a job can reach its exit while the callback that records the end of its
last collective is still running. The final flush gives such ends a moment (bounded), and
leaves an op whose work never completed pending at once."""

from __future__ import annotations

import threading
import time

import polars as pl
import pytest

from ringwatch._config import CaptureConfig
from ringwatch._logs import open_job
from ringwatch.agent.capture import _runtime
from ringwatch.agent.capture._runtime import Runtime
from ringwatch.agent.capture._writer import SegmentWriter, rank_dir

from fakes import JOB, group, issue_collective, recorder

torch = pytest.importorskip("torch")


def _rank(tmp_path):
    rec = recorder()
    g = group(rec)
    rt = Runtime(rec, SegmentWriter(rank_dir(tmp_path, JOB, 0), rec.identity),
                 CaptureConfig(fr_backfill=False), read_seq=lambda pg: pg.seq,
                 fr_dump=lambda: None)
    return rec, g, rt


def _statuses(tmp_path) -> list[str]:
    return open_job(tmp_path).events().sort("idx")["status"].to_list()


def test_an_end_whose_callback_runs_late_is_recorded_at_exit(tmp_path):
    rec, g, rt = _rank(tmp_path)
    ev = issue_collective(rec, g)
    fut = torch.futures.Future()
    ev.future = fut

    def record_end(_f):  # the capture's callback, slowed as a busy host slows it
        time.sleep(0.05)
        rec.end(ev, end_source="future")

    fut.add_done_callback(record_end)
    threading.Thread(target=fut.set_result, args=(None,), daemon=True).start()
    while not fut.done():  # the job's wait returns here, before the callback has run
        time.sleep(0.001)
    assert rec.ends_due()
    rt.flush(final=True)
    assert _statuses(tmp_path) == ["ok"]
    assert ev.end_source == "future" and ev.future is None


def test_an_op_whose_work_never_completes_is_pending_without_waiting(tmp_path, monkeypatch):
    rec, g, rt = _rank(tmp_path)
    ev = issue_collective(rec, g)
    ev.future = torch.futures.Future()  # a hung collective: never done
    monkeypatch.setattr(_runtime, "FINAL_END_GRACE_S", 5.0)
    assert not rec.ends_due()
    t0 = time.monotonic()
    rt.flush(final=True)
    assert time.monotonic() - t0 < 1.0  # nothing due: no grace spent
    assert _statuses(tmp_path) == ["pending"]
    assert pl.read_parquet(next(tmp_path.rglob("seg-*.parquet")))["status"].to_list() == [
        "pending"]


def test_a_broken_future_ends_nothing(tmp_path):
    rec, g, _ = _rank(tmp_path)
    ev = issue_collective(rec, g)

    class Broken:
        def done(self):
            raise RuntimeError("gone")

    ev.future = Broken()
    assert not rec.ends_due()


def test_a_main_thread_frozen_inside_a_hook_leaves_the_agent_beating(tmp_path, monkeypatch):
    # the main thread stopped while it held the recorder (a signal handler that never
    # returns, as the cluster's hang fault does): flushes cannot have the recorder, but the
    # heartbeat goes on, so the rank reads as stuck in its code, not as a stopped process
    monkeypatch.setattr(_runtime, "RECORDER_WAIT_S", 0.05)
    rec, g, rt = _rank(tmp_path)
    issue_collective(rec, g)
    rt.flush()
    job = open_job(tmp_path)
    before = job.last_write_ns()[0]
    held, release = threading.Event(), threading.Event()

    def frozen_hook():
        with rec.lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=frozen_hook, daemon=True)
    t.start()
    held.wait(5)
    rec.clock.advance(3_000_000_000)
    t0 = time.monotonic()
    rt.flush()
    assert time.monotonic() - t0 < 1.0  # it did not wait behind the hook
    meta = open_job(tmp_path).meta()[0]
    assert meta["written_ns"] == before + 3_000_000_000 and meta["recorder_held"] is True
    assert meta["groups"]  # the rest as last written
    # what the summary and the post-mortem say of it
    from ringwatch._analyze import HELD_LINE, analyze_job, context_lines
    from ringwatch._summary import ending_notes
    assert any("recorder held" in n for n in ending_notes(meta, None))
    report = analyze_job(open_job(tmp_path))
    assert report["recorder_held"] == [0]
    assert any(HELD_LINE in line for line in context_lines(report))
    release.set()
    t.join(5)
    rt.flush()  # free again: a whole flush
    assert "recorder_held" not in open_job(tmp_path).meta()[0]
    assert analyze_job(open_job(tmp_path))["recorder_held"] == []


def test_a_hang_on_a_rank_whose_recorder_was_held_says_so():
    from ringwatch._analyze import HELD_LINE, _with_held
    from ringwatch.analyzers import Finding

    hang = Finding(kind="hang", cls="never arrived", ranks=(3,), evidence=("waited",))
    assert _with_held(hang, [3]).evidence == ("waited", f"rank(s) [3]: {HELD_LINE}")
    assert _with_held(hang, [5]) is hang  # another rank held: nothing to add
    other = Finding(kind="straggler", cls="compute straggler", ranks=(3,))
    assert _with_held(other, [3]) is other
