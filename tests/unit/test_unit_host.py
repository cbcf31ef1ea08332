"""The host collector against fake /sys and /proc trees built in tmp_path."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

from ringwatch._clock import FakeClock
from ringwatch.collectors._host import HostCollector
from ringwatch.collectors._types import HostReading, IbPortReading, NicReading

S = 1_000_000_000
STATS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets",
         "rx_errors", "tx_errors", "rx_dropped", "tx_dropped")


def put(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def add_nic(root: Path, name: str, base: int, *, oper="up", speed="100000") -> None:
    """Counters ``base + i`` in the order of STATS."""
    d = root / "sys/class/net" / name
    for i, f in enumerate(STATS):
        put(d / "statistics" / f, f"{base + i}\n")
    put(d / "operstate", oper + "\n")
    if speed is not None:
        put(d / "speed", speed + "\n")


def add_ib_port(root: Path, dev: str, port: int, counters: dict, *, hw=None,
                state="4: ACTIVE", rate="400 Gb/sec (4X NDR)") -> None:
    d = root / "sys/class/infiniband" / dev / "ports" / str(port)
    for name, value in counters.items():
        put(d / "counters" / name, f"{value}\n")
    for name, value in (hw or {}).items():
        put(d / "hw_counters" / name, f"{value}\n")
    put(d / "state", state + "\n")
    put(d / "rate", rate + "\n")


STAT = """cpu  1000 20 300 40000 50 6 70 8 0 0
cpu0 500 10 150 20000 25 3 35 4 0 0
intr 12345
"""
MEMINFO = """MemTotal:       16318480 kB
MemFree:         1000000 kB
MemAvailable:   12000000 kB
Buffers:          100 kB
"""


def add_proc(root: Path, *, pressure: bool = True) -> None:
    put(root / "proc/stat", STAT)
    put(root / "proc/loadavg", "1.25 0.80 0.50 2/345 6789\n")
    put(root / "proc/meminfo", MEMINFO)
    if pressure:
        for i, res in enumerate(("cpu", "memory", "io")):
            some = f"some avg10=0.00 avg60=0.10 avg300=0.20 total={1000 * (i + 1)}\n"
            full = "full avg10=0.00 avg60=0.00 avg300=0.00 total=999999\n"
            put(root / "proc/pressure" / res, some + ("" if res == "cpu" else full))


@pytest.fixture
def host(tmp_path: Path) -> Path:
    add_nic(tmp_path, "eth0", 100)
    add_nic(tmp_path, "eth1", 200, oper="down", speed="25000")
    add_nic(tmp_path, "lo", 900, oper="unknown", speed=None)
    add_proc(tmp_path)
    return tmp_path


def by_name(reading: HostReading) -> dict[str, NicReading]:
    return {n.name: n for n in reading.nics}


def test_nics_exact_counters_and_lo_skipped(host):
    nics = by_name(HostCollector(root=host).read())
    assert list(nics) == ["eth0", "eth1"]
    assert nics["eth0"] == NicReading(
        name="eth0", rx_bytes=100, tx_bytes=101, rx_packets=102, tx_packets=103, rx_errors=104,
        tx_errors=105, rx_dropped=106, tx_dropped=107, up=True, speed_mbps=100000)
    assert nics["eth1"].up is False and nics["eth1"].speed_mbps == 25000
    assert nics["eth1"].tx_dropped == 207


def test_loopback_included_on_request(host):
    nics = by_name(HostCollector(root=host, include_loopback=True).read())
    assert set(nics) == {"eth0", "eth1", "lo"}
    assert nics["lo"].rx_bytes == 900 and nics["lo"].speed_mbps is None
    assert nics["lo"].up is None  # operstate "unknown": the driver does not say


@pytest.mark.parametrize("speed", ["-1", "garbage", ""])
def test_unknown_speed_is_none(tmp_path, speed):
    add_nic(tmp_path, "veth0", 10, speed=speed)
    (nic,) = HostCollector(root=tmp_path).read().nics
    assert nic.speed_mbps is None and nic.rx_bytes == 10


def test_unreadable_speed_is_none(tmp_path):
    add_nic(tmp_path, "veth0", 10, speed=None)
    (tmp_path / "sys/class/net/veth0/speed").mkdir()  # reading it raises IsADirectoryError
    (nic,) = HostCollector(root=tmp_path).read().nics
    assert nic.speed_mbps is None and nic.tx_bytes == 11


def test_nics_filter(host):
    r = HostCollector(root=host, nics=["eth0", "eth9"]).read()
    assert [n.name for n in r.nics] == ["eth0"]


def test_ib_ports_words_to_bytes_and_counters(tmp_path):
    errors = {"symbol_error": 3, "link_error_recovery": 1, "link_downed": 2,
              "port_rcv_errors": 5, "port_xmit_discards": 7, "local_link_integrity_errors": 0,
              "excessive_buffer_overrun_errors": 4, "port_rcv_remote_physical_errors": 6,
              "port_xmit_wait": 123456}
    data = {"port_xmit_data": 1000, "port_rcv_data": 2500,
            "port_xmit_packets": 10, "port_rcv_packets": 20}
    add_ib_port(tmp_path, "mlx5_0", 1, {**data, **errors},
                hw={"out_of_buffer": 9, "rx_write_requests": 11, "lifespan": 10})
    add_ib_port(tmp_path, "mlx5_0", 2, {"port_xmit_data": 7, "port_rcv_data": 8},
                state="1: DOWN", rate="  10 Gb/sec (4X SDR)  ")
    ports = HostCollector(root=tmp_path).read().ib_ports
    assert [(p.device, p.port) for p in ports] == [("mlx5_0", 1), ("mlx5_0", 2)]
    p1, p2 = ports
    assert (p1.tx_bytes, p1.rx_bytes, p1.tx_packets, p1.rx_packets) == (4000, 10000, 10, 20)
    assert p1.counters == {**data, **errors, "hw_out_of_buffer": 9, "hw_rx_write_requests": 11}
    assert p1.state == "ACTIVE" and p1.rate == "400 Gb/sec (4X NDR)"
    assert p2 == IbPortReading(device="mlx5_0", port=2, tx_bytes=28, rx_bytes=32,
                               counters={"port_xmit_data": 7, "port_rcv_data": 8},
                               state="DOWN", rate="10 Gb/sec (4X SDR)")


def test_ib_garbage_counter_dropped_and_vanished_port_skipped(tmp_path):
    add_ib_port(tmp_path, "mlx5_0", 1, {"port_xmit_data": "x", "symbol_error": 1})
    add_ib_port(tmp_path, "mlx5_1", 1, {"port_xmit_data": 5})
    clock = FakeClock()
    c = HostCollector(root=tmp_path, clock=clock)
    (p,) = [q for q in c.read().ib_ports if q.device == "mlx5_0"]
    assert p.tx_bytes is None and p.counters == {"symbol_error": 1}
    shutil.rmtree(tmp_path / "sys/class/infiniband/mlx5_1")  # gone before the next rescan
    assert [q.device for q in c.read().ib_ports] == ["mlx5_0"]


def test_cpu_seconds_from_ticks(host):
    cpu = HostCollector(root=host, clk_tck=100).read().cpu_seconds
    assert cpu == {"user": 10.0, "nice": 0.2, "system": 3.0, "idle": 400.0, "iowait": 0.5,
                   "irq": 0.06, "softirq": 0.7, "steal": 0.08}
    assert HostCollector(root=host, clk_tck=250).read().cpu_seconds["user"] == 4.0


def test_load_and_memory(host):
    r = HostCollector(root=host).read()
    assert r.load1 == 1.25
    assert r.memory_total_bytes == 16318480 * 1024
    assert r.memory_available_bytes == 12000000 * 1024


def test_pressure_some_totals(host):
    r = HostCollector(root=host).read()
    assert r.pressure_some_us == {"cpu": 1000, "memory": 2000, "io": 3000}


def test_missing_pressure_is_empty(tmp_path):
    add_proc(tmp_path, pressure=False)
    r = HostCollector(root=tmp_path).read()
    assert r.pressure_some_us == {} and r.load1 == 1.25


def test_nic_list_rescanned_after_period(host):
    clock = FakeClock()
    c = HostCollector(root=host, clock=clock)
    assert set(by_name(c.read())) == {"eth0", "eth1"}
    add_nic(host, "eth2", 300)
    shutil.rmtree(host / "sys/class/net/eth1")
    # Until the rescan, the new NIC is not seen and the vanished one is dropped without error.
    assert set(by_name(c.read())) == {"eth0"}
    clock.advance(29 * S)
    assert set(by_name(c.read())) == {"eth0"}
    clock.advance(1 * S)
    nics = by_name(c.read())
    assert set(nics) == {"eth0", "eth2"} and nics["eth2"].rx_bytes == 300


def test_statistics_vanishing_under_a_listed_nic_gives_none(host):
    c = HostCollector(root=host, clock=FakeClock())
    c.read()
    shutil.rmtree(host / "sys/class/net/eth1/statistics")
    eth1 = by_name(c.read())["eth1"]
    assert eth1.rx_bytes is None and eth1.tx_dropped is None and eth1.up is False


def test_garbage_everywhere_never_raises_and_logs_once(tmp_path, caplog):
    add_nic(tmp_path, "eth0", 0)
    for f in ("rx_bytes", "tx_bytes"):
        put(tmp_path / "sys/class/net/eth0/statistics" / f, "lots\n")
    put(tmp_path / "proc/stat", "nonsense\n")
    put(tmp_path / "proc/loadavg", "\n")
    put(tmp_path / "proc/meminfo", "MemTotal: many kB\n")
    put(tmp_path / "proc/pressure/cpu", "some avg10=1 total=abc\n")
    caplog.set_level(logging.DEBUG, logger="ringwatch.collectors")
    c = HostCollector(root=tmp_path)
    r = c.read()
    c.read()
    (nic,) = r.nics
    assert nic.rx_bytes is None and nic.tx_bytes is None and nic.rx_packets == 2
    assert r.cpu_seconds == {} and r.load1 is None and r.memory_total_bytes is None
    assert r.pressure_some_us == {}
    stats_msgs = [m for m in caplog.messages if "statistics" in m]
    assert len(stats_msgs) == 1  # one cause, two files, two reads: said once


def test_missing_root_gives_empty_reading(tmp_path):
    assert HostCollector(root=tmp_path / "nothing").read() == HostReading()


def test_read_never_raises_on_a_bug(host, monkeypatch, caplog):
    c = HostCollector(root=host)

    def boom():
        raise RuntimeError("bug")

    monkeypatch.setattr(c, "_read_cpu_seconds", boom)
    r = c.read()
    c.read()
    assert r.cpu_seconds == {} and len(r.nics) == 2
    assert sum("reading cpu failed" in m for m in caplog.messages) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/sys/class/net"),
                    reason="needs a Linux /sys and /proc")
def test_real_machine():
    r = HostCollector(include_loopback=True).read()
    assert len(r.nics) >= 1 and all(n.rx_bytes is not None for n in r.nics)
    assert r.cpu_seconds["user"] > 0
    assert r.memory_total_bytes and r.memory_total_bytes > 0
