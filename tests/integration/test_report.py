"""``ringwatch analyze --html``: the page of a real straggler run (a 4-rank local cluster, a
real loopback probe) and of the real H200 capture (its NVML recording for the power plots),
loaded in headless Chromium with nothing reachable: no console error, nothing fetched, every
plot drawn with as many values as the page declares. The terminal side: a progress bar on a
pseudo-terminal, nothing on a pipe, and the plain lines unchanged when piped.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import termios
from pathlib import Path

import pytest

from ringwatch.cluster import ClusterSpec, FaultSpec, run_cluster

from jobtools import PY, REPO, job_env, ringwatch_cmd, run_job

H200 = REPO / "tests" / "data" / "h200"

# Injected first in <head> of a copy of the page: records errors (script, resource, console)
# and, once loaded, what each plot drew as the browser parsed it, into <pre id="rw-check">.
CHECK_JS = """
window.__rw = {errors: [], plots: {}, resources: []};
addEventListener('error', e => __rw.errors.push('error: ' + (e.message ||
  (e.target && (e.target.src || e.target.href)) || 'a resource failed')), true);
const _ce = console.error;
console.error = function (...a) { __rw.errors.push('console.error: ' + a.join(' '));
  _ce.apply(console, a); };
addEventListener('load', () => {
  for (const f of document.querySelectorAll('figure.plot')) {
    let n = 0;
    for (const p of f.querySelectorAll('polyline.series')) n += p.points.numberOfItems;
    for (const p of f.querySelectorAll('polygon.band')) n += p.points.numberOfItems / 2;
    n += f.querySelectorAll('rect.cell').length;
    const svg = f.querySelector('svg');
    const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    __rw.plots[f.dataset.plot] = {drawn: n, declared: Number(f.dataset.points),
      empty: f.dataset.empty || null, width: box.width, height: box.height,
      title: f.querySelector('figcaption').textContent,
      axes: [...f.querySelectorAll('svg text.axis-name')].map(t => t.textContent)};
  }
  __rw.resources = performance.getEntriesByType('resource').map(r => r.name);
  const pre = document.createElement('pre');
  pre.id = 'rw-check';
  pre.textContent = JSON.stringify(__rw);
  document.body.appendChild(pre);
});
"""


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is missing: install the Debian package chromium "
                    "(tests/tools/require.sh does)")
    return path


def load_in_chromium(page: Path, tmp_path: Path) -> dict:
    """What headless Chromium saw of ``page``: errors, resources fetched, plots drawn."""
    html = page.read_text()
    probe = tmp_path / f"checked-{page.name}"
    probe.write_text(html.replace("<head>", f"<head><script>{CHECK_JS}</script>", 1))
    # no network: every request goes to a proxy that is not there (file:// needs none)
    cmd = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
           f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r'<pre id="rw-check">(.*?)</pre>', p.stdout, re.S)
    assert m, f"the check did not run: {p.stdout[-500:]} {p.stderr[-1500:]}"
    import html as _html

    return json.loads(_html.unescape(m.group(1)))


def assert_plots_drawn(seen: dict, keys: list[str]) -> None:
    assert seen["errors"] == [], seen["errors"]
    assert seen["resources"] == [], seen["resources"]  # nothing fetched
    assert sorted(seen["plots"]) == sorted(keys), seen["plots"]
    for key, p in seen["plots"].items():
        assert p["empty"] is None, (key, p)
        assert p["drawn"] > 0 and p["drawn"] == p["declared"], (key, p)
        assert p["width"] > 300 and p["height"] > 100, (key, p)
        assert len(p["axes"]) == 2 and all(p["axes"]), (key, p)  # both axes named


@pytest.fixture(scope="module")
def straggler_run(tmp_path_factory):
    """4 ranks on 2 (loopback) hosts, 40 steps; rank 3 does twice the work from step 24."""
    d = tmp_path_factory.mktemp("report")
    spec = ClusterSpec(run_dir=d / "run", nproc=4, hosts=2, steps=40, netns="off",
                       job_args=("--batch", "64", "--step-sleep-ms", "60"))
    result = run_cluster(spec, FaultSpec(kind="straggler", rank=3, at_step=24,
                                         straggler_mode="work", factor=2.0))
    assert result.ok, result
    return d, result


def test_page_of_a_straggler_run_draws_every_plot_in_chromium(straggler_run, tmp_path):
    d, result = straggler_run
    # a real probe over 4 ranks on loopback, for the link matrix
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           "-m", "ringwatch._probe", "--out", "probe.json", "--size-kb", "256",
           "--repeats", "2", "--lat-repeats", "2", "--schedule", "rounds",
           "--include-same-host"]
    rc, out = run_job(cmd, cwd=tmp_path, env=job_env(RINGWATCH_HOST="box"), timeout=170)
    assert rc == 0, out
    page = tmp_path / "report.html"
    p = subprocess.run(ringwatch_cmd("analyze", str(result.log_dir), "--probe",
                                     str(tmp_path / "probe.json"), "--html", str(page)),
                       capture_output=True, text=True, timeout=300, env=job_env())
    assert p.returncode == 0, p.stderr
    assert "STRAGGLER (compute straggler): rank 3" in p.stdout, p.stdout
    html = page.read_text()
    assert "<script" not in html and not re.search(r"(src|href)=", html)  # self-contained
    assert "STRAGGLER (compute straggler): rank 3 (local 1) on host1" in html
    assert "fixing it saves" in html
    seen = load_in_chromium(page, tmp_path)
    assert_plots_drawn(seen, ["lateness", "timeline-wait", "timeline-comm", "bandwidth",
                              "probe"])
    assert "rank 3" in seen["plots"]["timeline-wait"]["title"]
    assert seen["plots"]["lateness"]["drawn"] == 4 * 40  # every rank, every step
    if os.environ.get("RINGWATCH_SCREENSHOT"):  # docs/report.png: see docs/report.md
        shot = Path(os.environ["RINGWATCH_SCREENSHOT"])
        subprocess.run([chromium(), "--headless", "--disable-gpu", "--no-sandbox",
                        "--hide-scrollbars", "--proxy-server=127.0.0.1:9",
                        f"--user-data-dir={tmp_path / 'chromium-shot'}",
                        "--window-size=1560,1640", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, timeout=120, check=True)


def test_page_of_the_h200_capture_draws_power_over_the_steps(tmp_path):
    page = tmp_path / "h200.html"
    p = subprocess.run(ringwatch_cmd("analyze", str(H200 / "logs" / "train-nccl-idle"),
                                     "--html", str(page), "--gpu-recording",
                                     str(H200 / "nvml-ddp-nccl.jsonl.gz")),
                       capture_output=True, text=True, timeout=120, env=job_env())
    assert p.returncode == 0, p.stderr
    seen = load_in_chromium(page, tmp_path)
    assert seen["errors"] == [] and seen["resources"] == [], seen
    plots = seen["plots"]
    # one rank, no culprit: those plots say why instead of drawing nothing
    for key in ("lateness", "timeline-wait", "timeline-comm"):
        assert plots[key]["empty"] and plots[key]["drawn"] == 0, plots[key]
    for key in ("bandwidth", "power", "power-step", "power-per-step"):
        assert plots[key]["empty"] is None and plots[key]["drawn"] == plots[key]["declared"]
        assert plots[key]["drawn"] > 0, plots[key]
    # the 150 steps of ~175 ms at 20 Hz: some 27 s of readings, over 500 of them
    assert plots["power"]["drawn"] > 500, plots["power"]


def _on_pty(cmd: list[str], *, stderr_tty: bool, stdout_tty: bool = False) -> tuple[str, str]:
    """Run ``cmd`` with stdout on a pipe (or the terminal) and stderr on a pseudo-terminal (or
    a pipe); what went to the terminal is returned as stderr."""
    if not stderr_tty:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=job_env())
        assert p.returncode == 0, p.stderr
        return p.stdout, p.stderr
    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(cmd, stdout=sub if stdout_tty else subprocess.PIPE, stderr=sub,
                            env=job_env())
    os.close(sub)
    err = b""
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    out = "" if stdout_tty else proc.stdout.read().decode()
    assert proc.wait(timeout=60) == 0, err
    os.close(main)
    return out, err.decode(errors="replace")


def test_progress_bar_on_a_terminal_and_nothing_on_a_pipe(straggler_run):
    _, result = straggler_run
    cmd = ringwatch_cmd("analyze", str(result.log_dir))
    out_tty, err_tty = _on_pty(cmd, stderr_tty=True)
    out_pipe, err_pipe = _on_pty(cmd, stderr_tty=False)
    # the bar redraws a few times a second: a run this short shows the first and last stages
    assert re.search(r"(reading run's files|decoding run's rows)\W.*4/4", err_tty), err_tty
    assert re.search(r"analysing: [a-z ]+\W.*[0-5]/5", err_tty) and "━" in err_tty, err_tty
    assert "\x1b[" in err_tty  # drawn with terminal control sequences
    assert err_pipe == "", err_pipe
    # stdout is a pipe both times: the plain lines, the same
    assert out_tty == out_pipe and out_pipe.startswith("job run: 4 rank(s)"), out_pipe
    assert "\x1b[" not in out_pipe


def test_summary_on_a_terminal_is_a_coloured_table(straggler_run):
    _, result = straggler_run
    _, screen = _on_pty(ringwatch_cmd("analyze", str(result.log_dir)), stderr_tty=True,
                        stdout_tty=True)
    assert re.search(r"\d finding\(s\)", screen) and "saves per step" in screen, screen
    assert "straggler (compute straggler)" in screen and "rank 3 (local 1) on host1" in screen
    assert "\x1b[1;31m" in screen  # the straggler's kind in bold red
    assert "┃" in screen or "│" in screen  # table borders
