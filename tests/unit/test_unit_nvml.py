"""The NVML client against a fake pynvml (an autospec of the real module, see fake_nvml): every
field with its unit, unsupported fields, a lost GPU, no driver, old drivers, MIG, XID events,
one init from two threads, and an import that touches nothing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pynvml
import pytest

from ringwatch.collectors import _nvml_fields as fields
from ringwatch.collectors._nvml import NvmlClient
from ringwatch.collectors._types import (
    CollectorError,
    FastReading,
    GpuIdentity,
    NvLinkReading,
    SlowReading,
)

import fake_nvml as fake

GIB = 1024**3
THROTTLE_KEYS = {"power", "thermal", "sync_boost", "board_limit", "low_utilization",
                 "reliability", "app_clocks", "base_clocks"}


@pytest.fixture
def open_clients():
    """Clients to close after the test, so no XID thread outlives it."""
    clients: list[NvmlClient] = []
    yield clients
    for client in clients:
        client.close()


def start(node: fake.FakeNode, open_clients: list, **kwargs) -> NvmlClient:
    client = NvmlClient(nvml=node.nvml, **kwargs)
    open_clients.append(client)
    return client


def messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# -- healthy ---------------------------------------------------------------------------------

def test_healthy_identities_of_two_gpus(open_clients):
    client = start(fake.healthy(2), open_clients)
    assert client.replayed is False
    assert client.devices() == (
        GpuIdentity(index=0, uuid="GPU-00000000-aaaa-bbbb-cccc-dddd",
                    name="NVIDIA H100 80GB HBM3", pci_bus_id="00000000:18:00.0",
                    serial="1652322000000", memory_total_bytes=80 * GIB, mig_enabled=False,
                    power_limit_default_mw=700_000, power_limit_min_mw=200_000,
                    power_limit_max_mw=700_000, driver_version=fake.DRIVER),
        GpuIdentity(index=1, uuid="GPU-00000001-aaaa-bbbb-cccc-dddd",
                    name="NVIDIA H100 80GB HBM3", pci_bus_id="00000000:19:00.0",
                    serial="1652322000001", memory_total_bytes=80 * GIB, mig_enabled=False,
                    power_limit_default_mw=700_000, power_limit_min_mw=200_000,
                    power_limit_max_mw=700_000, driver_version=fake.DRIVER),
    )


def test_healthy_fast_read_of_every_field(open_clients, caplog):
    caplog.set_level(logging.DEBUG, "ringwatch.collectors")
    client = start(fake.healthy(2), open_clients)
    client.devices()
    assert client.read_fast(0) == FastReading(energy_mj=123_456_789, power_instant_mw=412_000,
                                              power_average_mw=398_000, sm_clock_mhz=1980,
                                              memory_clock_mhz=2619)
    assert client.read_fast(1) == FastReading(energy_mj=123_456_790, power_instant_mw=412_001,
                                              power_average_mw=398_001, sm_clock_mhz=1979,
                                              memory_clock_mhz=2619)
    assert caplog.records == []


def test_healthy_slow_read_of_every_field(open_clients, caplog):
    caplog.set_level(logging.DEBUG, "ringwatch.collectors")
    node = fake.healthy(2)
    client = start(node, open_clients)
    client.devices()
    slow = client.read_slow(1)
    assert slow == SlowReading(
        power_limit_enforced_mw=650_001,
        gpu_utilization_pct=96,
        memory_utilization_pct=42,
        memory_used_bytes=11 * GIB,  # v2: without the driver's reservation
        memory_total_bytes=80 * GIB,
        temperature_c=64,
        throttle_reasons_mask=0x5,
        throttle_time_ns={name: (policy + 1) * 1_000_000 + 1
                          for policy, name in fake.POLICIES.items()},
        ecc_corrected_total=6,
        ecc_uncorrected_total=1,
        pcie_replay_total=18,
        remapped_rows_correctable_total=3,
        remapped_rows_uncorrectable_total=1,
        row_remap_pending=1,
        row_remap_failed=0,
        nvlinks=(
            NvLinkReading(link=0, remote_pci_bus_id="00000000:1A:00.0", tx_bytes=1001 * 1024,
                          rx_bytes=2001 * 1024, crc_errors=1, replay_errors=11,
                          recovery_errors=21),
            NvLinkReading(link=2, remote_pci_bus_id="00000000:1A:00.0", tx_bytes=3001 * 1024,
                          rx_bytes=6001 * 1024, crc_errors=3, replay_errors=13,
                          recovery_errors=23),
        ),
        xid_total={},
    )
    assert set(slow.throttle_time_ns) == THROTTLE_KEYS
    assert client.read_slow(0).nvlinks[1].tx_bytes == 3000 * 1024
    # The NVLink link states are enumerated once, not on every read.
    states = node.nvml.nvmlDeviceGetNvLinkState.call_count
    client.read_slow(1)
    assert node.nvml.nvmlDeviceGetNvLinkState.call_count == states
    # Everything batchable came from field values: no per-counter fallback was called.
    node.nvml.nvmlDeviceGetViolationStatus.assert_not_called()
    node.nvml.nvmlDeviceGetTotalEccErrors.assert_not_called()
    node.nvml.nvmlDeviceGetPcieReplayCounter.assert_not_called()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_slow_read_is_one_batch_with_nvlink_scope_ids(open_clients):
    node = fake.healthy(1)
    client = start(node, open_clients)
    client.devices()
    node.nvml.nvmlDeviceGetFieldValues.reset_mock()
    client.read_slow(0)
    (call,) = node.nvml.nvmlDeviceGetFieldValues.call_args_list
    requested = call.args[1]
    tx = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX
    rx = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX
    assert {(tx, 0), (rx, 0), (tx, 2), (rx, 2)} <= set(requested)
    assert (pynvml.NVML_FI_DEV_PERF_POLICY_POWER, 0) in requested
    assert all(isinstance(f, tuple) and len(f) == 2 for f in requested)


# -- a field or a GPU missing ----------------------------------------------------------------

def test_unsupported_field_reads_none_and_the_others_still_come(open_clients, caplog):
    caplog.set_level(logging.DEBUG, "ringwatch.collectors")
    node = fake.ecc_disabled(fake.power_not_supported(fake.healthy(2), 0), 0)
    client = start(node, open_clients)
    client.devices()
    for _ in range(3):
        fast = client.read_fast(0)
    assert fast == FastReading(energy_mj=123_456_789, power_instant_mw=None,
                               power_average_mw=None, sm_clock_mhz=1980, memory_clock_mhz=2619)
    assert client.read_fast(1).power_instant_mw == 412_001
    slow = client.read_slow(0)
    assert slow.ecc_corrected_total is None and slow.ecc_uncorrected_total is None
    assert slow.pcie_replay_total == 17 and slow.temperature_c == 63
    assert len(slow.nvlinks) == 2
    # Logged once per (cause, field), at debug: unsupported is normal on many GPUs.
    logged = messages(caplog, "power_instant_mw unavailable (NVML_ERROR_NOT_SUPPORTED)")
    assert len(logged) == 1
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    # An unsupported function is not called again.
    assert node.nvml.nvmlDeviceGetPowerUsage.call_count == 1


def test_a_gpu_without_row_remapping_reads_none_quietly(open_clients, caplog):
    caplog.set_level(logging.DEBUG, "ringwatch.collectors")
    node = fake.row_remapping_not_supported(fake.healthy(2), 0)
    client = start(node, open_clients)
    client.devices()
    old, new = client.read_slow(0), client.read_slow(1)
    assert (old.remapped_rows_correctable_total, old.remapped_rows_uncorrectable_total,
            old.row_remap_pending, old.row_remap_failed) == (None, None, None, None)
    assert (new.remapped_rows_correctable_total, new.row_remap_pending) == (3, 1)
    assert old.ecc_corrected_total == 5  # the rest of the batch is read
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_average_power_falls_back_to_power_usage(open_clients):
    node = fake.average_power_field_missing(fake.healthy(1), 0)
    client = start(node, open_clients)
    client.devices()
    assert client.read_fast(0).power_average_mw == 398_000
    node.nvml.nvmlDeviceGetPowerUsage.assert_called_once()


def test_gpu_lost_mid_run_reads_none_and_the_other_gpu_still_reads(open_clients, caplog):
    node = fake.healthy(2)
    client = start(node, open_clients)
    client.devices()
    assert client.read_fast(1) is not None and client.read_slow(1) is not None
    fake.gpu_lost(node, 1)
    for _ in range(3):
        assert client.read_fast(1) is None
        assert client.read_slow(1) is None
    assert client.read_fast(0).energy_mj == 123_456_789
    assert client.read_slow(0).temperature_c == 63
    assert len(messages(caplog, "GPU 1 is lost")) == 1


def test_gpu_lost_answered_by_one_field_drops_the_whole_read(open_clients):
    node = fake.healthy(2)
    node.gpus[0].field_fails[pynvml.NVML_FI_DEV_POWER_INSTANT] = pynvml.NVML_ERROR_GPU_IS_LOST
    client = start(node, open_clients)
    client.devices()
    assert client.read_fast(0) is None
    assert client.read_fast(1) is not None


def test_an_error_outside_the_table_reads_none_and_never_raises(open_clients, caplog):
    node = fake.healthy(2)
    node.nvml.nvmlDeviceGetClockInfo.side_effect = RuntimeError("driver bug")
    client = start(node, open_clients)
    client.devices()
    assert client.read_fast(0) is None
    assert client.read_fast(1) is None
    assert client.read_slow(1).temperature_c == 64
    assert len(messages(caplog, "read_fast(0) failed")) == 1


def test_unknown_index_reads_none(open_clients):
    client = start(fake.healthy(1), open_clients)
    assert client.read_fast(5) is None
    assert client.read_slow(-1) is None


# -- no driver -------------------------------------------------------------------------------

@pytest.mark.parametrize("node", [
    fake.driver_missing(),
    fake.driver_missing(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND),
    fake.library_unloadable(),
], ids=["driver-not-loaded", "library-not-found", "oserror"])
def test_driver_missing_raises_one_line_collector_error(node, open_clients):
    client = start(node, open_clients)
    with pytest.raises(CollectorError) as info:
        client.devices()
    message = str(info.value)
    assert message.startswith("NVML: no NVIDIA driver loaded on this host (")
    assert "\n" not in message
    # The other methods never raise, and a failed start is not retried at every read.
    assert client.read_fast(0) is None
    assert client.read_slow(0) is None
    with pytest.raises(CollectorError, match="^NVML: no NVIDIA driver"):
        client.devices()
    assert node.nvml.nvmlInit.call_count == 1
    client.close()
    node.nvml.nvmlShutdown.assert_not_called()


def test_pynvml_not_installed_raises_collector_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    client = NvmlClient()
    with pytest.raises(CollectorError, match="nvidia-ml-py"):
        client.devices()
    assert client.read_fast(0) is None


# -- old drivers, MIG ------------------------------------------------------------------------

def test_old_driver_without_v2_functions_falls_back(open_clients, caplog):
    caplog.set_level(logging.DEBUG, "ringwatch.collectors")
    node = fake.old_driver_without_v2(fake.healthy(2))
    client = start(node, open_clients)
    assert client.devices()[0].memory_total_bytes == 80 * GIB
    for _ in range(3):
        slow = client.read_slow(0)
    assert slow.memory_used_bytes == 10 * GIB + 512 * 1024**2  # v1 counts the reservation
    assert slow.memory_total_bytes == 80 * GIB
    assert slow.throttle_reasons_mask == 0x4
    # Each missing function is tried once per GPU, then the fallback is called directly.
    handle = node.gpus[0].handle
    v2_calls = [c for c in node.nvml.nvmlDeviceGetMemoryInfo.call_args_list
                if c.kwargs and c.args[0] is handle]
    assert len(v2_calls) == 1
    assert node.nvml.nvmlDeviceGetCurrentClocksEventReasons.call_count == 1
    assert node.nvml.nvmlDeviceGetCurrentClocksThrottleReasons.call_count == 3
    assert len(messages(caplog, "memory unavailable (NVML_ERROR_FUNCTION_NOT_FOUND)")) == 1


def test_field_values_missing_falls_back_to_the_functions(open_clients):
    node = fake.healthy(1)
    node.gpus[0].fails["nvmlDeviceGetFieldValues"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    client = start(node, open_clients)
    client.devices()
    assert client.read_fast(0) == FastReading(energy_mj=123_456_789, power_instant_mw=None,
                                              power_average_mw=398_000, sm_clock_mhz=1980,
                                              memory_clock_mhz=2619)
    slow = client.read_slow(0)
    assert slow.throttle_time_ns == {name: (policy + 1) * 1_000_000
                                     for policy, name in fake.POLICIES.items()}
    assert (slow.ecc_corrected_total, slow.ecc_uncorrected_total) == (5, 0)
    assert slow.pcie_replay_total == 17
    assert slow.nvlinks[0].tx_bytes is None and slow.nvlinks[0].crc_errors == 0
    assert node.nvml.nvmlDeviceGetFieldValues.call_count == 1


def test_crc_falls_back_from_flit_to_data_counter(open_clients):
    node = fake.healthy(1)
    client = start(node, open_clients)
    flit = pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT
    answer = node.nvml.nvmlDeviceGetNvLinkErrorCounter.side_effect

    def no_flit(handle, link, counter):
        if counter == flit:
            raise fake.nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return answer(handle, link, counter)

    node.nvml.nvmlDeviceGetNvLinkErrorCounter.side_effect = no_flit
    client.devices()
    assert [link.crc_errors for link in client.read_slow(0).nvlinks] == [100, 102]


def test_mig_enabled_is_flagged_in_the_identity(open_clients):
    client = start(fake.mig_enabled(fake.healthy(2), 0), open_clients)
    gpus = client.devices()
    assert [g.mig_enabled for g in gpus] == [True, False]
    # The whole GPU still reads.
    assert client.read_fast(0).energy_mj == 123_456_789


# -- XID events ------------------------------------------------------------------------------

def test_xid_events_are_counted_per_code_per_gpu(open_clients):
    node = fake.healthy(2)
    for index, code in ((0, 79), (0, 79), (1, 48), (0, 13)):
        fake.xid_event(node, index, code)
    client = start(node, open_clients)
    client.devices()
    assert wait_for(lambda: client.read_slow(0).xid_total == {79: 2, 13: 1}
                    and client.read_slow(1).xid_total == {48: 1})
    registered = node.nvml.nvmlDeviceRegisterEvents.call_args_list
    assert len(registered) == 2
    assert all(c.args[1] == pynvml.nvmlEventTypeXidCriticalError for c in registered)
    # xid_total is a copy, not the live counter.
    client.read_slow(0).xid_total[79] = 1000
    assert client.read_slow(0).xid_total[79] == 2
    thread = client._xid_thread
    client.close()
    assert not thread.is_alive()
    node.nvml.nvmlEventSetFree.assert_called_once()
    node.nvml.nvmlShutdown.assert_called_once()


def test_xid_unsupported_gpu_is_skipped_and_logged_once(open_clients, caplog):
    caplog.set_level(logging.DEBUG, "ringwatch.collectors")
    node = fake.xid_unsupported(fake.healthy(2), 1)
    fake.xid_event(node, 0, 31)
    client = start(node, open_clients)
    client.devices()
    assert wait_for(lambda: client.read_slow(0).xid_total == {31: 1})
    assert client.read_slow(1).xid_total == {}
    assert len(messages(caplog, "XID events of GPU 1 are not counted")) == 1


def test_xid_thread_failure_is_logged_once_and_ends_the_thread(open_clients, caplog):
    node = fake.healthy(1)
    node.wait_error = pynvml.NVML_ERROR_UNKNOWN
    client = start(node, open_clients)
    client.devices()
    assert wait_for(lambda: not client._xid_thread.is_alive())
    assert len(messages(caplog, "XID thread stopped")) == 1
    assert client.read_fast(0).energy_mj == 123_456_789
    node.nvml.nvmlEventSetFree.assert_called_once()
    client.close()


def test_no_xid_thread_when_xid_events_off(open_clients):
    node = fake.healthy(1)
    client = start(node, open_clients, xid_events=False)
    client.devices()
    node.nvml.nvmlEventSetCreate.assert_not_called()
    assert client.read_slow(0).xid_total == {}


# -- lifecycle -------------------------------------------------------------------------------

def test_nvml_init_once_from_two_threads(open_clients):
    node = fake.healthy(2)
    node.init_delay_s = 0.05
    client = start(node, open_clients)
    barrier = threading.Barrier(2)
    results = []

    def call():
        barrier.wait()
        results.append(client.devices())

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert node.nvml.nvmlInit.call_count == 1
    assert len(results) == 2 and results[0] is results[1] and len(results[0]) == 2


def test_close_twice_is_safe(open_clients):
    node = fake.healthy(1)
    client = start(node, open_clients)
    client.devices()
    client.close()
    client.close()
    node.nvml.nvmlShutdown.assert_called_once()
    assert client.read_fast(0) is None
    with pytest.raises(CollectorError, match="closed"):
        client.devices()


def test_close_before_devices_touches_nothing():
    node = fake.healthy(1)
    client = NvmlClient(nvml=node.nvml)
    client.close()
    client.close()
    assert node.nvml.mock_calls == []


def test_read_fast_is_one_field_values_call_per_gpu_read(open_clients):
    node = fake.healthy(2)
    client = start(node, open_clients)
    client.devices()
    client.read_slow(0)
    node.nvml.nvmlDeviceGetFieldValues.reset_mock()
    for _ in range(5):
        client.read_fast(0)
        client.read_fast(1)
    assert node.nvml.nvmlDeviceGetFieldValues.call_count == 10
    requested = node.nvml.nvmlDeviceGetFieldValues.call_args.args[1]
    assert {f for f, _ in requested} == {pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
                                         pynvml.NVML_FI_DEV_POWER_INSTANT,
                                         pynvml.NVML_FI_DEV_POWER_AVERAGE}
    node.nvml.nvmlDeviceGetTotalEnergyConsumption.assert_not_called()
    node.nvml.nvmlDeviceGetPowerUsage.assert_not_called()
    node.nvml.nvmlDeviceGetPcieThroughput.assert_not_called()


def test_lazy_init_on_first_read(open_clients):
    node = fake.healthy(1)
    client = start(node, open_clients)
    assert client.read_fast(0).energy_mj == 123_456_789
    node.nvml.nvmlInit.assert_called_once()


# -- tables ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("value_type", "member", "value"), [
    (pynvml.NVML_VALUE_TYPE_DOUBLE, "dVal", 1.5),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", 4_000_000_000),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG, "ulVal", 2**40),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", 2**63 + 5),
    (pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG, "sllVal", -(2**40)),
    (pynvml.NVML_VALUE_TYPE_SIGNED_INT, "siVal", -7),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT, "usVal", 65_000),
])
def test_field_value_decoded_by_its_value_type(value_type, member, value):
    slot = pynvml.c_nvmlFieldValue_t()
    slot.valueType = value_type
    setattr(slot.value, member, value)
    assert fields.decode(slot, fields.value_members(pynvml)) == value


def test_unknown_value_type_decodes_to_none():
    slot = pynvml.c_nvmlFieldValue_t()
    slot.valueType = 99
    assert fields.decode(slot, fields.value_members(pynvml)) is None


def test_table_numbers_are_pynvml_constants():
    """The nvml.h numbers kept for older pynvml versions match this pynvml's names."""
    specs = [*fields.FAST_FIELDS, *fields.SLOW_FIELDS, *fields.link_fields(3)]
    assert {s.name: s.number for s in specs} == {s.name: getattr(pynvml, s.name) for s in specs}
    assert {n: v for n, v, _ in fields.VALUE_TYPES} == {
        n: getattr(pynvml, n) for n, _, _ in fields.VALUE_TYPES}
    assert all(hasattr(pynvml, name) for name in fields.ERRORS)
    for spec in specs:
        if spec.fallback:
            assert callable(getattr(pynvml, spec.fallback.fn))
            assert all(isinstance(getattr(pynvml, a), int) for a in spec.fallback.args)


# -- import ----------------------------------------------------------------------------------

IMPORT_INERT = r"""
import json, threading, pynvml
calls = []

def spy(name):
    def call(*args, **kwargs):
        calls.append(name)
        raise RuntimeError("NVML touched at import: " + name)
    return call

for name in dir(pynvml):
    if name.startswith(("nvml", "_nvml", "_LoadNvml")) and callable(getattr(pynvml, name)):
        setattr(pynvml, name, spy(name))
threads = threading.active_count()
import ringwatch.collectors._nvml as m
client = m.NvmlClient()
client.close()
print(json.dumps({"calls": calls, "threads": threading.active_count() - threads}))
"""


def test_import_and_construction_touch_no_nvml(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGWATCH_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run([sys.executable, "-c", IMPORT_INERT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"calls": [], "threads": 0}
