"""Node / GPU: one or more hosts' GPUs (power, clocks, throttling, heat, memory, errors,
NVLink) and their network (NICs, InfiniBand/RoCE ports).

Every GPU query is reduced per physical GPU first (``max by (host, gpu, uuid)``): a device-wide
reading seen twice (MIG instances, a rank label changing) is one reading, never two.
"""

from __future__ import annotations

from ringwatch.dashboards._frame import board, label_var
from ringwatch.dashboards._panels import q, stat_panel, timeline_panel, timeseries_panel
from ringwatch.dashboards._series import THROTTLE_BITS, agent, bit, by, per_gpu

GPU_INFO = agent("gpu", "info")
AGENT_CPU = agent("agent", "cpu_ns")
POWER = agent("gpu", "power_instant_mw")
LIMIT = agent("gpu", "power_limit_enforced_mw")
ENERGY = agent("gpu", "energy_mj")
SM_CLOCK = agent("gpu", "sm_clock_mhz")
MEM_CLOCK = agent("gpu", "memory_clock_mhz")
THROTTLE = agent("gpu", "throttle_reasons_mask")
THROTTLE_TIME = agent("gpu", "throttle_time_ns")
TEMPERATURE = agent("gpu", "temperature_c")
MEM_USED = agent("gpu", "memory_used_bytes")
MEM_TOTAL = agent("gpu", "memory_total_bytes")
UTIL_GPU = agent("gpu", "gpu_utilization_pct")
XID = agent("gpu", "xid_total")
ECC_CORRECTED = agent("gpu", "ecc_corrected_total")
ECC_UNCORRECTED = agent("gpu", "ecc_uncorrected_total")
PCIE_REPLAYS = agent("gpu", "pcie_replay_total")
# Both directions (or every error type) of one name: the direction/type label tells them apart.
NVLINK_BYTES = agent("nvlink", "tx_bytes").family()
NVLINK_ERRORS = agent("nvlink", "crc_errors").family()
NIC_BYTES = agent("nic", "rx_bytes").family()
NIC_ERRORS = agent("nic", "rx_errors").family()
NIC_DROPPED = agent("nic", "rx_dropped").family()
NIC_UP = agent("nic", "up")
IB_BYTES = agent("ib", "rx_bytes").family()
IB_COUNTERS = agent("ib", "counters")
IB_ACTIVE = agent("ib", "active")

G = {"host": "$host", "gpu": "$gpu"}
H = {"host": "$host"}
GPU_LEGEND = "{{host}} GPU {{gpu}}"
STATES = {0: ("off", "transparent"), 1: ("on", "orange")}


def build():
    b = board("node", "ringwatch / Node and GPU",
              "Per host and GPU: power against the enforced limit, energy, clocks and "
              "throttle reasons, temperature, memory, XID, ECC, PCIe and NVLink errors, and "
              "the host's NIC and InfiniBand counters. Series replayed from a recording say "
              "so in ringwatch_gpu_info's source label.",
              label_var("host", "Host", f"label_values({AGENT_CPU.name}, host)", multi=True,
                        description="Host name the agent reports (--host)."),
              label_var("gpu", "GPU", f'label_values({GPU_INFO.name}{{host=~"$host"}}, gpu)',
                        multi=True, description="GPU index on the host."))
    b.row("Power and energy")
    b.add(timeseries_panel("Power against the enforced limit", "Instantaneous power of each "
                           "GPU (sampled at 20 Hz) and its enforced power limit (dashed).",
                           "watt", q(per_gpu(POWER.sel(**G)), GPU_LEGEND),
                           q(per_gpu(LIMIT.sel(**G)), GPU_LEGEND + " limit"), min_val=0,
                           dashed=".* limit$"))
    b.add(timeseries_panel("Mean power from the energy counter", "Energy used per second "
                           "over the interval: the mean power, exact whatever the sampling.",
                           "watt", q(per_gpu(ENERGY.rate(**G)), GPU_LEGEND), min_val=0))
    b.add(stat_panel("Energy counter", "Each GPU's energy since its driver loaded.", "joule",
                     q(per_gpu(ENERGY.sel(**G)), GPU_LEGEND)), w=24, h=4)
    b.row("Clocks and throttling")
    b.add(timeseries_panel("Clocks", "SM and memory clock of each GPU.", "hertz",
                           q(per_gpu(SM_CLOCK.sel(**G)), GPU_LEGEND + " SM"),
                           q(per_gpu(MEM_CLOCK.sel(**G)), GPU_LEGEND + " memory")))
    b.add(timeseries_panel("Time throttled, per reason", "Share of each interval the GPU's "
                           "clocks were held down, per reason (NVML's violation counters).",
                           "percentunit", q(per_gpu(THROTTLE_TIME.rate(**G), "reason"),
                                            GPU_LEGEND + " {{reason}}"), min_val=0))
    b.add(timeline_panel("Throttle reasons", "Which clock throttle reasons each GPU reports "
                         "now (NVML's clocks event reasons mask, one row per reason).",
                         *(q(per_gpu(bit(THROTTLE.sel(**G), mask)), f"{GPU_LEGEND} {name}")
                           for mask, name in THROTTLE_BITS.items()), states=STATES),
          w=24, h=10)
    b.row("Heat and memory")
    b.add(timeseries_panel("Temperature", "GPU core temperature.", "celsius",
                           q(per_gpu(TEMPERATURE.sel(**G)), GPU_LEGEND)), w=8)
    b.add(timeseries_panel("Memory used", "GPU memory in use, and in all (dashed).", "bytes",
                           q(per_gpu(MEM_USED.sel(**G)), GPU_LEGEND),
                           q(per_gpu(MEM_TOTAL.sel(**G)), GPU_LEGEND + " total"), min_val=0,
                           dashed=".* total$"), w=8)
    b.add(timeseries_panel("Utilization", "Share of the last sample period the GPU was "
                           "busy.", "percentunit", q(per_gpu(UTIL_GPU.sel(**G)), GPU_LEGEND),
                           min_val=0), w=8)
    b.row("GPU errors")
    b.add(timeseries_panel("XID events per code", "XID events in each interval, per GPU and "
                           "XID code (79: fallen off the bus, 48/63/64: ECC, 13/31/43: "
                           "application faults).", "none",
                           q(per_gpu(XID.increase(**G), "xid"), GPU_LEGEND + " XID {{xid}}"),
                           bars=True, min_val=0), w=8)
    b.add(timeseries_panel("ECC errors", "Volatile ECC errors in each interval, corrected and "
                           "uncorrected.", "none",
                           q(per_gpu(ECC_CORRECTED.increase(**G)), GPU_LEGEND + " corrected"),
                           q(per_gpu(ECC_UNCORRECTED.increase(**G)),
                             GPU_LEGEND + " uncorrected"), bars=True, min_val=0), w=8)
    b.add(timeseries_panel("PCIe replays", "Replays of each GPU's PCIe link per second.",
                           "cps", q(per_gpu(PCIE_REPLAYS.rate(**G)), GPU_LEGEND), min_val=0),
          w=8)
    b.row("NVLink")
    b.add(timeseries_panel("NVLink throughput", "Data over all of each GPU's NVLinks, per "
                           "direction.", "Bps",
                           q(by("sum", ["host", "gpu", "direction"],
                                per_gpu(NVLINK_BYTES.rate(**G), "link", "direction")),
                             GPU_LEGEND + " {{direction}}"), min_val=0))
    b.add(timeseries_panel("NVLink errors", "CRC, replay and recovery errors per second, per "
                           "GPU and link.", "cps",
                           q(per_gpu(NVLINK_ERRORS.rate(**G), "link", "type"),
                             GPU_LEGEND + " link {{link}} {{type}}"), min_val=0))
    b.row("Network")
    b.add(timeseries_panel("NIC throughput", "Bytes per second through each network "
                           "interface, per direction.", "Bps",
                           q(by("max", ["host", "device", "direction"], NIC_BYTES.rate(**H)),
                             "{{host}} {{device}} {{direction}}"), min_val=0))
    b.add(timeseries_panel("NIC errors and drops", "Errors and dropped packets per second, "
                           "per interface and direction.", "cps",
                           q(by("max", ["host", "device", "direction"], NIC_ERRORS.rate(**H)),
                             "{{host}} {{device}} errors {{direction}}"),
                           q(by("max", ["host", "device", "direction"], NIC_DROPPED.rate(**H)),
                             "{{host}} {{device}} dropped {{direction}}"), min_val=0))
    b.add(timeseries_panel("InfiniBand throughput", "Bytes per second through each "
                           "InfiniBand/RoCE port, per direction.", "Bps",
                           q(by("max", ["host", "device", "port", "direction"],
                                IB_BYTES.rate(**H)),
                             "{{host}} {{device}}/{{port}} {{direction}}"), min_val=0))
    b.add(timeseries_panel("InfiniBand port counters", "Per second, each diagnostic counter "
                           "of each port (errors, discards, link downs, waits: what the "
                           "Prometheus config keeps).", "cps",
                           q(by("max", ["host", "device", "port", "counter"],
                                IB_COUNTERS.rate(**H)),
                             "{{host}} {{device}}/{{port}} {{counter}}"), min_val=0))
    b.add(timeline_panel("Link state", "NICs up and InfiniBand ports ACTIVE.",
                         q(by("max", ["host", "device"], NIC_UP.sel(**H)), "{{host}} {{device}}"),
                         q(by("max", ["host", "device", "port"], IB_ACTIVE.sel(**H)),
                           "{{host}} {{device}}/{{port}}"),
                         states={0: ("down", "red"), 1: ("up", "green")}), w=24, h=6)
    return b.build()
