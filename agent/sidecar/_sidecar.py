"""The node sidecar: samples the GPUs and the host, follows the ranks' logs, exports.

Threads, each on its own schedule so a slow read never delays the 20 Hz power samples:

* ``fast``: power, energy and clocks of every GPU every ``fast_interval_s``;
* ``slow``: the other GPU readings and the host every ``slow_interval_s``, the ranks' logs
  every ``logs_interval_s``;
* ``export``: an OTLP push every ``export_interval_s``, or sooner when the ranks' finished
  steps pile up (when an endpoint is set);
* Prometheus' HTTP server answers scrapes from the same state.

Everything is built here, at the composition root, and passed down: clock, device client,
host collector, registry. :meth:`Sidecar.stop` (SIGTERM, SIGINT) ends every thread, pushes a
last export, and closes the recording.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ringwatch._clock import Clock, SystemClock
from ringwatch._config import AgentConfig
from ringwatch.agent.sidecar._node_state import NodeState
from ringwatch.collectors._types import CollectorError, DeviceClient, HostReading

log = logging.getLogger("ringwatch.agent")

#: How often (s) the export thread asks whether a push is due, at most.
EXPORT_CHECK_S = 1.0


class Sidecar:
    """One node's agent.

    Args:
        config: Intervals, endpoints, log folder.
        device_client: The GPUs (NVML, a replay, or None for a node without GPUs).
        host_collector: Anything with ``read() -> HostReading`` (None: no host readings).
        clock: Time source of every schedule.
        recorder: A :class:`~ringwatch.collectors._recording.RecordingWriter`, or None.
        tail: A :class:`~ringwatch.agent.sidecar._rank_tail.RankLogTail`, or None.
        sleep: ``sleep(seconds, stop_event)``; the default waits on the stop event.
    """

    def __init__(self, config: AgentConfig, *, device_client: DeviceClient | None,
                 host_collector=None, clock: Clock | None = None, recorder=None, tail=None,
                 sleep: Callable | None = None):
        self.config = config
        self.client = device_client
        self.host_collector = host_collector
        self.clock = clock or SystemClock()
        self.recorder = recorder
        self.tail = tail
        self.state = NodeState(host=config.host, job=config.job_id,
                               replayed=bool(getattr(device_client, "replayed", False)),
                               source=getattr(device_client, "source", "nvml"),
                               power_window_s=config.power_window_s)
        self.started_wall_ns = self.clock.wall_ns()
        self.stop_event = threading.Event()
        self._sleep = sleep or (lambda s, ev: ev.wait(s))
        self._threads: list[threading.Thread] = []
        self.pusher = None
        self.device_problem: str | None = None

    # --- start-up ---------------------------------------------------------------------
    def open_devices(self) -> None:
        """Enumerate the GPUs. A node without a driver runs on (host and logs only) with the
        reason in :attr:`device_problem`; a replay with no GPU is a configuration error."""
        if self.client is None:
            return
        try:
            self.state.set_devices(self.client.devices())
        except CollectorError as exc:
            if self.state.replayed:
                raise
            self.device_problem = str(exc)  # the entry point says it, once
            self.client = None

    # --- one round of each schedule ---------------------------------------------------
    def sample_fast(self) -> None:
        now, wall = self.clock.mono_ns(), self.clock.wall_ns()
        for index in list(self.state.gpus):
            r = self.client.read_fast(index)
            self.state.record_fast(index, r, now, wall)
            if self.recorder is not None:
                self.recorder.fast(index, now, r)

    def sample_slow(self) -> None:
        if self.client is not None:
            now = self.clock.mono_ns()
            for index in list(self.state.gpus):
                r = self.client.read_slow(index)
                self.state.record_slow(index, r)
                if self.recorder is not None:
                    self.recorder.slow(index, now, r)
        if self.host_collector is not None:
            h: HostReading = self.host_collector.read()
            self.state.host_reading = h
            if self.recorder is not None:
                self.recorder.host(self.clock.mono_ns(), h)

    def read_logs(self) -> None:
        if self.tail is None:
            return
        ranks = self.tail.poll()
        with self.state.lock:
            self.state.ranks = dict(ranks)
            if not self.config.job_id:
                jobs = {s.job for s in ranks.values()}
                self.state.job = jobs.pop() if len(jobs) == 1 else ""

    def once(self) -> None:
        """One round of everything (``ringwatch agent --once``)."""
        if self.client is not None:
            self.sample_fast()
        self.sample_slow()
        self.read_logs()

    # --- loops ------------------------------------------------------------------------
    def _guarded(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a reading never takes the agent down
            self.state.count_error(name)
            if self.state.errors[name] == 1:
                log.warning("ringwatch agent: %s failed: %s", name, exc)

    def _loop(self, name: str, interval_s: float, fn: Callable[[], None],
              count_late: bool = False) -> None:
        period = int(interval_s * 1e9)
        due = self.clock.mono_ns()
        while not self.stop_event.is_set():
            self._guarded(name, fn)
            due += period
            now = self.clock.mono_ns()
            if now - due > period:  # fell behind by more than a period: skip, do not burst
                if count_late:
                    self.state.late_ticks += 1
                due = now
            self._sleep(max(0.0, (due - now) / 1e9), self.stop_event)

    def _start(self, name: str, interval_s: float, fn, count_late: bool = False) -> None:
        t = threading.Thread(target=self._loop, args=(name, interval_s, fn, count_late),
                             name=f"ringwatch-agent-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def start(self) -> None:
        """Start the sampling and export threads (after :meth:`open_devices`)."""
        cfg = self.config
        if self.client is not None and self.state.gpus:
            self._start("fast", cfg.fast_interval_s, self.sample_fast, count_late=True)
        self._start("slow", cfg.slow_interval_s, self.sample_slow)
        if self.tail is not None:
            self._start("logs", cfg.logs_interval_s, self.read_logs)
        if cfg.otlp_endpoint:
            self.pusher = self.make_pusher()
            self._start("export", min(cfg.export_interval_s, EXPORT_CHECK_S), self.export)

    def export(self) -> None:
        """A push, when one is due (:meth:`OtlpPusher.due`: every ``export_interval_s``, or
        sooner when steps wait). The thread asks every :data:`EXPORT_CHECK_S` at most."""
        now, every_ns = self.clock.wall_ns(), int(self.config.export_interval_s * 1e9)
        if self.pusher.due(now, every_ns):
            self.pusher.push(now, interval_ns=every_ns)

    def make_pusher(self):
        """The OTLP pusher of :attr:`config`'s endpoint. A push never outlives its interval
        (the exporter retries within its timeout): a dead collector costs one failed push
        per interval, not a growing backlog. The config's token, when it has one, goes as
        the ``authorization`` header (over one given with ``--otlp-header``)."""
        from ringwatch.agent.sidecar._otlp_export import OtlpPusher

        cfg = self.config
        headers = dict(cfg.otlp_headers)
        if cfg.token is not None:  # from a file or the environment, never from argv
            headers["authorization"] = f"Bearer {cfg.token}"
        return OtlpPusher(self.state, cfg.otlp_endpoint, headers=headers,
                          timeout_s=max(0.5, min(5.0, cfg.export_interval_s)),
                          start_ns=self.started_wall_ns)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every thread, push a last export, close the recording and the device."""
        self.stop_event.set()
        for t in self._threads:
            t.join(timeout_s)
        if self.pusher is not None:
            self.pusher.push(self.clock.wall_ns())
            self.pusher.close()
        if self.recorder is not None:
            self.recorder.close()
        if self.client is not None:
            self.client.close()
