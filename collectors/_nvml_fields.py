"""The tables and small helpers of the NVML client (:mod:`ringwatch.collectors._nvml`): what
each NVML error means to a reading, which field ids are read in one batch, and how a field value
is decoded.

Nothing here imports pynvml. Names are nvml.h's; each table resolves its names against the
pynvml module in use. Field ids and value types also carry their nvml.h numbers, which NVML
guarantees never to change, for a pynvml too old to define the name.
"""

from __future__ import annotations

import ctypes
import enum
import logging
from dataclasses import dataclass
from typing import Any


class Outcome(enum.Enum):
    """What one failed NVML call or field means to the reading it was part of."""

    #: Not on this GPU, driver or permission level: ``None`` now and, for a call, from now on.
    UNSUPPORTED = "unsupported"
    #: ``NVML_ERROR_GPU_IS_LOST``: the whole GPU reads ``None`` from now on.
    LOST = "lost"
    #: No driver or no library: the client cannot start.
    NO_DRIVER = "no driver"
    #: ``nvmlEventSetWait`` found no event in its time; the normal idle answer.
    TIMEOUT = "timeout"
    #: Anything else: ``None`` for this read only, tried again next time.
    FAILED = "failed"


#: The one error table: NVML return code name -> (outcome, level it is logged at, once).
#: A code not listed is FAILED, logged at WARNING.
ERRORS: dict[str, tuple[Outcome, int]] = {
    "NVML_ERROR_NOT_SUPPORTED": (Outcome.UNSUPPORTED, logging.DEBUG),
    "NVML_ERROR_FUNCTION_NOT_FOUND": (Outcome.UNSUPPORTED, logging.DEBUG),
    # An unknown field id (driver older than the field) or link index answers this.
    "NVML_ERROR_INVALID_ARGUMENT": (Outcome.UNSUPPORTED, logging.DEBUG),
    "NVML_ERROR_DEPRECATED": (Outcome.UNSUPPORTED, logging.DEBUG),
    "NVML_ERROR_NO_PERMISSION": (Outcome.UNSUPPORTED, logging.WARNING),
    "NVML_ERROR_GPU_IS_LOST": (Outcome.LOST, logging.WARNING),
    "NVML_ERROR_DRIVER_NOT_LOADED": (Outcome.NO_DRIVER, logging.ERROR),
    "NVML_ERROR_LIBRARY_NOT_FOUND": (Outcome.NO_DRIVER, logging.ERROR),
    "NVML_ERROR_TIMEOUT": (Outcome.TIMEOUT, logging.DEBUG),
}
DEFAULT_ERROR = (Outcome.FAILED, logging.WARNING)


def error_table(nvml: Any) -> dict[int, tuple[Outcome, int]]:
    """:data:`ERRORS` keyed by the return codes of the pynvml module ``nvml``."""
    return {getattr(nvml, name): entry for name, entry in ERRORS.items() if hasattr(nvml, name)}


def error_names(nvml: Any) -> dict[int, str]:
    """Return code -> its ``NVML_ERROR_*`` name, for the log lines of per-field return codes."""
    return {getattr(nvml, n): n for n in dir(nvml)
            if n.startswith("NVML_ERROR_") and isinstance(getattr(nvml, n), int)}


#: ``NVML_VALUE_TYPE_*`` name, its number, and the member of ``c_nvmlValue_t`` holding the value.
VALUE_TYPES = (
    ("NVML_VALUE_TYPE_DOUBLE", 0, "dVal"),
    ("NVML_VALUE_TYPE_UNSIGNED_INT", 1, "uiVal"),
    ("NVML_VALUE_TYPE_UNSIGNED_LONG", 2, "ulVal"),
    ("NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", 3, "ullVal"),
    ("NVML_VALUE_TYPE_SIGNED_LONG_LONG", 4, "sllVal"),
    ("NVML_VALUE_TYPE_SIGNED_INT", 5, "siVal"),
    ("NVML_VALUE_TYPE_UNSIGNED_SHORT", 6, "usVal"),
)


def value_members(nvml: Any) -> dict[int, str]:
    """``valueType`` -> the ``c_nvmlValue_t`` member to read, for the pynvml module ``nvml``."""
    return {getattr(nvml, name, number): member for name, number, member in VALUE_TYPES}


def decode(value: Any, members: dict[int, str]) -> int | float | None:
    """The number in one ``c_nvmlFieldValue_t``, read by its ``valueType``; ``None`` for a type
    this table does not know."""
    member = members.get(value.valueType)
    return None if member is None else getattr(value.value, member)


@dataclass(frozen=True, slots=True)
class Fallback:
    """The NVML function that gives a field when the field value does not."""

    fn: str
    #: Names of the NVML constants passed after the handle.
    args: tuple[str, ...] = ()
    #: The attribute of the result that holds the value (``None``: the result itself).
    attr: str | None = None


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One entry of a ``nvmlDeviceGetFieldValues`` batch."""

    #: Key of the value in the batch's result (``nvlink3.tx_bytes``).
    key: str
    #: The name logged when it is missing, the same for every link (``nvlink.tx_bytes``).
    what: str
    name: str
    number: int
    scope: int = 0
    #: Multiplier to the unit of the reading (KiB -> bytes).
    scale: int = 1
    fallback: Fallback | None = None

    def field_id(self, nvml: Any) -> tuple[int, int]:
        """``(fieldId, scopeId)``, the form pynvml's ``nvmlDeviceGetFieldValues`` takes."""
        return getattr(nvml, self.name, self.number), self.scope


# Power fields take a power scope as scopeId; 0 is NVML_POWER_SCOPE_GPU (the GPU alone).
# NVML_FI_DEV_POWER_AVERAGE is missing on GA100 (A100) and older, where the fallback
# nvmlDeviceGetPowerUsage is, per nvml.h, instantaneous rather than a 1 s average.
FAST_FIELDS = (
    FieldSpec("energy_mj", "energy_mj", "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 83,
              fallback=Fallback("nvmlDeviceGetTotalEnergyConsumption")),
    FieldSpec("power_instant_mw", "power_instant_mw", "NVML_FI_DEV_POWER_INSTANT", 186),
    FieldSpec("power_average_mw", "power_average_mw", "NVML_FI_DEV_POWER_AVERAGE", 185,
              fallback=Fallback("nvmlDeviceGetPowerUsage")),
)

#: Key in ``SlowReading.throttle_time_ns`` -> (field name, number, ``NVML_PERF_POLICY_*``).
THROTTLE_POLICIES = {
    "power": ("NVML_FI_DEV_PERF_POLICY_POWER", 74, "NVML_PERF_POLICY_POWER"),
    "thermal": ("NVML_FI_DEV_PERF_POLICY_THERMAL", 75, "NVML_PERF_POLICY_THERMAL"),
    "sync_boost": ("NVML_FI_DEV_PERF_POLICY_SYNC_BOOST", 76, "NVML_PERF_POLICY_SYNC_BOOST"),
    "board_limit": ("NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT", 77, "NVML_PERF_POLICY_BOARD_LIMIT"),
    "low_utilization": ("NVML_FI_DEV_PERF_POLICY_LOW_UTILIZATION", 78,
                        "NVML_PERF_POLICY_LOW_UTILIZATION"),
    "reliability": ("NVML_FI_DEV_PERF_POLICY_RELIABILITY", 79, "NVML_PERF_POLICY_RELIABILITY"),
    "app_clocks": ("NVML_FI_DEV_PERF_POLICY_TOTAL_APP_CLOCKS", 80,
                   "NVML_PERF_POLICY_TOTAL_APP_CLOCKS"),
    "base_clocks": ("NVML_FI_DEV_PERF_POLICY_TOTAL_BASE_CLOCKS", 81,
                    "NVML_PERF_POLICY_TOTAL_BASE_CLOCKS"),
}
THROTTLE_PREFIX = "throttle_time_ns."

SLOW_FIELDS = (
    *(FieldSpec(THROTTLE_PREFIX + key, THROTTLE_PREFIX + key, name, number,
                fallback=Fallback("nvmlDeviceGetViolationStatus", (policy,), "violationTime"))
      for key, (name, number, policy) in THROTTLE_POLICIES.items()),
    FieldSpec("ecc_corrected_total", "ecc_corrected_total", "NVML_FI_DEV_ECC_SBE_VOL_TOTAL", 3,
              fallback=Fallback("nvmlDeviceGetTotalEccErrors",
                                ("NVML_MEMORY_ERROR_TYPE_CORRECTED", "NVML_VOLATILE_ECC"))),
    FieldSpec("ecc_uncorrected_total", "ecc_uncorrected_total", "NVML_FI_DEV_ECC_DBE_VOL_TOTAL",
              4, fallback=Fallback("nvmlDeviceGetTotalEccErrors",
                                   ("NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_VOLATILE_ECC"))),
    FieldSpec("pcie_replay_total", "pcie_replay_total", "NVML_FI_DEV_PCIE_REPLAY_COUNTER", 94,
              fallback=Fallback("nvmlDeviceGetPcieReplayCounter")),
    # Row remapping (A100 and newer): absent on older GPUs, where the field reads None.
    FieldSpec("remapped_rows_correctable_total", "remapped_rows_correctable_total",
              "NVML_FI_DEV_REMAPPED_COR", 142),
    FieldSpec("remapped_rows_uncorrectable_total", "remapped_rows_uncorrectable_total",
              "NVML_FI_DEV_REMAPPED_UNC", 143),
    FieldSpec("row_remap_pending", "row_remap_pending", "NVML_FI_DEV_REMAPPED_PENDING", 144),
    FieldSpec("row_remap_failed", "row_remap_failed", "NVML_FI_DEV_REMAPPED_FAILURE", 145),
)


def link_fields(link: int) -> tuple[FieldSpec, ...]:
    """The throughput fields of one NVLink (scopeId = link). NVML counts them in KiB."""
    return (
        FieldSpec(f"nvlink{link}.tx_bytes", "nvlink.tx_bytes",
                  "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", 138, scope=link, scale=1024),
        FieldSpec(f"nvlink{link}.rx_bytes", "nvlink.rx_bytes",
                  "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", 139, scope=link, scale=1024),
    )


def as_int(value: Any) -> int | None:
    """An NVML number as ``int`` (a field may come as a double); ``None`` stays ``None``."""
    return None if value is None else int(value)


def as_text(value: Any) -> str | None:
    """An NVML string as ``str``: older pynvml versions return ``bytes``."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if value is None else str(value)


def handle_key(handle: Any) -> Any:
    """What identifies a device handle: the address of a ctypes handle (an event carries a new
    Python object for the same device), else the handle itself."""
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value
    return handle


def one_line(text: str) -> str:
    """``text`` with its whitespace runs, newlines included, made single spaces."""
    return " ".join(text.split())
