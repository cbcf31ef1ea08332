"""ringwatch never harms the job: failures inside it and an unwritable log folder leave the
job's results and exit status untouched, with one warning line."""

from __future__ import annotations

import pytest

from jobtools import JOBS, run_job, torchrun_cmd

BREAKS = [
    ["Recorder.new_event"],
    ["Recorder.issue"],
    ["Recorder.end"],
    ["Recorder.assign_collective_seq", "Recorder.assign_p2p_seq"],
    ["SegmentWriter.write", "SegmentWriter.write_meta"],
]


@pytest.mark.parametrize("broken", BREAKS, ids=lambda b: "+".join(b))
def test_broken_internals_do_not_reach_the_job(tmp_path, broken):
    flags = [x for name in broken for x in ("--break", name)]
    rc, out = run_job(torchrun_cmd(2, [str(JOBS / "harm.py"), "--attach", "logs", *flags]),
                      cwd=tmp_path, timeout=120)
    assert rc == 0, out
    assert "rank 0 ok" in out and "rank 1 ok" in out
    assert "injected failure" in out  # reported (once per cause), not raised


def test_unwritable_log_dir_warns_once_and_job_runs(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log folder should be")
    rc, out = run_job(torchrun_cmd(2, [str(JOBS / "harm.py"), "--attach", str(blocker / "x")]),
                      cwd=tmp_path, timeout=120)
    assert rc == 0, out
    assert "rank 0 ok" in out and "rank 1 ok" in out
    warnings = [line for line in out.splitlines() if line.startswith("[ringwatch]")]
    assert len(warnings) == 2, warnings  # one line per rank
    assert all("not writable" in line for line in warnings)

