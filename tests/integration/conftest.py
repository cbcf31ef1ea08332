"""Shared fixtures of the integration tests (helpers live in ``jobtools``)."""

from __future__ import annotations

import pytest

from jobtools import read_json_line, ringwatch_cmd, run_job, torchrun_cmd


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory):
    """One 4-rank DDP job (20 steps, 6 buckets) run with ``ringwatch run -- torchrun``."""
    d = tmp_path_factory.mktemp("ddp_run")
    cmd = ringwatch_cmd("run", "--log-dir", "logs", "--", *torchrun_cmd(
        4, ["-m", "ringwatch.cluster._job", "--steps", "20", "--result", "result.json"]))
    rc, out = run_job(cmd, cwd=d)
    assert rc == 0, out
    return d / "logs", read_json_line(d / "result.json"), out
