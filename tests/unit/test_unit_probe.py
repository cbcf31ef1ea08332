"""The probe's pure parts: reading a bandwidth matrix as C4 does (slow row: sender side, slow
column: receiver side, single cell: that link; 2 hosts: ambiguous, and said so), the result's
validation, the pair schedules and the printed report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ringwatch._cli import main
from ringwatch._probe import FORMAT, ProbeConfig, pair_rounds, report
from ringwatch.analyzers._probe import (
    detect_probe_links,
    healthy_level,
    read_probe_matrix,
    row_labels,
)

DATA = Path(__file__).resolve().parents[1] / "data"
HOSTS4 = ("host0", "host1", "host2", "host3")


def _matrix(n: int, *, level: float = 1000.0, slow=(), factor: float = 0.05,
            noise: float = 0.0, seed: int = 0):
    """``n`` x ``n`` bandwidths at ``level`` MB/s, the cells of ``slow`` times ``factor``,
    each cell times a uniform draw in ``1 ± noise``."""
    rnd = random.Random(seed)
    m = [[None if i == j else level * (1 + rnd.uniform(-noise, noise)) for j in range(n)]
         for i in range(n)]
    for i, j in slow:
        m[i][j] *= factor
    return m


def _row(k, n):
    return [(k, j) for j in range(n) if j != k]


def _col(k, n):
    return [(i, k) for i in range(n) if i != k]


def test_healthy_matrix_has_no_finding():
    assert detect_probe_links(_matrix(4), HOSTS4) == ()


@pytest.mark.parametrize("seed", range(20))
def test_noise_of_thirty_percent_does_not_trigger(seed):
    m = _matrix(4, noise=0.3, seed=seed)
    assert detect_probe_links(m, HOSTS4) == ()
    assert detect_probe_links(_matrix(8, noise=0.3, seed=seed), [f"h{i}" for i in range(8)]) == ()


@pytest.mark.parametrize("n, k", [(3, 0), (3, 2), (4, 1), (8, 5)])
def test_slow_row_is_the_sender_side_of_its_host(n, k):
    hosts = [f"host{i}" for i in range(n)]
    f, = detect_probe_links(_matrix(n, slow=_row(k, n), noise=0.1), hosts)
    assert (f.kind, f.cls, f.ranks, f.hosts) == ("slow_link", "sender side", (k,), (hosts[k],))
    assert f.confidence > 0.9
    row, col = f.evidence[0], f.evidence[1]
    assert row.startswith(f"row host{k} (sending): {n - 1} of {n - 1} cells slow")
    assert col.startswith(f"column host{k} (receiving): 0 of {n - 1} cells slow")
    assert "median of the" in f.evidence[2] and "egress" in f.evidence[3]


@pytest.mark.parametrize("n, k", [(3, 1), (4, 3), (6, 0)])
def test_slow_column_is_the_receiver_side_of_its_host(n, k):
    hosts = [f"host{i}" for i in range(n)]
    f, = detect_probe_links(_matrix(n, slow=_col(k, n), noise=0.1), hosts)
    assert (f.cls, f.ranks, f.hosts) == ("receiver side", (k,), (hosts[k],))
    assert f"0 of {n - 1} cells slow" in f.evidence[0]
    assert f"{n - 1} of {n - 1} cells slow" in f.evidence[1]


@pytest.mark.parametrize("n", [3, 4, 5])
def test_slow_row_and_column_is_the_host_both_ways(n):
    # on 3 and 4 hosts that is 4 of 6 and 6 of 12 cells: more than the median of all cells
    # could take, not more than the upper half's
    f, = detect_probe_links(_matrix(n, slow=_row(1, n) + _col(1, n)), HOSTS4[:3] +
                           tuple(f"host{i}" for i in range(3, n)))
    assert (f.cls, f.hosts) == ("sender and receiver side", ("host1",))


def test_single_slow_cell_is_that_link():
    f, = detect_probe_links(_matrix(4, slow=[(2, 0)], noise=0.1), HOSTS4)
    assert (f.cls, f.ranks, f.hosts) == ("link", (2, 0), ("host2", "host0"))
    assert "host2->host0" in f.evidence[0] and "this direction only" in f.evidence[1]


def test_symmetric_slow_cells_are_one_link_both_ways():
    f, = detect_probe_links(_matrix(4, slow=[(1, 3), (3, 1)]), HOSTS4)
    assert (f.cls, f.ranks) == ("link", (1, 3))
    assert "both directions" in f.evidence[1]


def test_a_link_beside_a_slow_host_is_reported_after_it():
    slow = _row(0, 4) + [(2, 3)]
    found = detect_probe_links(_matrix(4, slow=slow), HOSTS4)
    assert [(f.cls, f.ranks) for f in found] == [("sender side", (0,)), ("link", (2, 3))]


@pytest.mark.parametrize("n, slow, want", [
    (4, _row(0, 4) + _row(1, 4), {("sender side", (0,)), ("sender side", (1,))}),
    (3, _row(0, 3) + _row(1, 3), {("sender side", (0,)), ("sender side", (1,))}),
    (3, _row(0, 3) + _col(2, 3), {("sender side", (0,)), ("receiver side", (2,))}),
    (5, _col(1, 5) + _col(4, 5), {("receiver side", (1,)), ("receiver side", (4,))}),
])
def test_two_faulty_hosts_are_both_named_and_nothing_else(n, slow, want):
    found = detect_probe_links(_matrix(n, slow=set(slow)), [f"h{i}" for i in range(n)])
    assert {(f.cls, f.ranks) for f in found} == want


def test_a_barely_slow_cell_is_less_certain_than_a_dead_one():
    weak, = detect_probe_links(_matrix(4, slow=[(0, 1)], factor=0.45), HOSTS4)
    dead, = detect_probe_links(_matrix(4, slow=[(0, 1)], factor=0.01), HOSTS4)
    assert weak.confidence < 0.6 < 0.9 < dead.confidence
    # a looser ratio lets the barely slow one pass
    assert detect_probe_links(_matrix(4, slow=[(0, 1)], factor=0.45), HOSTS4, ratio=0.4) == ()


def test_two_hosts_are_ambiguous_and_say_so():
    f, = detect_probe_links([[None, 30.0], [1000.0, None]], ["a", "b"])
    assert f.cls == "link or either side (2 hosts)" and f.hosts == ("a", "b")
    assert "cannot be told apart" in f.evidence[1] and "third host" in f.evidence[1]
    assert f.confidence <= 0.5
    assert detect_probe_links([[None, 900.0], [1000.0, None]], ["a", "b"]) == ()
    # both directions slow: only a reference can tell
    both = [[None, 30.0], [40.0, None]]
    assert detect_probe_links(both, ["a", "b"]) == ()
    f, = detect_probe_links(both, ["a", "b"], reference_MBps=1000.0)
    assert "both cells slow" in f.evidence[1] and "no healthy cell" in f.evidence[0]


def test_unmeasured_cells_and_latency_evidence():
    m = _matrix(3, slow=_row(2, 3))
    m[0][1] = None  # not measured
    lat = [[None, 50.0, 60.0], [50.0, None, 60.0], [61.0, 59.0, None]]
    f, = detect_probe_links(m, ["x", "y", "z"], lat_us=lat)
    assert f.cls == "sender side" and f.hosts == ("z",)
    assert f.evidence[-1] == "latency (round trip / 2) with z: median 60 µs vs 50 µs elsewhere"


def test_ranks_sharing_a_host_get_distinct_labels():
    assert row_labels(["a", "b"], [0, 1]) == ["a", "b"]
    assert row_labels(["a", "a", "b"], [0, 1, 2]) == ["a/r0", "a/r1", "b/r2"]
    f, = detect_probe_links(_matrix(3, slow=[(0, 1)]), ["a", "a", "b"], ranks=[4, 5, 6])
    assert f.ranks == (4, 5) and f.hosts == ("a",) and "a/r4->a/r5" in f.evidence[0]


def test_healthy_level_resists_half_the_cells_slow():
    assert healthy_level([10, 10, 10, 1000, 1000, 1000]) == 1000
    assert healthy_level([900, 1000, 1100]) == 1050


def test_bad_input_raises():
    with pytest.raises(ValueError, match="not 3 x 3"):
        detect_probe_links([[None, 1.0], [1.0, None]], ["a", "b", "c"])
    with pytest.raises(ValueError, match="ratio"):
        detect_probe_links(_matrix(3), ["a", "b", "c"], ratio=1.5)


def _doc(n=3, **kw):
    doc = {"format": FORMAT, "hosts": [f"host{i}" for i in range(n)], "ranks": list(range(n)),
           "bw_MBps": _matrix(n, slow=_col(1, n)), "lat_us": _matrix(n, level=50.0),
           "size_bytes": 1 << 22, "repeats": 5, "backend": "gloo", "schedule": "serial",
           "started": "2026-01-01T00:00:00+00:00", "wall_s": 1.0}
    doc.update(kw)
    return doc


def test_read_probe_matrix_validates():
    pm = read_probe_matrix(_doc())
    assert pm.hosts == ("host0", "host1", "host2") and pm.bw_MBps[1][1] is None
    with pytest.raises(ValueError, match="not a probe result"):
        read_probe_matrix({"format": "ringwatch-ground-truth/1"})
    with pytest.raises(ValueError, match="bw_MBps is not a 3 x 3"):
        read_probe_matrix(_doc(bw_MBps=[[1.0]]))
    with pytest.raises(ValueError, match=r"lat_us\[0\]\[1\] = -1"):
        read_probe_matrix(_doc(lat_us=[[None, -1, 1], [1, None, 1], [1, 1, None]]))


def test_report_prints_both_matrices_and_the_verdict():
    lines, found = report(_doc())
    text = "\n".join(lines)
    assert [f.cls for f in found] == ["receiver side"]
    assert "bandwidth, MB/s (median)" in text and "latency, µs" in text
    assert lines[2].split() == ["sender", "\\", "receiver", "host0", "host1", "host2"]
    assert lines[4].split() == ["host1", "1000", "-", "1000"]
    assert lines[3].split()[2] == "50.0"  # host0 -> host1, 5% of 1000
    assert "SLOW_LINK (receiver side): rank 1 on host1" in text
    healthy = _doc(bw_MBps=_matrix(3))
    assert report(healthy)[0][-1].startswith("no slow link")


@pytest.mark.parametrize("world", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("schedule", ["serial", "rounds"])
def test_schedules_cover_every_ordered_pair_once_with_disjoint_rounds(world, schedule):
    rounds = pair_rounds(world, schedule)
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == [(i, j) for i in range(world) for j in range(world) if i != j]
    for r in rounds:
        ranks = [x for p in r for x in p]
        assert len(ranks) == len(set(ranks)), r
    if schedule == "rounds":
        assert len(rounds) == 2 * (world - 1 + world % 2)
    else:
        assert all(len(r) == 1 for r in rounds)


def test_probe_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="at least 1 KiB"):
        ProbeConfig(size_bytes=10)
    with pytest.raises(ValueError, match="backend"):
        ProbeConfig(backend="mpi")
    with pytest.raises(ValueError, match="repeats"):
        ProbeConfig(repeats=0)


def test_a_cell_with_one_healthy_sample_is_not_slow():
    m = _matrix(4)
    m[0][1] = 300.0  # median: other load on the host spoiled most samples...
    best = _matrix(4)
    best[0][1] = 1600.0  # ...but one went through at full speed
    assert [f.cls for f in detect_probe_links(m, HOSTS4)] == ["link"]
    assert detect_probe_links(m, HOSTS4, best=best) == ()
    best[0][1] = 310.0
    f, = detect_probe_links(m, HOSTS4, best=best)
    assert "best sample too" in f.evidence[0]


def test_best_sample_guard_on_a_real_capture():
    """4 emulated hosts, host1's egress limited to 200 Mbit/s, measured on a loaded 2-core
    machine: host0->host1's median fell to 595 MB/s (samples 213..1642) under CPU contention."""
    doc = json.loads((DATA / "probe-4hosts-host1-egress-200mbit.json").read_text())
    pm = read_probe_matrix(doc)
    assert pm.bw_best_MBps[0][1] == max(doc["bw_samples_MBps"][0][1]) > 1500
    plain = detect_probe_links(pm.bw_MBps, pm.hosts)
    assert [(f.cls, f.hosts) for f in plain] == [("sender side", ("host1",)),
                                                 ("link", ("host0", "host1"))]
    guarded = detect_probe_links(pm.bw_MBps, pm.hosts, best=pm.bw_best_MBps)
    assert [(f.cls, f.hosts) for f in guarded] == [("sender side", ("host1",))]


@pytest.mark.parametrize("name", ["probe-3hosts-host1-egress-200mbit.json",
                                  "probe-4hosts-host1-egress-200mbit.json"])
def test_cli_reads_a_measured_result(name, capsys):
    """Results measured on the local cluster (host1's egress limited to 200 Mbit/s with tc
    tbf): the CLI names host1's sender side and nothing else, in text and in JSON."""
    path = DATA / name
    assert main(["probe", "--read", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 finding(s):" in out and "SLOW_LINK (sender side): rank 1 on host1" in out
    assert main(["probe", "--read", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    f, = doc["findings"]
    assert (f["kind"], f["cls"], f["hosts"]) == ("slow_link", "sender side", ["host1"])


def test_cli_read_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"format": "other"}))
    assert main(["probe", "--read", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ringwatch probe: not a probe result") and "\n" not in err
    assert main(["probe", "--read", str(tmp_path / "missing.json")]) == 1


def test_run_mode_outside_torchrun_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["probe"]) == 1
    assert "not under torchrun" in capsys.readouterr().err
