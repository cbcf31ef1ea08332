"""Record real readings to a compact file, and play them back as a device client.

``ringwatch agent --record FILE`` writes every NVML and host reading it takes to ``FILE``:
gzip-compressed JSON lines, flushed (``Z_SYNC_FLUSH``) every few seconds so a killed agent
leaves a readable file. The first line is a header (format, version, host, GPU identities,
the order of the fast fields); then one line per reading, times in ns since the recording
started::

    ["f", t_ns, gpu, [energy_mj, power_instant_mw, ...]]   fast reading (null: GPU lost)
    ["s", t_ns, gpu, {slow reading fields}]                slow reading
    ["h", t_ns, {host reading fields}]                     host reading

:class:`ReplayClient` is a :class:`~ringwatch.collectors._types.DeviceClient` that plays such a
file back with its original timing (``replayed = True``: every output says so), and
:class:`ReplayHost` does the same for the host collector. Played in a loop, the energy counter
keeps climbing across each wrap (as a real one does); other counters restart at the wrap, as
after a driver reload.
"""

from __future__ import annotations

import bisect
import gzip
import json
import threading
import zlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ringwatch._clock import Clock, SystemClock
from ringwatch.collectors._types import (
    CollectorError,
    FastReading,
    GpuIdentity,
    HostReading,
    IbPortReading,
    NicReading,
    NvLinkReading,
    SlowReading,
)

FORMAT = "ringwatch-recording"
VERSION = 1
FAST_FIELDS = tuple(f.name for f in fields(FastReading))


class RecordingWriter:
    """Appends readings to a recording; thread-safe (the fast and slow samplers share it).

    Args:
        path: File to create (replaced if it exists).
        host: Host name of the recorded node.
        gpus: The node's GPU identities.
        start_mono_ns: Monotonic time the recording's t=0 stands for.
        flush_interval_s: Seconds between sync flushes (what a SIGKILL can lose).
        clock: Monotonic clock for the flush schedule.
        origin: Where the readings came from: ``nvml`` (real hardware) or ``synthetic``.
    """

    def __init__(self, path: str | Path, *, host: str, gpus, start_mono_ns: int,
                 started_wall_ns: int, flush_interval_s: float = 5.0,
                 clock: Clock | None = None, origin: str = "nvml"):
        self.path = Path(path)
        self.start = start_mono_ns
        self.clock = clock or SystemClock()
        self.flush_ns = int(flush_interval_s * 1e9)
        self._lock = threading.Lock()
        self._f = gzip.GzipFile(self.path, "wb", compresslevel=6)
        self._next_flush = self.clock.mono_ns() + self.flush_ns
        self.lines = 0
        self._line({"format": FORMAT, "version": VERSION, "host": host, "origin": origin,
                    "started_wall_ns": started_wall_ns, "fast_fields": list(FAST_FIELDS),
                    "gpus": [asdict(g) for g in gpus]})

    def _line(self, obj) -> None:
        with self._lock:
            if self._f is None:
                return
            self._f.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
            self.lines += 1
            if self.clock.mono_ns() >= self._next_flush:
                self._f.flush(zlib.Z_SYNC_FLUSH)  # a reader can decode up to here
                self._next_flush = self.clock.mono_ns() + self.flush_ns

    def fast(self, index: int, mono_ns: int, r: FastReading | None) -> None:
        values = None if r is None else [getattr(r, f) for f in FAST_FIELDS]
        self._line(["f", mono_ns - self.start, index, values])

    def slow(self, index: int, mono_ns: int, r: SlowReading | None) -> None:
        self._line(["s", mono_ns - self.start, index, None if r is None else asdict(r)])

    def host(self, mono_ns: int, r: HostReading) -> None:
        self._line(["h", mono_ns - self.start, asdict(r)])

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None


def _slow_from(d: dict | None) -> SlowReading | None:
    if d is None:
        return None
    d = dict(d)
    d["nvlinks"] = tuple(NvLinkReading(**x) for x in d.get("nvlinks", ()))
    d["xid_total"] = {int(k): v for k, v in d.get("xid_total", {}).items()}
    return SlowReading(**d)


def _host_from(d: dict) -> HostReading:
    d = dict(d)
    d["nics"] = tuple(NicReading(**x) for x in d.get("nics", ()))
    d["ib_ports"] = tuple(IbPortReading(**x) for x in d.get("ib_ports", ()))
    return HostReading(**d)


@dataclass(frozen=True)
class Recording:
    """A recording in memory: per GPU, sorted times and readings."""

    host: str
    started_wall_ns: int
    gpus: tuple[GpuIdentity, ...]
    fast: dict[int, tuple[list[int], list]]
    slow: dict[int, tuple[list[int], list]]
    host_readings: tuple[list[int], list]
    duration_ns: int
    #: False when the file ended mid-line (a killed recorder): what came before is kept.
    complete: bool = True
    #: ``nvml`` for readings of real GPUs, ``synthetic`` for generated ones.
    origin: str = "nvml"


def load_recording(path: str | Path) -> Recording:
    """Read a recording.

    Raises:
        CollectorError: Not a ringwatch recording, or a version this reader does not know.
    """
    lines, complete = _lines(Path(path))
    if not lines:
        raise CollectorError(f"{path}: empty recording")
    try:
        header = json.loads(lines[0])
    except ValueError as exc:
        raise CollectorError(f"{path}: not a ringwatch recording") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CollectorError(f"{path}: not a ringwatch recording")
    if header.get("version") != VERSION:
        raise CollectorError(f"{path}: recording version {header.get('version')}, "
                             f"this reader knows {VERSION}")
    order = header["fast_fields"]
    gpus = tuple(GpuIdentity(**g) for g in header["gpus"])
    fast = {g.index: ([], []) for g in gpus}
    slow = {g.index: ([], []) for g in gpus}
    host: tuple[list[int], list] = ([], [])
    end = 0
    for raw in lines[1:]:
        try:
            rec = json.loads(raw)
        except ValueError:
            complete = False
            break
        kind, t = rec[0], rec[1]
        end = max(end, t)
        if kind == "f":
            r = None if rec[3] is None else FastReading(**dict(zip(order, rec[3], strict=True)))
            fast[rec[2]][0].append(t)
            fast[rec[2]][1].append(r)
        elif kind == "s":
            slow[rec[2]][0].append(t)
            slow[rec[2]][1].append(_slow_from(rec[3]))
        elif kind == "h":
            host[0].append(t)
            host[1].append(_host_from(rec[2]))
    return Recording(header.get("host", "?"), header.get("started_wall_ns", 0), gpus, fast,
                     slow, host, end, complete, str(header.get("origin", "nvml")))


def _lines(path: Path) -> tuple[list[str], bool]:
    """Lines of a gzip file that may have been cut short by a kill."""
    data = path.read_bytes()
    d = zlib.decompressobj(wbits=31)
    try:
        text = d.decompress(data).decode("utf-8", errors="replace")
        complete = d.eof
    except zlib.error:
        return [], False
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:
        lines.pop()  # the last line was cut
        complete = False
    return lines, complete


class _Timeline:
    """Where in a recording a clock is: elapsed ns, wrapped when looping."""

    def __init__(self, duration_ns: int, clock: Clock, loop: bool):
        self.duration = max(duration_ns, 1)
        self.clock = clock
        self.loop = loop
        self.t0: int | None = None

    def position(self) -> tuple[int, int]:
        """(ns into the recording, completed loops)."""
        now = self.clock.mono_ns()
        if self.t0 is None:
            self.t0 = now
        elapsed = now - self.t0
        if not self.loop:
            return min(elapsed, self.duration), 0
        return elapsed % (self.duration + 1), elapsed // (self.duration + 1)


def _at(series: tuple[list[int], list], t: int):
    times, values = series
    i = bisect.bisect_right(times, t) - 1
    return values[i] if i >= 0 else None


class ReplayClient:
    """A device client playing a recording back with its original timing.

    Args:
        recording: A loaded recording (or a path to one).
        clock: Monotonic clock; t=0 of the recording is the first call.
        loop: Start again at the end (the demo); otherwise hold the last readings.
    """

    replayed = True

    def __init__(self, recording: Recording | str | Path, *, clock: Clock | None = None,
                 loop: bool = True):
        self.rec = recording if isinstance(recording, Recording) else load_recording(recording)
        #: The ``source`` label of every GPU series: ``replay:nvml`` or ``replay:synthetic``.
        self.source = f"replay:{self.rec.origin}"
        self.timeline = _Timeline(self.rec.duration_ns, clock or SystemClock(), loop)
        self._energy_span = {}
        for i, (_, values) in self.rec.fast.items():
            energies = [v.energy_mj for v in values if v and v.energy_mj is not None]
            self._energy_span[i] = (energies[-1] - energies[0]) if energies else 0

    def devices(self) -> tuple[GpuIdentity, ...]:
        if not self.rec.gpus:
            raise CollectorError("the recording holds no GPU")
        self.timeline.position()
        return self.rec.gpus

    def read_fast(self, index: int) -> FastReading | None:
        t, loops = self.timeline.position()
        r = _at(self.rec.fast[index], t)
        if r is None or not loops or r.energy_mj is None:
            return r
        return replace(r, energy_mj=r.energy_mj + loops * self._energy_span[index])

    def read_slow(self, index: int) -> SlowReading | None:
        return _at(self.rec.slow[index], self.timeline.position()[0])

    def close(self) -> None:
        pass


class ReplayHost:
    """The host collector's stand-in over a recording (see :class:`ReplayClient`)."""

    def __init__(self, recording: Recording, *, clock: Clock | None = None, loop: bool = True):
        self.rec = recording
        self.timeline = _Timeline(recording.duration_ns, clock or SystemClock(), loop)

    def read(self) -> HostReading:
        return _at(self.rec.host_readings, self.timeline.position()[0]) or HostReading()
