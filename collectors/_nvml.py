"""The GPU client on real hardware: NVML through pynvml (nvidia-ml-py).

This is the only module of ringwatch that imports pynvml, and it does so on the first
:meth:`NvmlClient.devices` call, never at import: importing it touches no library, driver or
thread. Every NVML error goes through the one table of :mod:`ringwatch.collectors._nvml_fields`:
a field the GPU, driver or permissions cannot give reads ``None`` (logged once per cause and
field), a lost GPU reads ``None`` as a whole (logged once), and a host without a driver makes
:meth:`NvmlClient.devices` raise :class:`CollectorError`. One failing field or GPU never stops
the others.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ringwatch.collectors import _nvml_fields as nf
from ringwatch.collectors._nvml_fields import FieldSpec, Outcome, as_int, as_text
from ringwatch.collectors._types import (
    CollectorError,
    FastReading,
    GpuIdentity,
    NvLinkReading,
    SlowReading,
)

log = logging.getLogger("ringwatch.collectors")

_XID_WAIT_MS = 500
_XID_JOIN_S = 2.0


class _GpuLost(Exception):
    """Internal: a call answered ``NVML_ERROR_GPU_IS_LOST``; the read of that GPU is dropped."""


@dataclass(slots=True)
class _Gpu:
    """One GPU's handle and what is enumerated once about it."""

    index: int
    handle: Any
    #: Active NVLinks, enumerated on the first slow read; ``None`` until then.
    links: tuple[int, ...] | None = None
    remote_bus: dict[int, str | None] = field(default_factory=dict)
    slow_specs: tuple[FieldSpec, ...] = ()


class NvmlClient:
    """The :class:`~ringwatch.collectors._types.DeviceClient` of a node's NVIDIA GPUs.

    ``xid_events`` starts a daemon thread counting XID critical errors per GPU and code.
    ``nvml`` is the pynvml module to use (tests pass a fake); ``None`` imports pynvml on the
    first :meth:`devices` call.

    With MIG mode on, the GPU's whole-device values are read (power, energy, clocks, memory,
    counters of the physical GPU), never per-instance ones; ``GpuIdentity.mig_enabled`` says so.
    """

    replayed = False

    def __init__(self, *, xid_events: bool = True, nvml: Any = None) -> None:
        self._nvml = nvml
        self._xid_events = xid_events
        self._init_lock = threading.Lock()
        self._identities: tuple[GpuIdentity, ...] | None = None
        self._failure: str | None = None
        self._initialized = False
        self._closed = False
        self._gpus: dict[int, _Gpu] = {}
        self._lost: set[int] = set()
        self._errors: dict[int, tuple[Outcome, int]] = {}
        self._error_names: dict[int, str] = {}
        self._members: dict[int, str] = {}
        self._dead: set[tuple] = set()
        self._logged: set[tuple] = set()
        self._log_lock = threading.Lock()
        self._xid_lock = threading.Lock()
        self._xid: dict[int, Counter[int]] = {}
        self._stop = threading.Event()
        self._xid_thread: threading.Thread | None = None

    def devices(self) -> tuple[GpuIdentity, ...]:
        """The GPUs of this node, read once (NVML is initialised by the first call).

        Raises :class:`CollectorError` with a one-line message when there is no driver or no
        NVML library, or when the client is closed.
        """
        with self._init_lock:
            if self._closed:
                raise CollectorError("NVML: this client is closed")
            if self._failure is not None:
                raise CollectorError(self._failure)
            if self._identities is None:
                try:
                    self._identities = self._start()
                except CollectorError as exc:
                    self._failure = str(exc)  # said once; not retried at every read
                    raise
            return self._identities

    def read_fast(self, index: int) -> FastReading | None:
        """Energy (mJ), power (mW) and clocks (MHz) of GPU ``index``: one batched field-value
        call plus two clock calls. ``None`` when the GPU is lost or unknown."""
        return self._guarded(index, "read_fast", self._fast)

    def read_slow(self, index: int) -> SlowReading | None:
        """Everything else of GPU ``index`` (limits in mW, memory in bytes, throttle time in ns,
        NVLink traffic in bytes); ``None`` when the GPU is lost or unknown."""
        return self._guarded(index, "read_slow", self._slow)

    def close(self) -> None:
        """Stop the XID thread and shut NVML down; a second call does nothing."""
        with self._init_lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            thread = self._xid_thread
            if thread is not None:
                thread.join(_XID_JOIN_S)
                if thread.is_alive():
                    log.warning("NVML: the XID thread did not stop within %.0f s", _XID_JOIN_S)
            if self._initialized:
                self._initialized = False
                self._shutdown()

    def _start(self) -> tuple[GpuIdentity, ...]:
        """Import pynvml, initialise NVML and read every GPU's identity; raises CollectorError."""
        nvml = self._load()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            no_driver = self._errors.get(exc.value, nf.DEFAULT_ERROR)[0] is Outcome.NO_DRIVER
            what = "no NVIDIA driver loaded on this host" if no_driver else "cannot initialise"
            raise CollectorError(nf.one_line(f"NVML: {what} ({exc})")) from None
        except OSError as exc:
            raise CollectorError(
                nf.one_line(f"NVML: no NVIDIA driver loaded on this host ({exc})")) from None
        self._initialized = True
        try:
            identities = self._identify_all()
        except BaseException:
            self._initialized = False
            self._shutdown()
            raise
        if self._xid_events and self._gpus:
            self._xid_thread = threading.Thread(target=self._xid_main, daemon=True,
                                                name="ringwatch-nvml-xid")
            self._xid_thread.start()
        return identities

    def _identify_all(self) -> tuple[GpuIdentity, ...]:
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            raise CollectorError(nf.one_line(f"NVML: cannot count the GPUs ({exc})")) from None
        driver = self._invoke("driver_version", ("driver",), "nvmlSystemGetDriverVersion")[0]
        identities = (self._identify(index, as_text(driver)) for index in range(count))
        return tuple(i for i in identities if i is not None)

    def _load(self) -> Any:
        """The pynvml module (imported here on first use) with its tables resolved."""
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                raise CollectorError(
                    nf.one_line(f"NVML: the nvidia-ml-py package is not installed ({exc})")
                ) from None
            self._nvml = pynvml
        self._errors = nf.error_table(self._nvml)
        self._error_names = nf.error_names(self._nvml)
        self._members = nf.value_members(self._nvml)
        return self._nvml

    def _identify(self, index: int, driver: str | None) -> GpuIdentity | None:
        """GPU ``index``'s identity, its handle cached; ``None`` (logged) for a GPU NVML cannot
        name or that is lost."""
        handle, outcome = self._invoke(f"gpu {index}", (index, "handle"),
                                       "nvmlDeviceGetHandleByIndex", index)
        if outcome is Outcome.LOST:
            self._mark_lost(index)
        if handle is None:
            return None
        gpu = _Gpu(index, handle)
        try:
            uuid = as_text(self._call(gpu, "uuid", "nvmlDeviceGetUUID"))
            if uuid is None:
                return None
            pci = self._call(gpu, "pci_bus_id", "nvmlDeviceGetPciInfo")
            mig = self._call(gpu, "mig_enabled", "nvmlDeviceGetMigMode")
            limits = self._call(gpu, "power_limit_min_max_mw",
                                "nvmlDeviceGetPowerManagementLimitConstraints")
            memory = self._memory(gpu)
            identity = GpuIdentity(
                index=index,
                uuid=uuid,
                name=as_text(self._call(gpu, "name", "nvmlDeviceGetName")) or "unknown",
                pci_bus_id=None if pci is None else as_text(pci.busId),
                serial=as_text(self._call(gpu, "serial", "nvmlDeviceGetSerial")),
                memory_total_bytes=None if memory is None else memory.total,
                mig_enabled=None if mig is None else mig[0] == self._nvml.NVML_DEVICE_MIG_ENABLE,
                power_limit_default_mw=self._call(gpu, "power_limit_default_mw",
                                                  "nvmlDeviceGetPowerManagementDefaultLimit"),
                power_limit_min_mw=None if limits is None else limits[0],
                power_limit_max_mw=None if limits is None else limits[1],
                driver_version=driver,
            )
        except _GpuLost:
            self._mark_lost(index)
            return None
        self._gpus[index] = gpu
        return identity

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            log.debug("NVML: nvmlShutdown failed (%s)", exc)

    def _gpu(self, index: int) -> _Gpu | None:
        """The GPU to read (NVML started on first use), or ``None``: closed, lost, unknown."""
        if self._identities is None and not self._closed:
            try:
                self.devices()
            except CollectorError:
                return None
        if self._closed or index in self._lost:
            return None
        return self._gpus.get(index)

    def _guarded(self, index: int, method: str, read: Any) -> Any:
        """``read(gpu)`` for GPU ``index``; ``None`` when it is lost, unknown, or ``read``
        fails in a way the error table does not know (logged once)."""
        gpu = self._gpu(index)
        if gpu is None:
            return None
        try:
            return read(gpu)
        except _GpuLost:
            self._mark_lost(index)
        except Exception:
            if self._first_time(("unexpected", method)):
                log.warning("NVML: %s(%d) failed; it reads None", method, index, exc_info=True)
        return None

    def _fast(self, gpu: _Gpu) -> FastReading:
        values = self._fields(gpu, nf.FAST_FIELDS)
        nvml = self._nvml
        return FastReading(
            energy_mj=as_int(values["energy_mj"]),
            power_instant_mw=as_int(values["power_instant_mw"]),
            power_average_mw=as_int(values["power_average_mw"]),
            sm_clock_mhz=self._call(gpu, "sm_clock_mhz", "nvmlDeviceGetClockInfo",
                                    nvml.NVML_CLOCK_SM),
            memory_clock_mhz=self._call(gpu, "memory_clock_mhz", "nvmlDeviceGetClockInfo",
                                        nvml.NVML_CLOCK_MEM),
        )

    def _slow(self, gpu: _Gpu) -> SlowReading:
        nvml = self._nvml
        links = self._links(gpu)
        values = self._fields(gpu, gpu.slow_specs)
        util = self._call(gpu, "utilization", "nvmlDeviceGetUtilizationRates")
        memory = self._memory(gpu)
        mask = self._first(gpu, "throttle_reasons_mask",
                           ("nvmlDeviceGetCurrentClocksEventReasons", (), {}),
                           ("nvmlDeviceGetCurrentClocksThrottleReasons", (), {}))
        with self._xid_lock:
            xid = dict(self._xid.get(gpu.index, {}))
        return SlowReading(
            power_limit_enforced_mw=self._call(gpu, "power_limit_enforced_mw",
                                               "nvmlDeviceGetEnforcedPowerLimit"),
            gpu_utilization_pct=None if util is None else util.gpu,
            memory_utilization_pct=None if util is None else util.memory,
            memory_used_bytes=None if memory is None else memory.used,
            memory_total_bytes=None if memory is None else memory.total,
            temperature_c=self._call(gpu, "temperature_c", "nvmlDeviceGetTemperature",
                                     nvml.NVML_TEMPERATURE_GPU),
            throttle_reasons_mask=mask,
            throttle_time_ns={k.removeprefix(nf.THROTTLE_PREFIX): as_int(v)
                              for k, v in values.items()
                              if k.startswith(nf.THROTTLE_PREFIX) and v is not None},
            ecc_corrected_total=as_int(values["ecc_corrected_total"]),
            ecc_uncorrected_total=as_int(values["ecc_uncorrected_total"]),
            pcie_replay_total=as_int(values["pcie_replay_total"]),
            remapped_rows_correctable_total=as_int(values["remapped_rows_correctable_total"]),
            remapped_rows_uncorrectable_total=as_int(
                values["remapped_rows_uncorrectable_total"]),
            row_remap_pending=as_int(values["row_remap_pending"]),
            row_remap_failed=as_int(values["row_remap_failed"]),
            nvlinks=tuple(self._nvlink(gpu, link, values) for link in links),
            xid_total=xid,
        )

    def _memory(self, gpu: _Gpu) -> Any:
        """``nvmlDeviceGetMemoryInfo`` v2 (``used`` without the driver's reservation), else v1
        on drivers without ``nvmlDeviceGetMemoryInfo_v2``; bytes."""
        version = getattr(self._nvml, "nvmlMemory_v2", None)
        calls = [("nvmlDeviceGetMemoryInfo", (), {})]
        if version is not None:
            calls.insert(0, ("nvmlDeviceGetMemoryInfo", (), {"version": version}))
        return self._first(gpu, "memory", *calls)

    def _links(self, gpu: _Gpu) -> tuple[int, ...]:
        """The active NVLinks of ``gpu`` and their far ends, enumerated once."""
        if gpu.links is None:
            nvml = self._nvml
            active = []
            for link in range(nvml.NVML_NVLINK_MAX_LINKS):
                state = self._call(gpu, "nvlink.state", "nvmlDeviceGetNvLinkState", link)
                if state != nvml.NVML_FEATURE_ENABLED:
                    continue
                active.append(link)
                remote = self._call(gpu, "nvlink.remote_pci_bus_id",
                                    "nvmlDeviceGetNvLinkRemotePciInfo", link)
                gpu.remote_bus[link] = None if remote is None else as_text(remote.busId)
            per_link = (spec for link in active for spec in nf.link_fields(link))
            gpu.slow_specs = nf.SLOW_FIELDS + tuple(per_link)
            gpu.links = tuple(active)
        return gpu.links

    def _nvlink(self, gpu: _Gpu, link: int, values: dict[str, Any]) -> NvLinkReading:
        nvml = self._nvml
        counter = "nvmlDeviceGetNvLinkErrorCounter"
        return NvLinkReading(
            link=link,
            remote_pci_bus_id=gpu.remote_bus.get(link),
            tx_bytes=as_int(values[f"nvlink{link}.tx_bytes"]),
            rx_bytes=as_int(values[f"nvlink{link}.rx_bytes"]),
            crc_errors=self._first(gpu, "nvlink.crc_errors",
                                   (counter, (link, nvml.NVML_NVLINK_ERROR_DL_CRC_FLIT), {}),
                                   (counter, (link, nvml.NVML_NVLINK_ERROR_DL_CRC_DATA), {})),
            replay_errors=self._call(gpu, "nvlink.replay_errors", counter, link,
                                     nvml.NVML_NVLINK_ERROR_DL_REPLAY),
            recovery_errors=self._call(gpu, "nvlink.recovery_errors", counter, link,
                                       nvml.NVML_NVLINK_ERROR_DL_RECOVERY),
        )

    def _fields(self, gpu: _Gpu, specs: tuple[FieldSpec, ...]) -> dict[str, Any]:
        """One ``nvmlDeviceGetFieldValues`` call for ``specs``: key -> value in the reading's
        unit, or ``None``. A field whose own return code failed is asked of its fallback."""
        nvml = self._nvml
        values: dict[str, Any] = dict.fromkeys((s.key for s in specs), None)
        batch = (gpu.index, "nvmlDeviceGetFieldValues")
        if specs and batch not in self._dead:
            try:
                answers = nvml.nvmlDeviceGetFieldValues(gpu.handle,
                                                        [s.field_id(nvml) for s in specs])
            except nvml.NVMLError as exc:
                outcome = self._failed(exc.value, "field values")
                if outcome is Outcome.LOST:
                    raise _GpuLost from None
                if outcome is Outcome.UNSUPPORTED:
                    self._dead.add(batch)
            else:
                for spec, answer in zip(specs, answers, strict=True):
                    if answer.nvmlReturn == nvml.NVML_SUCCESS:
                        raw = nf.decode(answer, self._members)
                        values[spec.key] = None if raw is None else raw * spec.scale
                    elif self._failed(answer.nvmlReturn, spec.what) is Outcome.LOST:
                        raise _GpuLost
        for spec in specs:
            if values[spec.key] is None and spec.fallback is not None:
                values[spec.key] = self._fallback(gpu, spec)
        return values

    def _fallback(self, gpu: _Gpu, spec: FieldSpec) -> Any:
        fallback = spec.fallback
        args = [getattr(self._nvml, name) for name in fallback.args]
        result = self._call(gpu, spec.what, fallback.fn, *args)
        if result is None or fallback.attr is None:
            return result
        return getattr(result, fallback.attr)

    def _call(self, gpu: _Gpu, what: str, fn: str, *args: Any, **kwargs: Any) -> Any:
        """``fn(handle, *args)`` for the field ``what`` of ``gpu``: its result, or ``None``."""
        return self._device_call(gpu, what, fn, args, kwargs)[0]

    def _first(self, gpu: _Gpu, what: str, *calls: tuple[str, tuple, dict]) -> Any:
        """The first of ``calls`` that the GPU and driver support (newer API first)."""
        for fn, args, kwargs in calls:
            result, outcome = self._device_call(gpu, what, fn, args, kwargs)
            if outcome is not Outcome.UNSUPPORTED:
                return result
        return None

    def _device_call(self, gpu: _Gpu, what: str, fn: str, args: tuple,
                     kwargs: dict) -> tuple[Any, Outcome | None]:
        key = (gpu.index, fn, args, tuple(sorted(kwargs.items())))
        result, outcome = self._invoke(what, key, fn, gpu.handle, *args, **kwargs)
        if outcome is Outcome.LOST:
            raise _GpuLost
        return result, outcome

    def _invoke(self, what: str, key: tuple, fn: str, *args: Any,
                **kwargs: Any) -> tuple[Any, Outcome | None]:
        """``nvml.<fn>(*args)`` -> (result, ``None``) or (``None``, outcome). A call the GPU or
        driver does not support is not made again (``key`` remembers it)."""
        if key in self._dead:
            return None, Outcome.UNSUPPORTED
        function = getattr(self._nvml, fn, None)
        if function is None:  # a pynvml older than the function
            self._dead.add(key)
            self._once((fn, what), logging.DEBUG, "NVML: %s unavailable (pynvml has no %s)",
                       what, fn)
            return None, Outcome.UNSUPPORTED
        try:
            return function(*args, **kwargs), None
        except self._nvml.NVMLError as exc:
            outcome = self._failed(exc.value, what)
            if outcome is Outcome.UNSUPPORTED:
                self._dead.add(key)
            return None, outcome

    def _failed(self, code: int, what: str) -> Outcome:
        """The outcome of return code ``code`` for ``what``, logged once per (code, what)."""
        outcome, level = self._errors.get(code, nf.DEFAULT_ERROR)
        if outcome is not Outcome.LOST and outcome is not Outcome.TIMEOUT:
            name = self._error_names.get(code, f"NVML error {code}")
            self._once((code, what), level, "NVML: %s unavailable (%s)", what, name)
        return outcome

    def _mark_lost(self, index: int) -> None:
        self._lost.add(index)
        self._once(("lost", index), logging.WARNING,
                   "NVML: GPU %d is lost (NVML_ERROR_GPU_IS_LOST); it reads None from now on",
                   index)

    def _once(self, key: tuple, level: int, msg: str, *args: Any) -> None:
        if self._first_time(key):
            log.log(level, msg, *args)

    def _first_time(self, key: tuple) -> bool:
        with self._log_lock:
            if key in self._logged:
                return False
            self._logged.add(key)
            return True

    def _xid_main(self) -> None:
        """The XID thread: one event set for every GPU, counted until close(). Whatever
        fails here is logged once and ends the thread, never more."""
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except Exception:
            log.warning("NVML: XID events not watched (nvmlEventSetCreate failed)",
                        exc_info=True)
            return
        try:
            by_handle = self._register_xid(event_set)
            if by_handle:
                self._count_xid(event_set, by_handle)
            else:
                log.info("NVML: no GPU reports XID events; they are not counted")
        except Exception:
            log.warning("NVML: the XID thread stopped", exc_info=True)
        finally:
            try:
                nvml.nvmlEventSetFree(event_set)
            except Exception:
                log.debug("NVML: nvmlEventSetFree failed", exc_info=True)

    def _register_xid(self, event_set: Any) -> dict[Any, int]:
        """Registers XID critical errors of every GPU that has them: handle key -> index."""
        nvml = self._nvml
        by_handle = {}
        for index, gpu in self._gpus.items():
            try:
                nvml.nvmlDeviceRegisterEvents(gpu.handle, nvml.nvmlEventTypeXidCriticalError,
                                              event_set)
            except nvml.NVMLError as exc:
                self._once(("xid", index), logging.INFO,
                           "NVML: XID events of GPU %d are not counted (%s)", index, exc)
                continue
            by_handle[nf.handle_key(gpu.handle)] = index
            with self._xid_lock:
                self._xid.setdefault(index, Counter())
        return by_handle

    def _count_xid(self, event_set: Any, by_handle: dict[Any, int]) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait_v2(event_set, _XID_WAIT_MS)
            except nvml.NVMLError as exc:
                if self._errors.get(exc.value, nf.DEFAULT_ERROR)[0] is Outcome.TIMEOUT:
                    continue
                log.warning("NVML: the XID thread stopped (%s); XIDs are no longer counted",
                            exc)
                return
            index = by_handle.get(nf.handle_key(data.device))
            if index is None or not data.eventType & nvml.nvmlEventTypeXidCriticalError:
                continue
            with self._xid_lock:
                self._xid[index][int(data.eventData)] += 1

