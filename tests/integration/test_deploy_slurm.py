"""deploy/slurm: the prolog and epilog run by bash against a fake Slurm environment start a
real agent (its /metrics answers, it pushes with the token from the file) and stop it with
SIGTERM; the batch script runs its launch under ``ringwatch run`` with srun, scontrol and
torchrun stand-ins."""

from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploytools import (
    RINGWATCH,
    SLURM,
    flag,
    parse_cli,
)
from otlp_receiver import OtlpReceiver

# --- Slurm ----------------------------------------------------------------------------------

PROLOG = SLURM / "ringwatch-prolog.sh"
EPILOG = SLURM / "ringwatch-epilog.sh"
SBATCH = SLURM / "train.sbatch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(tmp: Path, **extra: str) -> Path:
    """A settings file like /etc/ringwatch/slurm.env, everything under ``tmp``."""
    settings = {
        "RINGWATCH_BIN": str(RINGWATCH),
        "RINGWATCH_SLURM_ROOT": str(tmp / "local"),
        "RINGWATCH_SLURM_RUN_DIR": str(tmp / "run"),
        "RINGWATCH_SLURM_PROMETHEUS": "127.0.0.1:0",
        "RINGWATCH_SLURM_TOKEN_FILE": "",
        "RINGWATCH_SLURM_AGENT_ARGS": "--no-gpu",
        "RINGWATCH_SLURM_START_TIMEOUT_S": "90",
        **extra,
    }
    conf = tmp / "slurm.env"
    conf.write_text("".join(f"{k}='{v}'\n" for k, v in settings.items()))
    return conf


def slurm_env(conf: Path, job: str, **extra: str) -> dict[str, str]:
    """What slurmd gives a prolog/epilog: no search path, the job's ids."""
    return {"SLURM_JOB_ID": job, "SLURM_JOB_UID": str(os.getuid()),
            "SLURM_JOB_USER": pwd.getpwuid(os.getuid()).pw_name,
            "RINGWATCH_SLURM_CONF": str(conf), **extra}


def run_like_slurmd(script: Path, env: dict[str, str], timeout: float = 120):
    """Run a prolog/epilog as slurmd does: its own process group, killed once it returns."""
    p = subprocess.Popen(["/bin/bash", str(script)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, out


def alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def kill_if_alive(pid: int | None) -> None:
    if pid and alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_slurm_prolog_starts_the_agent_and_the_epilog_stops_it(tmp_path):
    job, token, port = "4242", "slurm-token-0123456789abcdef", free_port()
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "token").chmod(0o600)
    pid = None
    with OtlpReceiver() as rx:
        conf = slurm_conf(tmp_path, RINGWATCH_SLURM_PROMETHEUS=f"127.0.0.1:{port}",
                          RINGWATCH_SLURM_OTLP_ENDPOINT=rx.url,
                          RINGWATCH_SLURM_TOKEN_FILE=str(tmp_path / "token"),
                          RINGWATCH_SLURM_AGENT_ARGS="--no-gpu --export-interval-s 0.5")
        env = slurm_env(conf, job)
        try:
            rc, out = run_like_slurmd(PROLOG, env)
            assert rc == 0, out
            pid_file = tmp_path / "run" / f"agent-{job}.pid"
            pid = int(pid_file.read_text())
            # it outlived the prolog and the kill of the prolog's process group
            assert alive(pid), out + (tmp_path / "run" / f"agent-{job}.log").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            words = [w.decode() for w in cmd if w]
            i = words.index("agent")
            args = parse_cli(["ringwatch", *words[i:]])
            assert args.job_id == job
            assert args.log_dir == str(tmp_path / "local" / job / "logs")
            assert args.token_file == str(tmp_path / "token")
            assert not any(token in w for w in words), "the token is on the command line"
            job_dir = tmp_path / "local" / job
            assert job_dir.stat().st_uid == os.getuid()
            assert (job_dir / "logs").is_dir()
            # /metrics answers, with the node's series labelled with the job id
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                body = r.read().decode()
            assert f'job="{job}"' in body and "ringwatch_host_cpu_seconds_total" in body
            # and it pushes with the token from the file
            deadline = time.monotonic() + 30
            while not rx.snapshot() and time.monotonic() < deadline:
                time.sleep(0.2)
            headers, _ = rx.snapshot()[0]
            assert headers.get("authorization") == f"Bearer {token}"

            rc, out = run_like_slurmd(EPILOG, env)
            assert rc == 0, out
            assert f"agent (pid {pid}) stopped on SIGTERM" in out, out
            assert not alive(pid)
            assert not pid_file.exists() and not job_dir.exists()
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
            # a second epilog (requeue, retry) has nothing to do and still succeeds
            rc, out = run_like_slurmd(EPILOG, env)
            assert rc == 0, out
        finally:
            kill_if_alive(pid)


def test_slurm_prolog_never_fails_the_node(tmp_path):
    conf = slurm_conf(tmp_path, RINGWATCH_SLURM_AGENT_ARGS="--no-gpu --no-such-flag")
    t0 = time.monotonic()
    rc, out = run_like_slurmd(PROLOG, slurm_env(conf, "7"))
    assert rc == 0, out
    assert "the agent exited at start" in out and "--no-such-flag" in out, out
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run" / "agent-7.pid").exists()
    # no job id, a job id that is a path, no ringwatch command: no agent, no failure
    for env in (slurm_env(conf, "../../etc"), slurm_env(conf, "")):
        rc, out = run_like_slurmd(PROLOG, env)
        assert rc == 0 and "not a job id" in out, out
    conf = slurm_conf(tmp_path, RINGWATCH_BIN=str(tmp_path / "missing"))
    rc, out = run_like_slurmd(PROLOG, slurm_env(conf, "8"))
    assert rc == 0 and "not executable" in out, out
    rc, out = run_like_slurmd(EPILOG, slurm_env(conf, "8"))
    assert rc == 0, out


def test_slurm_epilog_leaves_a_reused_pid_alone(tmp_path):
    conf = slurm_conf(tmp_path)
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "run").mkdir()
        pid_file = tmp_path / "run" / "agent-9.pid"
        pid_file.write_text(f"{other.pid}\n")
        rc, out = run_like_slurmd(EPILOG, slurm_env(conf, "9"))
        assert rc == 0, out
        assert "not this job's agent" in out, out
        assert other.poll() is None, "the epilog killed a process that is not the agent"
        assert not pid_file.exists()
    finally:
        other.kill()
        other.wait()


def test_sbatch_launches_under_ringwatch_run_and_gathers_the_logs(tmp_path):
    job = "5151"
    conf = slurm_conf(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "seen.txt"
    stubs = {
        # srun: drop its own options, run the step here (one node)
        "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": "#!/bin/bash\necho node001\n",
        # torchrun: say what it was given, write one rank's log, fail like a broken job
        "torchrun": (
            "#!/bin/bash\n"
            f'{{ echo "LOG_DIR=$RINGWATCH_LOG_DIR"; echo "JOB_ID=$RINGWATCH_JOB_ID"; '
            f'echo "AUTOATTACH=$RINGWATCH_AUTOATTACH"; echo "ARGS=$*"; }} > {seen}\n'
            'mkdir -p "$RINGWATCH_LOG_DIR/$RINGWATCH_JOB_ID/rank-0"\n'
            'echo x > "$RINGWATCH_LOG_DIR/$RINGWATCH_JOB_ID/rank-0/marker"\n'
            "exit 3\n"),
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "ringwatch").symlink_to(RINGWATCH)
    local_logs = tmp_path / "local" / job / "logs"
    local_logs.mkdir(parents=True)  # the prolog made it
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path),
           "SLURM_JOB_ID": job, "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node001",
           "RINGWATCH_SLURM_CONF": str(conf), "RINGWATCH_SHARED_LOGS": str(tmp_path / "shared"),
           "GPUS_PER_NODE": "2"}
    p = subprocess.run(["/bin/bash", str(SBATCH), "--epochs", "1"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    # the job's status is the launcher's
    assert p.returncode == 3, p.stdout + p.stderr
    got = dict(line.split("=", 1) for line in seen.read_text().splitlines())
    # the ranks write where the prolog pointed that node's agent, under the Slurm job id
    assert got["LOG_DIR"] == str(local_logs)
    assert got["JOB_ID"] == job and got["AUTOATTACH"] == "1"
    args = got["ARGS"].split()
    assert flag(args, "--rdzv-id") == job and flag(args, "--nproc-per-node") == "2"
    assert flag(args, "--rdzv-endpoint") == "node001:29500"
    assert args[-3:] == ["train.py", "--epochs", "1"]
    # the logs gathered to shared storage even though the job failed
    assert (tmp_path / "shared" / job / "rank-0" / "marker").read_text() == "x\n"


def test_slurm_scripts_are_executable_bash():
    for script in (PROLOG, EPILOG, SBATCH):
        assert script.read_text().startswith("#!/bin/bash\n"), script
        # slurmd executes the prolog and epilog themselves (sbatch reads its script)
        if script is not SBATCH:
            assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
        p = subprocess.run(["/bin/bash", "-n", str(script)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    # the settings file documents every setting the scripts read, and only those
    documented = set(re.findall(r"^(RINGWATCH_[A-Z_]+)=", (SLURM / "ringwatch-slurm.env")
                                .read_text(), re.M))
    used = set()
    for script in (PROLOG, EPILOG):
        used |= set(re.findall(r"\$\{(RINGWATCH_[A-Z_]+)", script.read_text()))
    used -= {"RINGWATCH_SLURM_CONF"}
    assert documented == used, (documented ^ used)
