"""A fake NVML for the NVML client's tests: ``mock.create_autospec(pynvml)`` with the real
module's constants, exception classes and ctypes structures put back, whose functions answer
from a small per-GPU state. Any pynvml function no scenario answers raises ``AssertionError``.

Scenarios build on :func:`healthy`::

    node = healthy(2)
    gpu_lost(node, 1)
    client = NvmlClient(nvml=node.nvml)
"""

from __future__ import annotations

import ctypes
import queue
import time
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pynvml as real

KIB = 1024
DRIVER = "550.54.15"
# Violation counters (ns) of the fake GPUs, by NVML_PERF_POLICY_* number.
POLICIES = {0: "power", 1: "thermal", 2: "sync_boost", 3: "board_limit", 4: "low_utilization",
            5: "reliability", 10: "app_clocks", 11: "base_clocks"}
_PERF_FIELD_POLICY = {74: 0, 75: 1, 76: 2, 77: 3, 78: 4, 79: 5, 80: 10, 81: 11}


@dataclass
class FakeLink:
    """One active NVLink: far end, cumulative traffic in KiB, error counters."""

    remote_bus: str
    tx_kib: int
    rx_kib: int
    crc_flit: int
    crc_data: int
    replay: int
    recovery: int


@dataclass
class FakeGpu:
    """What one fake GPU answers; values differ per GPU so a mix-up shows."""

    index: int
    handle: Any
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    bus: str = ""
    serial: str = ""
    memory_total: int = 80 * 1024**3
    memory_used_v2: int = 0
    memory_used_v1: int = 0
    mig: bool = False
    power_default_mw: int = 700_000
    power_min_mw: int = 200_000
    power_max_mw: int = 700_000
    energy_mj: int = 0
    power_instant_mw: int = 0
    power_average_mw: int = 0
    sm_clock_mhz: int = 1980
    mem_clock_mhz: int = 2619
    enforced_mw: int = 650_000
    util_gpu: int = 0
    util_mem: int = 0
    temperature_c: int = 0
    event_reasons: int = 0x4
    violation_ns: dict[int, int] = field(default_factory=dict)
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    pcie_replay: int = 0
    remapped_cor: int = 0
    remapped_unc: int = 0
    remap_pending: int = 0
    remap_failed: int = 0
    links: dict[int, FakeLink] = field(default_factory=dict)
    #: pynvml function name (``nvmlDeviceGetMemoryInfo_v2`` for the versioned call) -> the
    #: NVML return code it raises.
    fails: dict[str, int] = field(default_factory=dict)
    #: Field id -> the nvmlReturn of that field in a batch.
    field_fails: dict[int, int] = field(default_factory=dict)
    lost: bool = False


@dataclass
class FakeNode:
    """The fake host: its GPUs, the autospecced module (``nvml``), the XID events to deliver."""

    gpus: list[FakeGpu]
    nvml: Any = None
    init_error: int | None = None
    init_exception: BaseException | None = None
    init_delay_s: float = 0.0
    wait_error: int | None = None
    events: queue.Queue = field(default_factory=queue.Queue)


def nvml_error(code: int) -> real.NVMLError:
    """The exception pynvml raises for return code ``code`` (its ``NVMLError_*`` subclass)."""
    return real.NVMLError(code)


def handle_at(address: int) -> Any:
    """A ctypes device handle at a made-up address (never dereferenced)."""
    return ctypes.cast(ctypes.c_void_p(address), real.c_nvmlDevice_t)


def _address(handle: Any) -> int:
    return ctypes.cast(handle, ctypes.c_void_p).value


def gpu_state(index: int) -> FakeGpu:
    """A healthy GPU whose every value carries its index."""
    i = index
    return FakeGpu(
        index=i, handle=handle_at(0x1000 * (i + 1)), uuid=f"GPU-0000000{i}-aaaa-bbbb-cccc-dddd",
        bus=f"00000000:{0x18 + i:02X}:00.0", serial=f"16523220{i:05d}",
        memory_used_v2=(10 + i) * 1024**3, memory_used_v1=(10 + i) * 1024**3 + 512 * 1024**2,
        energy_mj=123_456_789 + i, power_instant_mw=412_000 + i, power_average_mw=398_000 + i,
        sm_clock_mhz=1980 - i, mem_clock_mhz=2619, enforced_mw=650_000 + i,
        util_gpu=97 - i, util_mem=41 + i, temperature_c=63 + i, event_reasons=0x4 | i,
        violation_ns={policy: (policy + 1) * 1_000_000 + i for policy in POLICIES},
        ecc_corrected=5 + i, ecc_uncorrected=i, pcie_replay=17 + i,
        remapped_cor=2 + i, remapped_unc=i, remap_pending=i % 2, remap_failed=0,
        # Links 0 and 2 active, 1 inactive; the far end of link n of GPU i is GPU i+1 (mod 8).
        links={link: FakeLink(remote_bus=f"00000000:{0x18 + (i + 1) % 8:02X}:00.0",
                              tx_kib=1000 * (link + 1) + i, rx_kib=2000 * (link + 1) + i,
                              crc_flit=link + i, crc_data=100 + link, replay=10 + link + i,
                              recovery=20 + link + i)
               for link in (0, 2)},
    )


# -- scenarios -------------------------------------------------------------------------------

def healthy(n_gpus: int = 2) -> FakeNode:
    """A host with ``n_gpus`` GPUs that answer every field."""
    node = FakeNode(gpus=[gpu_state(i) for i in range(n_gpus)])
    node.nvml = _module(node)
    return node


def driver_missing(code: int = real.NVML_ERROR_DRIVER_NOT_LOADED) -> FakeNode:
    """``nvmlInit`` fails as on a host without the NVIDIA driver (or without libnvidia-ml)."""
    node = healthy(0)
    node.init_error = code
    return node


def library_unloadable() -> FakeNode:
    """``nvmlInit`` raises ``OSError``, as a broken libnvidia-ml does when it is loaded."""
    node = healthy(0)
    node.init_exception = OSError("libnvidia-ml.so.1: cannot open shared object file")
    return node


def gpu_lost(node: FakeNode, index: int) -> FakeNode:
    """GPU ``index`` falls off the bus: every call on it answers NVML_ERROR_GPU_IS_LOST."""
    node.gpus[index].lost = True
    return node


def power_not_supported(node: FakeNode, index: int) -> FakeNode:
    """GPU ``index`` reports no power: the two power fields and nvmlDeviceGetPowerUsage."""
    gpu = node.gpus[index]
    gpu.field_fails[real.NVML_FI_DEV_POWER_INSTANT] = real.NVML_ERROR_NOT_SUPPORTED
    gpu.field_fails[real.NVML_FI_DEV_POWER_AVERAGE] = real.NVML_ERROR_NOT_SUPPORTED
    gpu.fails["nvmlDeviceGetPowerUsage"] = real.NVML_ERROR_NOT_SUPPORTED
    return node


def ecc_disabled(node: FakeNode, index: int) -> FakeNode:
    """GPU ``index`` runs with ECC off: the ECC fields and nvmlDeviceGetTotalEccErrors fail."""
    gpu = node.gpus[index]
    gpu.field_fails[real.NVML_FI_DEV_ECC_SBE_VOL_TOTAL] = real.NVML_ERROR_NOT_SUPPORTED
    gpu.field_fails[real.NVML_FI_DEV_ECC_DBE_VOL_TOTAL] = real.NVML_ERROR_NOT_SUPPORTED
    gpu.fails["nvmlDeviceGetTotalEccErrors"] = real.NVML_ERROR_NOT_SUPPORTED
    return node


def row_remapping_not_supported(node: FakeNode, index: int) -> FakeNode:
    """GPU ``index`` predates row remapping (a V100, say): its four fields are unsupported."""
    for fid in (real.NVML_FI_DEV_REMAPPED_COR, real.NVML_FI_DEV_REMAPPED_UNC,
                real.NVML_FI_DEV_REMAPPED_PENDING, real.NVML_FI_DEV_REMAPPED_FAILURE):
        node.gpus[index].field_fails[fid] = real.NVML_ERROR_NOT_SUPPORTED
    return node


def average_power_field_missing(node: FakeNode, index: int) -> FakeNode:
    """GPU ``index`` (an A100, say) lacks NVML_FI_DEV_POWER_AVERAGE but has the function."""
    node.gpus[index].field_fails[real.NVML_FI_DEV_POWER_AVERAGE] = real.NVML_ERROR_NOT_SUPPORTED
    return node


def old_driver_without_v2(node: FakeNode) -> FakeNode:
    """A driver older than nvmlDeviceGetMemoryInfo_v2 and nvmlDeviceGetCurrentClocksEventReasons
    (pynvml raises NVMLError_FunctionNotFound for both)."""
    for gpu in node.gpus:
        gpu.fails["nvmlDeviceGetMemoryInfo_v2"] = real.NVML_ERROR_FUNCTION_NOT_FOUND
        gpu.fails["nvmlDeviceGetCurrentClocksEventReasons"] = real.NVML_ERROR_FUNCTION_NOT_FOUND
    return node


def mig_enabled(node: FakeNode, index: int) -> FakeNode:
    """GPU ``index`` runs in MIG mode."""
    node.gpus[index].mig = True
    return node


def xid_unsupported(node: FakeNode, index: int) -> FakeNode:
    """GPU ``index`` cannot register XID events."""
    node.gpus[index].fails["nvmlDeviceRegisterEvents"] = real.NVML_ERROR_NOT_SUPPORTED
    return node


def xid_event(node: FakeNode, index: int, code: int) -> FakeNode:
    """Queues one XID ``code`` of GPU ``index`` for ``nvmlEventSetWait_v2`` to deliver. The
    event's handle is a new ctypes object for the same device, as NVML's is."""
    data = real.c_nvmlEventData_t()
    data.device = handle_at(_address(node.gpus[index].handle))
    data.eventType = real.nvmlEventTypeXidCriticalError
    data.eventData = code
    node.events.put(data)
    return node


# -- the module ------------------------------------------------------------------------------

def _module(node: FakeNode) -> Any:
    """``create_autospec(pynvml)`` with the real constants and classes and the fake answers."""
    nvml = mock.create_autospec(real)
    for name in dir(real):
        value = getattr(real, name)
        if name.startswith("__"):
            continue
        if isinstance(value, (int, float, str, bytes, type)):
            setattr(nvml, name, value)
        elif callable(value) and name.startswith("nvml"):
            getattr(nvml, name).side_effect = _unexpected(name)
    for name, answer in _answers(node).items():
        getattr(nvml, name).side_effect = answer
    return nvml


def _unexpected(name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"unexpected NVML call: {name}")
    return call


def _answers(node: FakeNode) -> dict[str, Any]:
    by_address = {}

    def gpu_of(handle: Any, fn: str) -> FakeGpu:
        gpu = by_address.get(_address(handle))
        if gpu is None:
            by_address.update({_address(g.handle): g for g in node.gpus})
            gpu = by_address[_address(handle)]
        if gpu.lost:
            raise nvml_error(real.NVML_ERROR_GPU_IS_LOST)
        if fn in gpu.fails:
            raise nvml_error(gpu.fails[fn])
        return gpu

    def device(fn: str, answer: Any) -> Any:
        return lambda handle, *args: answer(gpu_of(handle, fn), *args)

    def init() -> None:
        if node.init_delay_s:
            time.sleep(node.init_delay_s)
        if node.init_exception is not None:
            raise node.init_exception
        if node.init_error is not None:
            raise nvml_error(node.init_error)

    def handle_by_index(index: int) -> Any:
        gpu = node.gpus[index]
        if gpu.lost:
            raise nvml_error(real.NVML_ERROR_GPU_IS_LOST)
        return gpu.handle

    def memory_info(handle: Any, version: Any = None) -> Any:
        if version:
            gpu = gpu_of(handle, "nvmlDeviceGetMemoryInfo_v2")
            mem = real.c_nvmlMemory_v2_t(version=version, total=gpu.memory_total,
                                         reserved=512 * 1024**2, used=gpu.memory_used_v2)
            mem.free = gpu.memory_total - mem.reserved - gpu.memory_used_v2
            return mem
        gpu = gpu_of(handle, "nvmlDeviceGetMemoryInfo")
        return real.c_nvmlMemory_t(total=gpu.memory_total, used=gpu.memory_used_v1,
                                   free=gpu.memory_total - gpu.memory_used_v1)

    def pci(gpu: FakeGpu) -> Any:
        info = real.nvmlPciInfo_t()
        info.busId = gpu.bus.encode()
        return info

    def clock(gpu: FakeGpu, kind: int) -> int:
        return {real.NVML_CLOCK_SM: gpu.sm_clock_mhz, real.NVML_CLOCK_MEM: gpu.mem_clock_mhz}[kind]

    def temperature(gpu: FakeGpu, sensor: int) -> int:
        assert sensor == real.NVML_TEMPERATURE_GPU
        return gpu.temperature_c

    def violation(gpu: FakeGpu, policy: int) -> Any:
        return real.c_nvmlViolationTime_t(referenceTime=1, violationTime=gpu.violation_ns[policy])

    def ecc(gpu: FakeGpu, error_type: int, counter: int) -> int:
        assert counter == real.NVML_VOLATILE_ECC
        return gpu.ecc_corrected if error_type == real.NVML_MEMORY_ERROR_TYPE_CORRECTED \
            else gpu.ecc_uncorrected

    def link_of(gpu: FakeGpu, link: int) -> FakeLink:
        if link not in gpu.links:
            raise nvml_error(real.NVML_ERROR_NOT_SUPPORTED)
        return gpu.links[link]

    def link_state(gpu: FakeGpu, link: int) -> int:
        if link >= 18:  # an H100 has 18 link slots
            raise nvml_error(real.NVML_ERROR_INVALID_ARGUMENT)
        return real.NVML_FEATURE_ENABLED if link in gpu.links else real.NVML_FEATURE_DISABLED

    def remote_pci(gpu: FakeGpu, link: int) -> Any:
        info = real.nvmlPciInfo_t()
        info.busId = link_of(gpu, link).remote_bus.encode()
        return info

    def error_counter(gpu: FakeGpu, link: int, counter: int) -> int:
        fl = link_of(gpu, link)
        return {real.NVML_NVLINK_ERROR_DL_CRC_FLIT: fl.crc_flit,
                real.NVML_NVLINK_ERROR_DL_CRC_DATA: fl.crc_data,
                real.NVML_NVLINK_ERROR_DL_REPLAY: fl.replay,
                real.NVML_NVLINK_ERROR_DL_RECOVERY: fl.recovery}[counter]

    def field_values(handle: Any, field_ids: list) -> Any:
        gpu = gpu_of(handle, "nvmlDeviceGetFieldValues")
        out = (real.c_nvmlFieldValue_t * len(field_ids))()
        for slot, requested in zip(out, field_ids, strict=True):
            slot.fieldId, slot.scopeId = requested if isinstance(requested, tuple) \
                else (requested, 0)
            code = gpu.field_fails.get(slot.fieldId)
            answer = None if code else _field(gpu, slot.fieldId, slot.scopeId)
            if answer is None:
                slot.nvmlReturn = code or real.NVML_ERROR_NOT_SUPPORTED
                continue
            slot.valueType, member, value = answer
            setattr(slot.value, member, value)
            slot.nvmlReturn = real.NVML_SUCCESS
        return out

    def register(handle: Any, event_types: int, event_set: Any) -> None:
        gpu_of(handle, "nvmlDeviceRegisterEvents")

    def event_wait(event_set: Any, timeout_ms: int) -> Any:
        if node.wait_error is not None:
            raise nvml_error(node.wait_error)
        try:
            return node.events.get(timeout=min(timeout_ms, 20) / 1000)
        except queue.Empty:
            raise nvml_error(real.NVML_ERROR_TIMEOUT) from None

    return {
        "nvmlInit": init,
        "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: DRIVER,
        "nvmlDeviceGetCount": lambda: len(node.gpus),
        "nvmlDeviceGetHandleByIndex": handle_by_index,
        "nvmlDeviceGetUUID": device("nvmlDeviceGetUUID", lambda g: g.uuid),
        "nvmlDeviceGetName": device("nvmlDeviceGetName", lambda g: g.name),
        "nvmlDeviceGetSerial": device("nvmlDeviceGetSerial", lambda g: g.serial),
        "nvmlDeviceGetPciInfo": device("nvmlDeviceGetPciInfo", pci),
        "nvmlDeviceGetMemoryInfo": memory_info,
        "nvmlDeviceGetMigMode": device("nvmlDeviceGetMigMode",
                                       lambda g: [int(g.mig), int(g.mig)]),
        "nvmlDeviceGetPowerManagementDefaultLimit": device(
            "nvmlDeviceGetPowerManagementDefaultLimit", lambda g: g.power_default_mw),
        "nvmlDeviceGetPowerManagementLimitConstraints": device(
            "nvmlDeviceGetPowerManagementLimitConstraints",
            lambda g: [g.power_min_mw, g.power_max_mw]),
        "nvmlDeviceGetFieldValues": field_values,
        "nvmlDeviceGetTotalEnergyConsumption": device(
            "nvmlDeviceGetTotalEnergyConsumption", lambda g: g.energy_mj),
        "nvmlDeviceGetPowerUsage": device("nvmlDeviceGetPowerUsage",
                                          lambda g: g.power_average_mw),
        "nvmlDeviceGetClockInfo": device("nvmlDeviceGetClockInfo", clock),
        "nvmlDeviceGetEnforcedPowerLimit": device("nvmlDeviceGetEnforcedPowerLimit",
                                                  lambda g: g.enforced_mw),
        "nvmlDeviceGetUtilizationRates": device(
            "nvmlDeviceGetUtilizationRates",
            lambda g: real.c_nvmlUtilization_t(gpu=g.util_gpu, memory=g.util_mem)),
        "nvmlDeviceGetTemperature": device("nvmlDeviceGetTemperature", temperature),
        "nvmlDeviceGetCurrentClocksEventReasons": device(
            "nvmlDeviceGetCurrentClocksEventReasons", lambda g: g.event_reasons),
        "nvmlDeviceGetCurrentClocksThrottleReasons": device(
            "nvmlDeviceGetCurrentClocksThrottleReasons", lambda g: g.event_reasons),
        "nvmlDeviceGetViolationStatus": device("nvmlDeviceGetViolationStatus", violation),
        "nvmlDeviceGetTotalEccErrors": device("nvmlDeviceGetTotalEccErrors", ecc),
        "nvmlDeviceGetPcieReplayCounter": device("nvmlDeviceGetPcieReplayCounter",
                                                 lambda g: g.pcie_replay),
        "nvmlDeviceGetNvLinkState": device("nvmlDeviceGetNvLinkState", link_state),
        "nvmlDeviceGetNvLinkRemotePciInfo": device("nvmlDeviceGetNvLinkRemotePciInfo",
                                                   remote_pci),
        "nvmlDeviceGetNvLinkErrorCounter": device("nvmlDeviceGetNvLinkErrorCounter",
                                                  error_counter),
        "nvmlEventSetCreate": lambda: ctypes.c_void_p(0xE0E0),
        "nvmlDeviceRegisterEvents": register,
        "nvmlEventSetWait_v2": event_wait,
        "nvmlEventSetFree": lambda event_set: None,
    }


def _field(gpu: FakeGpu, field_id: int, scope: int) -> tuple[int, str, int] | None:
    """(valueType, c_nvmlValue_t member, value) of one field as NVML types it, or ``None``."""
    ull, uint = real.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, real.NVML_VALUE_TYPE_UNSIGNED_INT
    if field_id in _PERF_FIELD_POLICY:
        return ull, "ullVal", gpu.violation_ns[_PERF_FIELD_POLICY[field_id]]
    if field_id in (real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
                    real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX):
        if scope not in gpu.links:
            return None
        fl = gpu.links[scope]
        tx = field_id == real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX
        return ull, "ullVal", fl.tx_kib if tx else fl.rx_kib
    if field_id in (real.NVML_FI_DEV_POWER_INSTANT, real.NVML_FI_DEV_POWER_AVERAGE) and scope:
        return None  # only the GPU scope (0) is faked
    simple = {
        real.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: (ull, "ullVal", gpu.energy_mj),
        real.NVML_FI_DEV_POWER_INSTANT: (uint, "uiVal", gpu.power_instant_mw),
        real.NVML_FI_DEV_POWER_AVERAGE: (uint, "uiVal", gpu.power_average_mw),
        real.NVML_FI_DEV_ECC_SBE_VOL_TOTAL: (ull, "ullVal", gpu.ecc_corrected),
        real.NVML_FI_DEV_ECC_DBE_VOL_TOTAL: (ull, "ullVal", gpu.ecc_uncorrected),
        real.NVML_FI_DEV_PCIE_REPLAY_COUNTER: (uint, "uiVal", gpu.pcie_replay),
        real.NVML_FI_DEV_REMAPPED_COR: (uint, "uiVal", gpu.remapped_cor),
        real.NVML_FI_DEV_REMAPPED_UNC: (uint, "uiVal", gpu.remapped_unc),
        real.NVML_FI_DEV_REMAPPED_PENDING: (uint, "uiVal", gpu.remap_pending),
        real.NVML_FI_DEV_REMAPPED_FAILURE: (uint, "uiVal", gpu.remap_failed),
    }
    return simple.get(field_id)
