"""What the node collectors read, as frozen dataclasses, and the seams they plug into.

Units are in the field names (``energy_mj``, ``power_mw``, ``*_bytes``, ``*_ns``); a field the
device or the driver cannot give is ``None``, never a made-up zero. Counters are cumulative as
read (since driver load or boot); the exporters turn them into base units at the edge.

The one seam to the GPUs is :class:`DeviceClient`: the real NVML client
(:mod:`ringwatch.collectors._nvml`), a replay of a recording
(:mod:`ringwatch.collectors._replay`) and the tests' fakes all implement it, and nothing above
it knows which one it talks to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class CollectorError(RuntimeError):
    """A collector cannot start at all (no driver, no library); one line, said once."""


@dataclass(frozen=True, slots=True)
class GpuIdentity:
    """What does not change while the agent runs."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str | None = None
    serial: str | None = None
    memory_total_bytes: int | None = None
    #: True when MIG mode is on: per-instance readings are not taken, the whole GPU's are.
    mig_enabled: bool | None = None
    power_limit_default_mw: int | None = None
    power_limit_min_mw: int | None = None
    power_limit_max_mw: int | None = None
    driver_version: str | None = None


@dataclass(frozen=True, slots=True)
class FastReading:
    """The readings sampled at ≥20 Hz: power and energy swing with the training step."""

    #: Total energy since the driver loaded (``nvmlDeviceGetTotalEnergyConsumption``), mJ.
    energy_mj: int | None = None
    #: Instantaneous power (field ``NVML_FI_DEV_POWER_INSTANT``), mW.
    power_instant_mw: int | None = None
    #: ``nvmlDeviceGetPowerUsage``: a 1 s average on Ampere and newer, mW.
    power_average_mw: int | None = None
    sm_clock_mhz: int | None = None
    memory_clock_mhz: int | None = None


@dataclass(frozen=True, slots=True)
class NvLinkReading:
    """One NVLink of one GPU: cumulative throughput and error counters, and its far end."""

    link: int
    remote_pci_bus_id: str | None = None
    tx_bytes: int | None = None
    rx_bytes: int | None = None
    crc_errors: int | None = None
    replay_errors: int | None = None
    recovery_errors: int | None = None


@dataclass(frozen=True, slots=True)
class SlowReading:
    """The readings sampled at ~1 Hz (configurable): state that moves slowly or counts rarely."""

    #: Enforced power limit, out-of-band limits included, mW.
    power_limit_enforced_mw: int | None = None
    gpu_utilization_pct: int | None = None
    memory_utilization_pct: int | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: int | None = None
    #: Bit mask of the current clock throttle (event) reasons, as NVML defines them.
    throttle_reasons_mask: int | None = None
    #: Cumulative time throttled, ns, per reason (``power``, ``thermal``, ``sync_boost``, ...).
    throttle_time_ns: dict[str, int] = field(default_factory=dict)
    #: Volatile ECC error counts since the driver loaded.
    ecc_corrected_total: int | None = None
    ecc_uncorrected_total: int | None = None
    pcie_replay_total: int | None = None
    #: Rows of memory remapped to spares since manufacture (Ampere and newer), for correctable
    #: and uncorrectable errors; a remap waiting for the next GPU reset; a remap that failed
    #: (no spare left: the GPU needs service).
    remapped_rows_correctable_total: int | None = None
    remapped_rows_uncorrectable_total: int | None = None
    row_remap_pending: int | None = None
    row_remap_failed: int | None = None
    nvlinks: tuple[NvLinkReading, ...] = ()
    #: XID events seen since the agent started, per XID code.
    xid_total: dict[int, int] = field(default_factory=dict)


class DeviceClient(Protocol):
    """The seam to the GPUs of one node. Methods never raise for one bad field or GPU."""

    #: True when readings come from a recording, not from hardware (labelled in every output).
    replayed: bool

    def devices(self) -> tuple[GpuIdentity, ...]:
        """The GPUs of this node; raises :class:`CollectorError` when there is no driver."""

    def read_fast(self, index: int) -> FastReading | None:
        """Power, energy and clocks of one GPU now; ``None`` when the GPU is lost."""

    def read_slow(self, index: int) -> SlowReading | None:
        """Everything else of one GPU now; ``None`` when the GPU is lost."""

    def close(self) -> None:
        """Release the library and stop any thread it started."""


@dataclass(frozen=True, slots=True)
class NicReading:
    """Cumulative counters of one network interface (``/sys/class/net/<name>/statistics``)."""

    name: str
    rx_bytes: int | None = None
    tx_bytes: int | None = None
    rx_packets: int | None = None
    tx_packets: int | None = None
    rx_errors: int | None = None
    tx_errors: int | None = None
    rx_dropped: int | None = None
    tx_dropped: int | None = None
    #: ``operstate`` is ``up``.
    up: bool | None = None
    #: Link speed, Mbit/s (``speed``); ``None`` where the driver does not say (virtual links).
    speed_mbps: int | None = None


@dataclass(frozen=True, slots=True)
class IbPortReading:
    """Cumulative counters of one InfiniBand/RoCE port (``/sys/class/infiniband``).

    ``port_xmit_data``/``port_rcv_data`` count 4-byte words; they are converted to bytes here.
    """

    device: str
    port: int
    rx_bytes: int | None = None
    tx_bytes: int | None = None
    rx_packets: int | None = None
    tx_packets: int | None = None
    #: Every counter of the port's ``counters/`` folder (raw, errors, discards, ...), by name;
    #: ``hw_counters/*`` as ``hw_<name>``.
    counters: dict[str, int] = field(default_factory=dict)
    state: str | None = None
    rate: str | None = None


@dataclass(frozen=True, slots=True)
class HostReading:
    """One read of the host: NICs, IB ports, CPU and memory basics."""

    nics: tuple[NicReading, ...] = ()
    ib_ports: tuple[IbPortReading, ...] = ()
    #: Cumulative CPU time of all cores, seconds, per mode (``user``, ``system``, ``idle``, ...).
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    load1: float | None = None
    memory_total_bytes: int | None = None
    memory_available_bytes: int | None = None
    #: Pressure-stall totals (``/proc/pressure/{cpu,memory,io}`` "some" total), µs.
    pressure_some_us: dict[str, int] = field(default_factory=dict)
