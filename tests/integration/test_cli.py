"""The ``ringwatch`` command: run, logs, schema, demo."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import polars as pl

from ringwatch._schema import COLUMNS, schema_markdown

from jobtools import PY, REPO, job_env, ringwatch_cmd, run_job


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(ringwatch_cmd(*args), capture_output=True, text=True, cwd=cwd,
                          env=job_env(), timeout=120)


def test_run_without_command_is_a_one_line_error():
    p = _cli("run")
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "nothing to run" in p.stderr


def test_run_returns_the_command_status(tmp_path):
    p = _cli("run", "--log-dir", "logs", "--", PY, "-c", "import sys; sys.exit(3)", cwd=tmp_path)
    assert p.returncode == 3


def test_run_attaches_in_a_plain_python_child(tmp_path):
    """Without torchrun: a single process that initialises a 1-rank group by itself."""
    code = ("import torch, torch.distributed as dist\n"
            "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, "
            "world_size=1)\n"
            "dist.all_reduce(torch.ones(3)); dist.destroy_process_group()\n")
    p = _cli("run", "--log-dir", "logs", "--job-id", "solo", "--", PY, "-c", code, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "[ringwatch] job solo: 1 rank(s)" in p.stderr
    assert (tmp_path / "logs" / "solo" / "rank-00000" / "meta.json").exists()


def test_logs_check_passes_on_a_good_job_and_fails_on_a_damaged_one(ddp_run, tmp_path):
    log_dir, _, _ = ddp_run
    ok = _cli("logs", str(log_dir), "--check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "consistency: OK" in ok.stdout
    assert ok.stdout.count("flight recorder rank") == 4
    data = json.loads(_cli("logs", str(log_dir), "--check", "--json").stdout)
    assert data["ok"] is True and sorted(data["flight_recorder"]) == ["0", "1", "2", "3"]
    damaged = tmp_path / "damaged"
    shutil.copytree(log_dir, damaged)
    for seg in damaged.glob("*/rank-00002/seg-*.parquet"):  # rank 2 loses collective #10
        meta = pl.read_parquet_metadata(seg)
        pl.read_parquet(seg).filter(pl.col("seq") != 10).write_parquet(seg, metadata=meta)
    bad = _cli("logs", str(damaged), "--check")
    assert bad.returncode == 1
    assert "pg 0 rank 2: missing numbers [10]" in bad.stdout
    assert "pg 0 seq 10: ranks [2] did not record it" in bad.stdout
    assert "flight recorder rank 2: MISMATCH" in bad.stdout


def test_logs_steps_and_json(ddp_run):
    log_dir, _, _ = ddp_run
    steps = _cli("logs", str(log_dir), "--steps")
    assert steps.returncode == 0
    assert "rank0" in steps.stdout and "rank3" in steps.stdout
    meta = json.loads(_cli("logs", str(log_dir), "--json").stdout)["meta"]
    assert sorted(meta) == ["0", "1", "2", "3"]


def test_logs_on_missing_dir_is_a_one_line_error(tmp_path):
    p = _cli("logs", str(tmp_path / "nope"))
    assert p.returncode == 1 and "no such directory" in p.stderr


def test_schema_lists_every_column_and_docs_are_in_sync():
    p = _cli("schema")
    assert all(c.name in p.stdout for c in COLUMNS)
    md = _cli("schema", "--markdown").stdout
    assert md == schema_markdown()
    assert (REPO / "docs" / "schema.md").read_text() == md, \
        "docs/schema.md is stale: ringwatch schema --markdown > docs/schema.md"


def test_demo_shows_the_straggler(tmp_path):
    rc, out = run_job(ringwatch_cmd("demo", "--steps", "90", "--at-step", "30",
                                    "--severity", "0.6", "--log-dir", "demo"),
                      cwd=tmp_path, timeout=300)
    assert rc == 0, out
    assert "in collectives/waiting ms/step" in out and "<- fault on" in out
    assert "consistency: OK" in out
    assert out.count(": OK,") == 4  # every rank matches its Flight Recorder
    assert "reading: rank 2 arrives last at" in out and "a straggler" in out, out
    # live: the service named the straggler while the job ran (before the post-mortem)
    live = out.index("LIVE: STRAGGLER (compute straggler): rank 2 on host1")
    assert live < out.index("ringwatch analyze "), out
    assert "LIVE: SLOW_LINK" not in out and "LIVE: HANG" not in out, out
    # the node agent ran beside the job: synthetic GPUs (said so), every rank's collectives
    assert "GPU(s) replayed from a synthetic recording" in out, out
    counts = re.search(r"collectives per rank, read from the ranks' logs: (.*)", out).group(1)
    per_rank = dict(re.findall(r"rank (\d+): (\d+)", counts))
    assert sorted(per_rank) == ["0", "1", "2", "3"] and min(map(int, per_rank.values())) > 90
    truth = json.loads((tmp_path / "demo" / "ground_truth.json").read_text())
    assert truth["kind"] == "straggler" and truth["rank"] == 2 and truth["onset_step"] >= 30


def test_demo_shows_where_a_hang_stopped(tmp_path):
    rc, out = run_job(ringwatch_cmd("demo", "--fault", "hang", "--victim-rank", "1",
                                    "--at-step", "15", "--hold-s", "6", "--log-dir", "demo"),
                      cwd=tmp_path, timeout=300)
    assert rc == 0, out
    assert "no progress for" in out, out  # shown live, while the job is hung
    assert "rank 1 last finished" in out and "entered nothing since" in out, out
    assert out.count("waiting in all_reduce") >= 3, out
    assert "HANG (never arrived): rank 1 (local 1) on host0 at pg 0 #" in out, out
    an = _cli("analyze", str(tmp_path / "demo" / "logs"), "--min-stall-s", "2", "--json")
    found = json.loads(an.stdout)["findings"]
    assert [(f["kind"], f["cls"], f["ranks"], f["hosts"]) for f in found] == [
        ("hang", "never arrived", [1], ["host0"])], found


def test_damaged_meta_files_are_named_and_make_no_hang(ddp_run, tmp_path):
    """A job that exited cleanly, with two ranks' meta.json damaged and their files' times
    reset (a copy): the analysis names the files and finds nothing; it never reads a damaged
    heartbeat as a rank that stopped."""
    import os

    logs, _, _ = ddp_run
    job = next(p for p in logs.iterdir() if p.is_dir())
    copy = shutil.copytree(job, tmp_path / job.name)
    rank_dirs = sorted(copy.glob("rank-*"))
    (rank_dirs[1] / "meta.json").write_text("[1, 2, 3]")
    (rank_dirs[2] / "meta.json").write_text("{not json")
    for d in rank_dirs[1:3]:
        for f in d.iterdir():
            os.utime(f, ns=(10**18, 10**18))  # long before the other ranks
    p = subprocess.run(ringwatch_cmd("analyze", str(copy), "--json"), capture_output=True,
                       text=True, env=job_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["findings"] == [], report["findings"]
    assert len(report["unreadable"]) == 2 and all(
        "meta.json: unreadable" in line for line in report["unreadable"]), report
    text = subprocess.run(ringwatch_cmd("analyze", str(copy)), capture_output=True, text=True,
                          env=job_env(), timeout=120).stdout
    assert "2 file(s) could not be read" in text and "a JSON list, not an object" in text
