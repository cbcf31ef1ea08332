"""``ringwatch probe`` for real: the pairwise send/recv test under torchrun on Gloo, over
emulated hosts (network namespaces) with and without a tc tbf limit on one host's egress, and
on loopback under ``torchrun --standalone``.

Emulated hosts need root. The CI machine is root, so there these tests always run; elsewhere
without root they are skipped (and in CI a missing root fails them instead).
"""

from __future__ import annotations

import json

import pytest

from ringwatch._probe import FORMAT
from ringwatch.analyzers._probe import detect_probe_links, read_probe_matrix
from ringwatch.cluster import leftovers
from ringwatch.cluster._netns import list_links, list_netns
from ringwatch.cluster._owner import ID_RE, is_alive
from ringwatch.cluster._probe_run import run_probe_cluster

from jobtools import PY, job_env, need_netns, ringwatch_cmd, run_job

# 4 MiB takes a few ms on a healthy veth pair and ~0.15 s through a 200 Mbit/s tbf (25 MB/s,
# its 500 KB burst included); 7 sweeps keep the medians steady on a loaded 2-core machine.
PROBE = ("--size-kb", "4096", "--repeats", "7", "--lat-repeats", "3")
RATE_MBIT = 200.0


@pytest.fixture(autouse=True)
def nothing_left_over():
    """After every test: no namespace, link, process or lock file of a finished run (runs whose
    owner is still alive, e.g. another test process's, are not this test's)."""
    yield
    assert leftovers() == {}
    ours = [n for n in list_netns() + list_links()
            if (m := ID_RE.match(n)) and not is_alive(m.group(1))]
    assert ours == []


def test_egress_limit_on_one_host_is_read_as_its_sender_side(tmp_path):
    """tbf on what host1 sends: its row is slow, its column is not; the CLI names host1's
    sender side and the result file says the same to the analyzer."""
    need_netns()
    run_dir = tmp_path / "run"
    rc, out = run_job(ringwatch_cmd("cluster", "--probe", "--run-dir", str(run_dir),
                                    "--hosts", "3", "--netns", "on", "--fault", "link",
                                    "--victim-host", "1", "--direction", "egress",
                                    "--rate-mbit", str(RATE_MBIT), "--", *PROBE),
                      cwd=tmp_path, timeout=170)
    assert rc == 0, out
    assert "SLOW_LINK (sender side): rank 1 on host1" in out and "1 finding(s):" in out, out
    truth = json.loads((run_dir / "ground_truth.json").read_text())
    assert truth["applied"] and truth["host"] == "host1"
    assert truth["params"] == {"rate_mbit": RATE_MBIT, "loss_pct": None, "direction": "egress"}
    pm = read_probe_matrix(json.loads((run_dir / "probe.json").read_text()))
    assert pm.hosts == ("host0", "host1", "host2")
    bw = pm.bw_MBps
    slow = [bw[1][0], bw[1][2]]
    healthy = [bw[0][1], bw[0][2], bw[2][0], bw[2][1]]
    # the limit binds: at most 25 MB/s plus one burst (28 MB/s for 4 MiB), far below the rest
    assert all(v < 30 for v in slow), bw
    assert max(slow) < 0.2 * min(healthy), bw
    f, = detect_probe_links(bw, pm.hosts, lat_us=pm.lat_us, ranks=pm.ranks,
                           best=pm.bw_best_MBps)
    assert (f.kind, f.cls, f.hosts, f.ranks) == ("slow_link", "sender side", ("host1",), (1,))
    assert f.confidence > 0.8


def test_healthy_cluster_has_no_slow_link(tmp_path):
    need_netns()
    run = run_probe_cluster(tmp_path / "run", hosts=3, probe_args=PROBE, netns="on",
                            timeout_s=170)
    assert run.result.ok and run.result.mode == "netns", run.result
    assert run.result.ground_truth["kind"] == "none"
    doc = run.doc
    assert doc["format"] == FORMAT and doc["world_size"] == 3 and doc["schedule"] == "serial"
    assert doc["size_bytes"] == 4096 * 1024 and doc["repeats"] == 7
    assert doc["started_wall_ns"] < doc["finished_wall_ns"]
    pm = read_probe_matrix(doc)
    cells = [(i, j) for i in range(3) for j in range(3) if i != j]
    assert all(pm.bw_MBps[i][j] > 30 for i, j in cells), pm.bw_MBps
    assert all(len(doc["bw_samples_MBps"][i][j]) == 7 for i, j in cells)
    assert all(len(doc["lat_samples_us"][i][j]) == 21 for i, j in cells)
    assert detect_probe_links(pm.bw_MBps, pm.hosts, best=pm.bw_best_MBps) == (), \
        doc["bw_samples_MBps"]


def test_python_module_entry_on_loopback_with_rounds(tmp_path):
    """``python -m ringwatch._probe`` under ``torchrun --standalone``: all ranks on one host
    label, so only ``--include-same-host`` measures them; rounds of disjoint pairs."""
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
           "-m", "ringwatch._probe", "--out", "p.json", "--size-kb", "256", "--repeats", "2",
           "--lat-repeats", "2", "--schedule", "rounds", "--include-same-host"]
    rc, out = run_job(cmd, cwd=tmp_path, env=job_env(RINGWATCH_HOST="box"), timeout=170)
    assert rc == 0, out
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["hosts"] == ["box"] * 3 and doc["schedule"] == "rounds" and doc["same_host"]
    for i in range(3):
        for j in range(3):
            v = doc["bw_MBps"][i][j]
            assert (v is None) == (i == j) and (v is None or v > 0), doc["bw_MBps"]
            assert (doc["lat_us"][i][j] is None) == (i == j)
    assert "sender \\ receiver" in out and "box/r0" in out and "result: p.json" in out
