"""The host collector of the node sidecar: NIC, InfiniBand/RoCE, CPU, memory and pressure.

Everything is read from small ``/sys`` and ``/proc`` files under an injectable ``root`` (tests
build a fake tree), with plain ``open().read()``: one :meth:`HostCollector.read` of a node with
8 NICs and 8 IB ports costs well under a millisecond. The list of interfaces and ports is
cached and rescanned at most every 30 s.

A missing or unreadable file, a value that does not parse, or a device that vanishes between
the listing and the read gives ``None`` for that field (or drops the entry whose folder is
gone), never an exception; each cause is logged once on ``ringwatch.collectors``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ringwatch._clock import Clock, SystemClock
from ringwatch.collectors._types import HostReading, IbPortReading, NicReading

__all__ = ["RESCAN_INTERVAL_S", "HostCollector"]

log = logging.getLogger("ringwatch.collectors")
_T = TypeVar("_T")

#: How often the list of NICs and IB ports is rescanned, s.
RESCAN_INTERVAL_S = 30.0

_NIC_STATS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets",
              "rx_errors", "tx_errors", "rx_dropped", "tx_dropped")
_CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_PRESSURE = ("cpu", "memory", "io")
#: ``hw_counters/lifespan`` is a setting (ms between counter refreshes), not a counter.
_HW_NOT_COUNTERS = frozenset({"lifespan"})
#: Causes that are normal on some hosts (no PSI, virtual links): logged at DEBUG only.
_QUIET_ERRNOS = frozenset({errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV})


@dataclass(frozen=True, slots=True)
class _IbPort:
    """One port found by the scan: its folder and the counter file names it had then."""

    device: str
    port: int
    path: str
    counters: tuple[str, ...]
    hw_counters: tuple[str, ...]


class HostCollector:
    """Reads the host's NIC and IB counters, CPU times, load, memory and pressure stalls.

    ``root``: where ``sys/`` and ``proc/`` are found ("/" on a real host). ``nics``: only these
    interfaces (others are ignored). ``include_loopback``: report ``lo`` too (it is skipped
    otherwise, even when named in ``nics``). ``clock``: its ``mono_ns()`` drives the rescan
    period. ``clk_tck``: ticks per second of ``/proc/stat`` (``os.sysconf("SC_CLK_TCK")``).
    """

    def __init__(
        self,
        *,
        root: str | Path = "/",
        nics: Sequence[str] | None = None,
        include_loopback: bool = False,
        clock: Clock | None = None,
        clk_tck: int | None = None,
        rescan_interval_s: float = RESCAN_INTERVAL_S,
    ) -> None:
        self._root = os.fspath(root)
        self._net_dir = os.path.join(self._root, "sys", "class", "net")
        self._ib_dir = os.path.join(self._root, "sys", "class", "infiniband")
        self._proc = os.path.join(self._root, "proc")
        self._nic_filter = None if nics is None else frozenset(nics)
        self._include_loopback = include_loopback
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._clk_tck = clk_tck if clk_tck is not None else _default_clk_tck()
        self._rescan_ns = int(rescan_interval_s * 1e9)
        self._scanned_ns: int | None = None
        self._nic_names: tuple[str, ...] = ()
        self._ib_ports: tuple[_IbPort, ...] = ()
        self._logged: set[tuple[str, str]] = set()

    # -- the one public method ---------------------------------------------------------------

    def read(self) -> HostReading:
        """Everything now; a part that fails is left empty (``None``/``()``/``{}``)."""
        self._guard("scan", self._maybe_rescan, None)
        mem_total, mem_available = self._guard("meminfo", self._read_meminfo, (None, None))
        return HostReading(
            nics=self._guard("nics", self._read_nics, ()),
            ib_ports=self._guard("ib", self._read_ib_ports, ()),
            cpu_seconds=self._guard("cpu", self._read_cpu_seconds, {}),
            load1=self._guard("loadavg", self._read_load1, None),
            memory_total_bytes=mem_total,
            memory_available_bytes=mem_available,
            pressure_some_us=self._guard("pressure", self._read_pressure, {}),
        )

    # -- scanning ----------------------------------------------------------------------------

    def _maybe_rescan(self) -> None:
        """List NICs and IB ports again when the last scan is older than the period."""
        now = self._clock.mono_ns()
        if self._scanned_ns is not None and now - self._scanned_ns < self._rescan_ns:
            return
        self._scanned_ns = now
        self._nic_names = tuple(n for n in self._listdir(self._net_dir, "net") if self._wants(n))
        self._ib_ports = self._scan_ib()

    def _wants(self, name: str) -> bool:
        if name == "lo" and not self._include_loopback:
            return False
        return self._nic_filter is None or name in self._nic_filter

    def _scan_ib(self) -> tuple[_IbPort, ...]:
        ports = []
        for dev in self._listdir(self._ib_dir, "ib"):
            ports_dir = os.path.join(self._ib_dir, dev, "ports")
            for p in self._listdir(ports_dir, "ib/ports"):
                if not p.isdigit():
                    continue
                path = os.path.join(ports_dir, p)
                counters = self._listdir(os.path.join(path, "counters"), "ib/counters")
                hw = self._listdir(os.path.join(path, "hw_counters"), "ib/hw_counters")
                hw = [h for h in hw if h not in _HW_NOT_COUNTERS]
                ports.append(_IbPort(dev, int(p), path, tuple(counters), tuple(hw)))
        return tuple(sorted(ports, key=lambda x: (x.device, x.port)))

    # -- NICs and IB ports -------------------------------------------------------------------

    def _read_nics(self) -> tuple[NicReading, ...]:
        readings = (self._read_nic(name) for name in self._nic_names)
        return tuple(r for r in readings if r is not None)

    def _read_nic(self, name: str) -> NicReading | None:
        """One interface's counters (bytes, packets) and link; ``None`` when it is gone."""
        base = os.path.join(self._net_dir, name)
        if not os.path.isdir(base):
            return None
        stats = {f: self._read_int(f"{base}/statistics/{f}", "net/statistics") for f in _NIC_STATS}
        oper = self._read_text(f"{base}/operstate", "net/operstate")
        oper = None if oper is None else oper.strip()
        up = None if oper in (None, "unknown") else oper == "up"
        speed = self._read_int(f"{base}/speed", "net/speed")  # Mbit/s; -1 when unknown
        return NicReading(name=name, up=up, speed_mbps=speed if speed and speed > 0 else None,
                          **stats)

    def _read_ib_ports(self) -> tuple[IbPortReading, ...]:
        readings = (self._read_ib_port(p) for p in self._ib_ports)
        return tuple(r for r in readings if r is not None)

    def _read_ib_port(self, port: _IbPort) -> IbPortReading | None:
        """One port: data words ×4 → bytes, packets, every counter by file name; state, rate."""
        if not os.path.isdir(port.path):
            return None
        counters: dict[str, int] = {}
        for name in port.counters:
            value = self._read_int(f"{port.path}/counters/{name}", "ib/counters")
            if value is not None:
                counters[name] = value
        for name in port.hw_counters:
            value = self._read_int(f"{port.path}/hw_counters/{name}", "ib/hw_counters")
            if value is not None:
                counters["hw_" + name] = value
        state = self._read_text(f"{port.path}/state", "ib/state")  # e.g. "4: ACTIVE"
        rate = self._read_text(f"{port.path}/rate", "ib/rate")  # e.g. "400 Gb/sec (4X NDR)"
        return IbPortReading(
            device=port.device,
            port=port.port,
            rx_bytes=_words_to_bytes(counters.get("port_rcv_data")),
            tx_bytes=_words_to_bytes(counters.get("port_xmit_data")),
            rx_packets=counters.get("port_rcv_packets"),
            tx_packets=counters.get("port_xmit_packets"),
            counters=counters,
            state=(state.rpartition(":")[2].strip() or None) if state is not None else None,
            rate=(rate.strip() or None) if rate is not None else None,
        )

    # -- /proc -------------------------------------------------------------------------------

    def _read_cpu_seconds(self) -> dict[str, float]:
        """The ``cpu`` line of ``/proc/stat``: cumulative seconds of all cores, per mode."""
        line = self._read_text(os.path.join(self._proc, "stat"), "proc/stat", first_line=True)
        fields = line.split() if line else []
        if not fields or fields[0] != "cpu":
            if line is not None:
                self._once("proc/stat", "garbage", "no 'cpu' line in /proc/stat: %r", line[:80])
            return {}
        try:
            ticks = zip(_CPU_MODES, fields[1:], strict=False)  # older kernels have fewer
            return {mode: int(t) / self._clk_tck for mode, t in ticks}
        except ValueError:
            self._once("proc/stat", "garbage", "cannot parse /proc/stat: %r", line[:80])
            return {}

    def _read_load1(self) -> float | None:
        """The 1-minute load average of ``/proc/loadavg`` (runnable + D-state tasks)."""
        text = self._read_text(os.path.join(self._proc, "loadavg"), "proc/loadavg")
        return None if text is None else self._parse(float, text.split()[:1], "proc/loadavg")

    def _read_meminfo(self) -> tuple[int | None, int | None]:
        """``MemTotal`` and ``MemAvailable`` of ``/proc/meminfo``, bytes (the file says kB)."""
        text = self._read_text(os.path.join(self._proc, "meminfo"), "proc/meminfo")
        found: dict[str, int | None] = {}
        for line in (text or "").splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                kb = self._parse(int, rest.split()[:1], "proc/meminfo")
                found[key] = None if kb is None else kb * 1024
                if len(found) == 2:
                    break
        return found.get("MemTotal"), found.get("MemAvailable")

    def _read_pressure(self) -> dict[str, int]:
        """``some ... total=N`` of ``/proc/pressure/{cpu,memory,io}``, µs stalled, by resource."""
        out: dict[str, int] = {}
        for res in _PRESSURE:
            text = self._read_text(os.path.join(self._proc, "pressure", res), "proc/pressure")
            for line in (text or "").splitlines():
                if line.startswith("some "):
                    totals = [f[6:] for f in line.split() if f.startswith("total=")]
                    value = self._parse(int, totals, "proc/pressure")
                    if value is not None:
                        out[res] = value
        return out

    # -- small readers that never raise ------------------------------------------------------

    def _read_text(self, path: str, what: str, *, first_line: bool = False) -> str | None:
        """The file's text (or first line), ``None`` when it cannot be read."""
        try:
            with open(path, "rb", buffering=0) as f:  # unbuffered binary: the cheapest open
                data = f.read(4096) if first_line else f.read()
        except OSError as e:
            quiet = e.errno in _QUIET_ERRNOS
            self._once(what, type(e).__name__, "cannot read %s: %s", path, e.strerror, quiet=quiet)
            return None
        text = data.decode("ascii", "replace")
        return text.partition("\n")[0] if first_line else text

    def _read_int(self, path: str, what: str) -> int | None:
        """The file's one integer, ``None`` when missing, unreadable or not an integer."""
        text = self._read_text(path, what)
        return None if text is None else self._parse(int, [text.strip()], what, path)

    def _parse(
        self, kind: Callable[[str], _T], tokens: list[str], what: str, path: str = ""
    ) -> _T | None:
        """``kind(tokens[0])``, or ``None`` (logged once) when there is none or it is garbage."""
        try:
            return kind(tokens[0])
        except (IndexError, ValueError):
            self._once(what, "garbage", "unexpected value in %s: %r", path or what, tokens[:1])
            return None

    def _listdir(self, path: str, what: str) -> list[str]:
        """Sorted entries of a folder; ``[]`` when it is missing or unreadable."""
        try:
            return sorted(os.listdir(path))
        except OSError as e:
            quiet = e.errno in _QUIET_ERRNOS
            self._once(what, type(e).__name__, "cannot list %s: %s", path, e.strerror, quiet=quiet)
            return []

    def _guard(self, what: str, fn: Callable[[], Any], default: Any) -> Any:
        """``fn()``, or ``default`` when it raises anything (a bug: logged once)."""
        try:
            return fn()
        except Exception:  # read() must never raise; logged (with traceback) once below
            if ("bug:" + what, "") not in self._logged:
                self._logged.add(("bug:" + what, ""))
                log.warning("host collector: reading %s failed", what, exc_info=True)
            return default

    def _once(self, what: str, cause: str, msg: str, *args: object, quiet: bool = False) -> None:
        """Log ``msg`` the first time ``cause`` is seen for the kind of file ``what``."""
        if (what, cause) in self._logged:
            return
        self._logged.add((what, cause))
        log.log(logging.DEBUG if quiet else logging.WARNING,
                "host collector: " + msg + " (reported as None; said once)", *args)


def _words_to_bytes(words: int | None) -> int | None:
    """IB ``port_*_data`` counts 4-byte words (lanes of the link); bytes = words × 4."""
    return None if words is None else words * 4


def _default_clk_tck() -> int:
    """Ticks per second of ``/proc/stat`` (``USER_HZ``), 100 where sysconf cannot say."""
    try:
        tck = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 100
    return tck if tck > 0 else 100
