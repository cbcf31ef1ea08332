"""Every metric the node sidecar exports, declared once, as data.

Both exporters (Prometheus ``/metrics`` and OpenTelemetry over OTLP) and the docs are generated
from :data:`METRICS`; nothing else names a metric. A spec says where its value comes from: the
``entity`` (one GPU, one NVLink, one NIC, one rank, ...) and the ``field`` of that entity's
reading, in internal units, times ``scale`` to reach the base unit. A field holding a dict
(throttle time per reason, XID events per code) gives one point per key, labelled ``key_label``.
Several specs may share one name (SM and memory clocks are one metric with a ``clock`` label),
with the same kind, unit and help.

Names: OpenTelemetry semantic conventions where they exist (``hw.energy``, ``hw.power``,
``hw.gpu.*``, ``system.network.*``); Prometheus names in base units with ``_total`` on counters
(``..._joules_total``, ``..._watts``, ``..._seconds_total``, ``..._bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

COUNTER = "counter"
GAUGE = "gauge"

#: Labels every point of an entity carries, Prometheus name -> OpenTelemetry attribute.
#: They are OpenTelemetry *resource* attributes (what produced the point) and plain labels on
#: ``/metrics``.
RESOURCE_LABELS = {
    "job": "ringwatch.job.id",
    "host": "host.name",
    "gpu": "hw.gpu.index",
    "uuid": "hw.id",
    "rank": "ringwatch.rank",
}
#: Labels of a point within its entity, Prometheus name -> OpenTelemetry attribute.
POINT_LABELS = {
    "kind": "ringwatch.power_limit.kind",
    "clock": "ringwatch.gpu.clock",
    "resource": "ringwatch.utilization.resource",
    "reason": "ringwatch.throttle.reason",
    "type": "error.type",
    "link": "ringwatch.nvlink.index",
    "remote": "ringwatch.nvlink.remote_pci_bus_id",
    "direction": "network.io.direction",
    "xid": "ringwatch.gpu.xid",
    "device": "network.interface.name",
    "port": "ringwatch.ib.port",
    "counter": "ringwatch.ib.counter",
    "mode": "cpu.mode",
    "pressure": "ringwatch.pressure.resource",
    "pg": "ringwatch.pg",
    "op": "ringwatch.op",
    "name": "hw.name",
    "pci_bus_id": "ringwatch.gpu.pci_bus_id",
    "driver": "ringwatch.driver_version",
    "mig": "ringwatch.gpu.mig",
    "source": "ringwatch.source",
    "pending_op": "ringwatch.pending.op",
    "cause": "ringwatch.cause",
    "step": "ringwatch.step",
    "pg_ranks": "ringwatch.pg.ranks",
    "pg_size": "ringwatch.pg.size",
    "group_rank": "ringwatch.pg.rank",
    "phase": "ringwatch.phase",
    "peer": "ringwatch.p2p.peer",
    "first_op": "ringwatch.p2p.first_op",
}


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One exported metric.

    Attributes:
        prom: Prometheus name (base units, ``_total`` on counters).
        otel: OpenTelemetry name.
        kind: :data:`COUNTER` (cumulative, monotonic) or :data:`GAUGE`.
        unit: UCUM unit for OpenTelemetry (``J``, ``W``, ``s``, ``By``, ``Hz``, ``Cel``, ``1``).
        help: One sentence for ``# HELP`` and the OTel description.
        entity: Which reading the value comes from (see :mod:`ringwatch.agent.sidecar._points`).
        field: Attribute of that reading, in internal units.
        scale: Factor from the internal unit to the base unit (mJ -> J: 1e-3).
        labels: Labels of the point within its entity, besides the resource labels.
        const_labels: Fixed labels of this spec (``clock="sm"``).
        key_label: For a dict field, the label its keys go to.
        otlp_only: Pushed over OTLP to the central service, never on ``/metrics``: one point
            per step is a stream, not a series (it would be a new series every step).
    """

    prom: str
    otel: str
    kind: str
    unit: str
    help: str
    entity: str
    field: str
    scale: float = 1.0
    labels: tuple[str, ...] = ()
    const_labels: dict[str, str] = field(default_factory=dict)
    key_label: str | None = None
    otlp_only: bool = False


def _m(prom, otel, kind, unit, help_, entity, field_, scale=1.0, /, labels=(), key_label=None,
       otlp_only=False, **const) -> MetricSpec:
    return MetricSpec(prom, otel, kind, unit, help_, entity, field_, scale, tuple(labels),
                      dict(const), key_label, otlp_only)


_MHZ, _MILLI, _MICRO, _NANO = 1e6, 1e-3, 1e-6, 1e-9
_LIMIT_HELP = "GPU power limit: enforced (out-of-band limits included), default, min, max."
_CLOCK_HELP = "GPU clock frequency, SM or memory."
_PHASE_HELP = ("GPU power while its rank computes or is in collectives, from the energy counter "
               "over the agent's phase window.")
_UTIL_HELP = "Fraction of the last sample period the GPU (or its memory) was busy."
_ECC_HELP = "Volatile ECC errors since the driver loaded, corrected or uncorrected."
_REMAP_HELP = ("Rows of GPU memory remapped to spare rows since manufacture, for correctable "
               "or uncorrectable errors.")
_NVLINK_BYTES_HELP = "NVLink data bytes since the counters were reset, per link and direction."
_NVLINK_ERR_HELP = "NVLink errors per link: CRC, replay and recovery."
_NIC_BYTES_HELP = "Bytes through a network interface, per direction."
_NIC_PKT_HELP = "Packets through a network interface, per direction."
_NIC_ERR_HELP = "Network interface errors, per direction."
_NIC_DROP_HELP = "Packets dropped by a network interface, per direction."
_IB_BYTES_HELP = "Bytes through an InfiniBand/RoCE port, per direction."
_STEP_LABELS = ("pg", "step", "pg_ranks", "pg_size", "group_rank")

METRICS: tuple[MetricSpec, ...] = (
    # --- GPU, fast (>=20 Hz) ---
    _m("ringwatch_gpu_energy_joules_total", "hw.energy", COUNTER, "J",
       "GPU energy since the driver loaded (the primary power signal).",
       "gpu", "energy_mj", _MILLI),
    _m("ringwatch_gpu_power_watts", "hw.power", GAUGE, "W",
       "GPU instantaneous power at the last sample.", "gpu", "power_instant_mw", _MILLI),
    _m("ringwatch_gpu_power_average_watts", "hw.gpu.power.average", GAUGE, "W",
       "GPU power as nvmlDeviceGetPowerUsage gives it (a 1 s average on Ampere and newer).",
       "gpu", "power_average_mw", _MILLI),
    _m("ringwatch_gpu_power_peak_watts", "hw.gpu.power.peak", GAUGE, "W",
       "Highest instantaneous power over the agent's power window.",
       "gpu", "power_peak_mw", _MILLI),
    _m("ringwatch_gpu_power_min_watts", "hw.gpu.power.min", GAUGE, "W",
       "Lowest instantaneous power over the agent's power window.",
       "gpu", "power_min_mw", _MILLI),
    _m("ringwatch_gpu_power_p99_watts", "hw.gpu.power.p99", GAUGE, "W",
       "99th percentile of the instantaneous power over the agent's power window.",
       "gpu", "power_p99_mw", _MILLI),
    _m("ringwatch_gpu_power_headroom_watts", "hw.gpu.power.headroom", GAUGE, "W",
       "Enforced power limit minus the 99th percentile of the power over the power window.",
       "gpu", "power_headroom_mw", _MILLI),
    _m("ringwatch_gpu_power_ramp_watts_per_second", "hw.gpu.power.ramp", GAUGE, "W/s",
       "Largest change of the instantaneous power between two updates over the power window, "
       "per second.", "gpu", "power_ramp_mw_per_s", _MILLI),
    _m("ringwatch_gpu_phase_power_watts", "hw.gpu.power.phase", GAUGE, "W", _PHASE_HELP,
       "gpu", "power_compute_mw", _MILLI, phase="compute"),
    _m("ringwatch_gpu_phase_power_watts", "hw.gpu.power.phase", GAUGE, "W", _PHASE_HELP,
       "gpu", "power_comm_mw", _MILLI, phase="comm"),
    _m("ringwatch_gpu_clock_hertz", "hw.gpu.clock", GAUGE, "Hz", _CLOCK_HELP,
       "gpu", "sm_clock_mhz", _MHZ, clock="sm"),
    _m("ringwatch_gpu_clock_hertz", "hw.gpu.clock", GAUGE, "Hz", _CLOCK_HELP,
       "gpu", "memory_clock_mhz", _MHZ, clock="memory"),
    _m("ringwatch_gpu_samples_total", "ringwatch.gpu.samples", COUNTER, "{sample}",
       "Fast (power/energy/clock) samples the agent took of this GPU.", "gpu", "samples"),
    # --- GPU, slow ---
    _m("ringwatch_gpu_power_limit_watts", "hw.gpu.power.limit", GAUGE, "W", _LIMIT_HELP,
       "gpu", "power_limit_enforced_mw", _MILLI, kind="enforced"),
    _m("ringwatch_gpu_power_limit_watts", "hw.gpu.power.limit", GAUGE, "W", _LIMIT_HELP,
       "gpu", "power_limit_default_mw", _MILLI, kind="default"),
    _m("ringwatch_gpu_power_limit_watts", "hw.gpu.power.limit", GAUGE, "W", _LIMIT_HELP,
       "gpu", "power_limit_min_mw", _MILLI, kind="min"),
    _m("ringwatch_gpu_power_limit_watts", "hw.gpu.power.limit", GAUGE, "W", _LIMIT_HELP,
       "gpu", "power_limit_max_mw", _MILLI, kind="max"),
    _m("ringwatch_gpu_utilization_ratio", "hw.gpu.utilization", GAUGE, "1", _UTIL_HELP,
       "gpu", "gpu_utilization_pct", 0.01, resource="gpu"),
    _m("ringwatch_gpu_utilization_ratio", "hw.gpu.utilization", GAUGE, "1", _UTIL_HELP,
       "gpu", "memory_utilization_pct", 0.01, resource="memory"),
    _m("ringwatch_gpu_memory_used_bytes", "hw.gpu.memory.usage", GAUGE, "By",
       "GPU memory in use.", "gpu", "memory_used_bytes"),
    _m("ringwatch_gpu_memory_total_bytes", "hw.gpu.memory.limit", GAUGE, "By",
       "GPU memory in all.", "gpu", "memory_total_bytes"),
    _m("ringwatch_gpu_temperature_celsius", "hw.temperature", GAUGE, "Cel",
       "GPU core temperature.", "gpu", "temperature_c"),
    _m("ringwatch_gpu_throttle_reasons", "hw.gpu.throttle.reasons", GAUGE, "1",
       "Bit mask of the GPU's current clock throttle reasons (NVML's clocks event reasons).",
       "gpu", "throttle_reasons_mask"),
    _m("ringwatch_gpu_throttle_seconds_total", "hw.gpu.throttle.time", COUNTER, "s",
       "Time the GPU's clocks were held down, per reason.", "gpu", "throttle_time_ns",
       _NANO, key_label="reason"),
    _m("ringwatch_gpu_ecc_errors_total", "hw.errors", COUNTER, "{error}", _ECC_HELP,
       "gpu", "ecc_corrected_total", type="ecc_corrected"),
    _m("ringwatch_gpu_ecc_errors_total", "hw.errors", COUNTER, "{error}", _ECC_HELP,
       "gpu", "ecc_uncorrected_total", type="ecc_uncorrected"),
    _m("ringwatch_gpu_pcie_replays_total", "hw.gpu.pcie.replays", COUNTER, "{replay}",
       "PCIe replays of the GPU's link.", "gpu", "pcie_replay_total"),
    _m("ringwatch_gpu_remapped_rows_total", "hw.gpu.memory.remapped_rows", COUNTER, "{row}",
       _REMAP_HELP, "gpu", "remapped_rows_correctable_total", type="correctable"),
    _m("ringwatch_gpu_remapped_rows_total", "hw.gpu.memory.remapped_rows", COUNTER, "{row}",
       _REMAP_HELP, "gpu", "remapped_rows_uncorrectable_total", type="uncorrectable"),
    _m("ringwatch_gpu_row_remap_pending", "hw.gpu.memory.row_remap.pending", GAUGE, "1",
       "1 while a row remap waits for the next GPU reset to take effect.", "gpu",
       "row_remap_pending"),
    _m("ringwatch_gpu_row_remap_failed", "hw.gpu.memory.row_remap.failed", GAUGE, "1",
       "1 once a row remap failed (no spare row left): the GPU needs service.", "gpu",
       "row_remap_failed"),
    _m("ringwatch_gpu_xid_events_total", "hw.gpu.xid.events", COUNTER, "{event}",
       "XID events seen since the agent started, per XID code.", "gpu", "xid_total",
       key_label="xid"),
    _m("ringwatch_gpu_info", "hw.gpu.info", GAUGE, "1",
       "Always 1: the GPU's identity, and whether its readings are replayed from a recording.",
       "gpu", "info", labels=("name", "pci_bus_id", "driver", "mig", "source")),
    # --- NVLink ---
    _m("ringwatch_gpu_nvlink_bytes_total", "hw.gpu.nvlink.io", COUNTER, "By",
       _NVLINK_BYTES_HELP, "nvlink", "tx_bytes", labels=("link", "remote"),
       direction="transmit"),
    _m("ringwatch_gpu_nvlink_bytes_total", "hw.gpu.nvlink.io", COUNTER, "By",
       _NVLINK_BYTES_HELP, "nvlink", "rx_bytes", labels=("link", "remote"),
       direction="receive"),
    _m("ringwatch_gpu_nvlink_errors_total", "hw.gpu.nvlink.errors", COUNTER, "{error}",
       _NVLINK_ERR_HELP, "nvlink", "crc_errors", labels=("link", "remote"), type="crc"),
    _m("ringwatch_gpu_nvlink_errors_total", "hw.gpu.nvlink.errors", COUNTER, "{error}",
       _NVLINK_ERR_HELP, "nvlink", "replay_errors", labels=("link", "remote"), type="replay"),
    _m("ringwatch_gpu_nvlink_errors_total", "hw.gpu.nvlink.errors", COUNTER, "{error}",
       _NVLINK_ERR_HELP, "nvlink", "recovery_errors", labels=("link", "remote"),
       type="recovery"),
    # --- host: NICs ---
    _m("ringwatch_network_bytes_total", "system.network.io", COUNTER, "By", _NIC_BYTES_HELP,
       "nic", "rx_bytes", labels=("device",), direction="receive"),
    _m("ringwatch_network_bytes_total", "system.network.io", COUNTER, "By", _NIC_BYTES_HELP,
       "nic", "tx_bytes", labels=("device",), direction="transmit"),
    _m("ringwatch_network_packets_total", "system.network.packets", COUNTER, "{packet}",
       _NIC_PKT_HELP, "nic", "rx_packets", labels=("device",), direction="receive"),
    _m("ringwatch_network_packets_total", "system.network.packets", COUNTER, "{packet}",
       _NIC_PKT_HELP, "nic", "tx_packets", labels=("device",), direction="transmit"),
    _m("ringwatch_network_errors_total", "system.network.errors", COUNTER, "{error}",
       _NIC_ERR_HELP, "nic", "rx_errors", labels=("device",), direction="receive"),
    _m("ringwatch_network_errors_total", "system.network.errors", COUNTER, "{error}",
       _NIC_ERR_HELP, "nic", "tx_errors", labels=("device",), direction="transmit"),
    _m("ringwatch_network_dropped_total", "system.network.dropped", COUNTER, "{packet}",
       _NIC_DROP_HELP, "nic", "rx_dropped", labels=("device",), direction="receive"),
    _m("ringwatch_network_dropped_total", "system.network.dropped", COUNTER, "{packet}",
       _NIC_DROP_HELP, "nic", "tx_dropped", labels=("device",), direction="transmit"),
    _m("ringwatch_network_up", "ringwatch.network.up", GAUGE, "1",
       "1 when the interface's operstate is up.", "nic", "up", labels=("device",)),
    _m("ringwatch_network_speed_bytes_per_second", "ringwatch.network.speed", GAUGE, "By/s",
       "Link speed the interface reports.", "nic", "speed_mbps", 1e6 / 8, labels=("device",)),
    # --- host: InfiniBand / RoCE ---
    _m("ringwatch_infiniband_bytes_total", "ringwatch.infiniband.io", COUNTER, "By",
       _IB_BYTES_HELP, "ib", "rx_bytes", labels=("device", "port"), direction="receive"),
    _m("ringwatch_infiniband_bytes_total", "ringwatch.infiniband.io", COUNTER, "By",
       _IB_BYTES_HELP, "ib", "tx_bytes", labels=("device", "port"), direction="transmit"),
    _m("ringwatch_infiniband_port_counter_total", "ringwatch.infiniband.counter", COUNTER, "1",
       "Every counter of an InfiniBand/RoCE port (errors, discards, waits), by file name.",
       "ib", "counters", labels=("device", "port"), key_label="counter"),
    _m("ringwatch_infiniband_port_active", "ringwatch.infiniband.active", GAUGE, "1",
       "1 when the port's state is ACTIVE.", "ib", "active", labels=("device", "port")),
    # --- host: CPU and memory ---
    _m("ringwatch_host_cpu_seconds_total", "system.cpu.time", COUNTER, "s",
       "CPU time of all cores, per mode.", "host", "cpu_seconds", key_label="mode"),
    _m("ringwatch_host_load1", "system.cpu.load_average.1m", GAUGE, "{thread}",
       "One-minute load average.", "host", "load1"),
    _m("ringwatch_host_memory_total_bytes", "system.memory.limit", GAUGE, "By",
       "Host memory in all.", "host", "memory_total_bytes"),
    _m("ringwatch_host_memory_available_bytes", "system.memory.available", GAUGE, "By",
       "Host memory available to new work (MemAvailable).", "host", "memory_available_bytes"),
    _m("ringwatch_host_pressure_seconds_total", "ringwatch.host.pressure", COUNTER, "s",
       "Time some task stalled on a resource (pressure stall information).",
       "host", "pressure_some_us", _MICRO, key_label="pressure"),
    # --- per-rank collective summaries (from the ranks' logs) ---
    _m("ringwatch_collectives_total", "ringwatch.collective.count", COUNTER, "{collective}",
       "Collectives a rank completed, per group and op.", "rank_op", "count",
       labels=("pg", "op")),
    _m("ringwatch_collective_bytes_total", "ringwatch.collective.io", COUNTER, "By",
       "Message bytes of a rank's completed collectives, per group and op.", "rank_op",
       "nbytes", labels=("pg", "op")),
    _m("ringwatch_collective_seconds_total", "ringwatch.collective.time", COUNTER, "s",
       "Time a rank spent inside collectives, per group and op.", "rank_op", "busy_ns",
       _NANO, labels=("pg", "op")),
    _m("ringwatch_collective_gap_seconds_total", "ringwatch.collective.gap", COUNTER, "s",
       "Time a rank spent between collectives (outside any), before each group and op.",
       "rank_op", "gap_ns", _NANO, labels=("pg", "op")),
    _m("ringwatch_collective_started_seq", "ringwatch.collective.started_seq", GAUGE, "1",
       "Sequence number of the last collective a rank started, per group.", "rank_pg",
       "last_started_seq", labels=("pg",)),
    _m("ringwatch_collective_completed_seq", "ringwatch.collective.completed_seq", GAUGE, "1",
       "Sequence number of the last collective a rank completed, per group.", "rank_pg",
       "last_completed_seq", labels=("pg",)),
    _m("ringwatch_collective_pending_seconds", "ringwatch.collective.pending", GAUGE, "s",
       "How long a rank's oldest unfinished collective has been pending (0: none).",
       "rank", "pending_ns", _NANO, labels=("pg", "pending_op")),
    _m("ringwatch_p2p_ops_total", "ringwatch.p2p.count", COUNTER, "{op}",
       "Send/recv ops a rank ran with one peer (global rank); first_op is the rank's first "
       "send/recv: the pipeline's first stage sends first.", "rank_p2p", "count",
       labels=("peer", "first_op")),
    _m("ringwatch_rank_step", "ringwatch.rank.step", GAUGE, "1",
       "Last training step a rank marked.", "rank", "step"),
    _m("ringwatch_rank_log_age_seconds", "ringwatch.rank.log_age", GAUGE, "s",
       "Seconds since the rank's log was last written (a silent agent ages).", "rank",
       "log_age_ns", _NANO),
    # --- per-rank, per-step totals: the central service's input (OTLP only) ---
    _m("ringwatch_step_collective_seconds", "ringwatch.step.collective.time", GAUGE, "s",
       "Time a rank spent inside one group's collectives in one finished step.", "rank_step",
       "busy_ns", _NANO, labels=_STEP_LABELS, otlp_only=True),
    _m("ringwatch_step_collective_bytes", "ringwatch.step.collective.io", GAUGE, "By",
       "Message bytes of a rank's collectives of one group in one finished step.",
       "rank_step", "nbytes", labels=_STEP_LABELS, otlp_only=True),
    _m("ringwatch_step_collectives", "ringwatch.step.collective.count", GAUGE,
       "{collective}", "Collectives of one group a rank ran in one finished step.",
       "rank_step", "count", labels=_STEP_LABELS, otlp_only=True),
    _m("ringwatch_step_collective_start_seconds", "ringwatch.step.collective.start", GAUGE,
       "s", "Wall clock (Unix seconds) when the rank's first collective of the group in the "
       "step started.", "rank_step", "first_start_ns", _NANO, labels=_STEP_LABELS,
       otlp_only=True),
    _m("ringwatch_step_collective_end_seconds", "ringwatch.step.collective.end", GAUGE, "s",
       "Wall clock (Unix seconds) when the rank's last collective of the group in the step "
       "ended.", "rank_step", "last_end_ns", _NANO, labels=_STEP_LABELS, otlp_only=True),
    _m("ringwatch_step_duration_seconds", "ringwatch.step.duration", GAUGE, "s",
       "A rank's finished step, from its first communication to the next step's first "
       "(monotonic clock).", "rank_work", "step_ns", _NANO, labels=("step",),
       otlp_only=True),
    _m("ringwatch_step_blocked_seconds", "ringwatch.step.blocked", GAUGE, "s",
       "Time a rank was blocked in communication in one finished step: blocking collectives "
       "and receives (overlaps once) and the wait for its asynchronous ones; for ops timed "
       "on the device, their device durations.", "rank_work",
       "blocked_ns", _NANO, labels=("step",), otlp_only=True),
    _m("ringwatch_step_recv_ops", "ringwatch.step.recv.count", GAUGE, "{op}",
       "Receives a rank completed from one sender (global rank) in one finished step.",
       "rank_recv", "count", labels=("step", "peer"), otlp_only=True),
    _m("ringwatch_step_recv_fastest_bytes", "ringwatch.step.recv.io", GAUGE, "By",
       "Size of a rank's fastest receive (bytes over duration) from one sender in one "
       "finished step: with its duration, the send/recv bandwidth between their hosts.",
       "rank_recv", "nbytes", labels=("step", "peer"), otlp_only=True),
    _m("ringwatch_step_recv_fastest_seconds", "ringwatch.step.recv.time", GAUGE, "s",
       "Duration of a rank's fastest receive from one sender in one finished step (on the "
       "device where it was timed there).", "rank_recv", "duration_ns", _NANO,
       labels=("step", "peer"), otlp_only=True),
    # --- the agent itself ---
    _m("ringwatch_agent_errors_total", "ringwatch.agent.errors", COUNTER, "{error}",
       "Reads or exports the agent could not do, per cause.", "agent", "errors",
       key_label="cause"),
    _m("ringwatch_agent_late_ticks_total", "ringwatch.agent.late_ticks", COUNTER, "{tick}",
       "Fast-sampling ticks that started later than one period behind schedule.", "agent",
       "late_ticks"),
    _m("ringwatch_agent_cpu_seconds_total", "ringwatch.agent.cpu.time", COUNTER, "s",
       "CPU time of the agent process.", "agent", "cpu_ns", _NANO),
)


def metric_names() -> set[str]:
    """Every Prometheus name, and the names the exposition derives from counters."""
    return {m.prom for m in METRICS}


def metrics_markdown() -> str:
    """``docs/metrics.md``: every metric of :data:`METRICS`, as a table."""
    rows: dict[str, list[MetricSpec]] = {}
    for m in METRICS:
        rows.setdefault(m.prom, []).append(m)
    out = ["# Metrics of the node sidecar (`ringwatch agent`)", "",
           "Generated from `ringwatch/_metrics.py` by `ringwatch schema --metrics`; do not edit.",
           "", "Every series also carries the resource labels of what produced it: "
           + ", ".join(f"`{k}` (OTel `{v}`)" for k, v in RESOURCE_LABELS.items())
           + ". On OTLP they are resource attributes; GPU resources add `ringwatch.source` "
           "(`nvml`, or `replay:...` for a recording) and `ringwatch.replayed`.", "",
           "| Prometheus | OpenTelemetry | type | unit | labels | source field | meaning |",
           "|---|---|---|---|---|---|---|"]
    for name, specs in rows.items():
        m = specs[0]
        labels = sorted({lab for s in specs for lab in (*s.labels, *s.const_labels,
                                                         *([s.key_label] if s.key_label
                                                           else []))})
        consts = "; ".join(f"{k}={v}" for s in specs for k, v in s.const_labels.items())
        src = ", ".join(f"`{s.entity}.{s.field}`" for s in specs)
        kind = f"{m.kind}, OTLP only" if m.otlp_only else m.kind
        out.append(f"| `{name}` | `{m.otel}` | {kind} | `{m.unit}` | "
                   f"{', '.join(f'`{x}`' for x in labels)}{f' ({consts})' if consts else ''} | "
                   f"{src} | {m.help} |")
    return "\n".join(out) + "\n"
