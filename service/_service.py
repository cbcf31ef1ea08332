"""``ringwatch serve``: the receiver, the per-job state, the analysis loop and the outputs.

Threads: the OTLP receiver's and the API server's (one per connection, at most
``max_connections`` each, plus one accepting thread each), and one analysis loop that every
``window_s`` takes a copy of each job's state, runs the analyzers on it and hands the findings
to the store (opened, updated, resolved; persisted to Parquet). Detectors can be paused and
thresholds changed while it runs (:meth:`Service.control`).

A job evicted by ``max_jobs`` leaves nothing behind: its state, its online window, its series
(analysis lag and duration, hiccups) and its findings are dropped by the next round.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ringwatch._clock import Clock, SystemClock
from ringwatch._net import parse_listen
from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS, Thresholds

log = logging.getLogger("ringwatch.service")

DETECTORS = ("hang", "straggler", "slow_link")


@dataclass
class ServiceConfig:
    """Where the service listens and how often it analyses.

    Attributes:
        otlp_listen: ``HOST:PORT`` of the OTLP/HTTP receiver (loopback by default).
        otlp_grpc_listen: ``HOST:PORT`` of the OTLP/gRPC receiver, for a Collector's
            ``loadbalancing`` exporter (None: none; needs ``grpcio``).
        api_listen: ``HOST:PORT`` of ``/metrics`` and ``/api/v1/...``.
        state_dir: Folder of the findings' Parquet files (None: memory only).
        window_s: Seconds between analysis rounds.
        token: Bearer token the agents must send and API changes need (None: none asked).
        read_token: A second token that allows API reads only; giving one turns
            ``auth_reads`` on.
        auth_reads: GETs of ``/metrics`` and ``/api/v1`` need ``token`` (or ``read_token``).
        resolve_after_s: A finding not seen for this long is resolved.
        keep_steps: Steps of each job kept for analysis.
        max_jobs: Jobs held at once; one more evicts the one silent longest.
        max_connections: Connections each HTTP port (OTLP, API) handles at once (a thread
            each); more are answered 503.
        read_timeout_s: Time an HTTP request may take to arrive, seconds.

    Raises:
        ValueError: Read authentication without ``token``, or a limit that is not positive.
    """

    otlp_listen: str = "127.0.0.1:4318"
    otlp_grpc_listen: str | None = None
    api_listen: str = "127.0.0.1:9410"
    state_dir: Path | None = Path("ringwatch-serve")
    window_s: float = 1.0
    token: str | None = field(default=None, repr=False)
    read_token: str | None = field(default=None, repr=False)
    auth_reads: bool = False
    resolve_after_s: float = 30.0
    keep_steps: int = 200
    max_jobs: int = 64
    max_connections: int = 128
    read_timeout_s: float = 10.0
    detectors: set[str] = field(default_factory=lambda: set(DETECTORS))
    thresholds: Thresholds = DEFAULT_THRESHOLDS

    def __post_init__(self) -> None:
        self.auth_reads = self.auth_reads or bool(self.read_token)
        if self.auth_reads and not self.token:
            raise ValueError("read authentication needs the service's token "
                             "(RINGWATCH_TOKEN or --token-file)")
        if self.max_connections < 1 or not self.read_timeout_s > 0:
            raise ValueError("max_connections and read_timeout_s must be positive")


class Service:
    """The central service; :meth:`start`, then :meth:`stop`."""

    def __init__(self, config: ServiceConfig, *, clock: Clock | None = None):
        from ringwatch.service._jobs import Jobs
        from ringwatch.service._store import FindingsStore

        self.config = config
        self.clock = clock or SystemClock()
        self.jobs = Jobs(keep_steps=config.keep_steps, max_jobs=config.max_jobs)
        self.store = FindingsStore(config.state_dir, clock=self.clock,
                                   resolve_after_s=config.resolve_after_s)
        self.lock = threading.Lock()  # detectors and thresholds
        self.stop_event = threading.Event()
        self.rounds = 0
        self.analysis_errors = 0
        self.hiccups: dict[tuple[str, int, str], int] = {}  # (job, rank, host) -> count
        self.link_hiccups: dict[tuple[str, str], int] = {}  # (job, suspect host) -> count
        self.last_round_s: dict[str, float] = {}
        self.last_lag_s: dict[str, float] = {}
        self.live: dict = {}  # job -> LiveAnalysis (its online window)
        from ringwatch.service._windows import WindowStates

        self.windows = WindowStates(config.state_dir)  # their baselines, across restarts
        self.receiver = None
        self.grpc_receiver = None
        self.api = None
        self._thread: threading.Thread | None = None

    # --- ingest ---------------------------------------------------------------------------
    def _on_request(self, request, info) -> int:
        return self.jobs.ingest(request, info.received_wall_ns)

    # --- analysis -------------------------------------------------------------------------
    def analyze_once(self) -> list:
        """One round over every job; returns the store's changes."""
        from ringwatch.service._analysis import (
            LiveAnalysis,
            analyze_live,
            without_unplaced_links,
        )

        with self.lock:
            detectors = frozenset(self.config.detectors)
            thresholds = self.config.thresholds
        changes = []
        with self.jobs.lock:
            jobs = list(self.jobs.jobs)
        for job in jobs:
            jl, rows, work = self.jobs.take(job)
            if jl is None:
                continue
            t0 = time.perf_counter()
            now = self.clock.wall_ns()
            try:
                live = self.live.get(job)
                if live is None:
                    live = self.live[job] = LiveAnalysis()
                    self.windows.load(job, live.window)
                findings = analyze_live(jl, now_ns=now, detectors=detectors,
                                        thresholds=thresholds, live=live, new_rows=rows,
                                        new_work=work)
                self.windows.save(job, live.window)
            except Exception as exc:
                self.analysis_errors += 1
                log.warning("analysis of job %s failed: %s", job, exc, exc_info=True)
                continue
            open_stragglers = [t.finding for t in self.store.current(job, state="open")
                               if t.finding.kind == "straggler"]
            findings = without_unplaced_links(findings, open_stragglers + [
                f for f in findings if f.kind == "straggler"])
            new = self.store.update(job, findings, now_ns=now)
            self._count_hiccups(job, live.take_hiccups(), jl)
            changes += new
            self._superseded(job, findings)
            self.last_round_s[job] = time.perf_counter() - t0
            self.last_lag_s[job] = (now - jl.last_push_ns) / 1e9
        self._forget_evicted()
        changes += self.store.sweep(now_ns=self.clock.wall_ns())  # jobs that went quiet
        self.rounds += 1
        return changes

    def _forget_evicted(self) -> None:
        """Drop every per-job state of the jobs the state evicted (``max_jobs``): online
        window, series, findings. Jobs the state never held (findings loaded from the state
        folder after a restart, before their agents push again) are kept."""
        evicted = self.jobs.drain_evicted()  # first: one evicted later waits for next round
        with self.jobs.lock:  # the receivers' threads add and evict jobs meanwhile
            held = set(self.jobs.jobs)
        for job in evicted:
            if job not in held:
                self.store.forget_job(job)
                self.windows.forget(job)
        for d in (self.live, self.last_round_s, self.last_lag_s):
            for gone in set(d) - held:
                d.pop(gone, None)
        for name in ("hiccups", "link_hiccups"):
            counts = getattr(self, name)
            if any(k[0] not in held for k in counts):
                setattr(self, name, {k: n for k, n in counts.items() if k[0] in held})

    def _superseded(self, job: str, findings) -> None:
        """Resolve the open stragglers a slow link now explains: before the link was clear,
        its host's rank looked like a compute straggler (the analyzers fold it into the link
        once both show, see ``explain_by_links``)."""
        links = [f for f in findings if f.kind == "slow_link" and len(f.hosts) == 1]
        for t in self.store.current(job, state="open"):
            s = t.finding
            if s.kind != "straggler" or s.since_step is None:
                continue
            for f in links:
                if (s.hosts == f.hosts and f.since_step is not None
                        and abs(s.since_step - f.since_step) <= 5):
                    self.store.resolve(t.id, durable=False)  # written with the round
                    break

    def _count_hiccups(self, job: str, hiccups, jl=None) -> None:
        """One more hiccup per rank for each transient straggler the window reported first
        this round, and per suspect host for each transient slow link (a hiccup is never a
        finding: see ``analyze_live``). Every rank and host of the job that is known starts
        at 0, as Prometheus advises for labelled counters: the series exist before the first
        hiccup, so ``increase()`` sees that one too and a per-rank or per-host panel shows
        the ones that had none."""
        for f in hiccups:  # a straggler: one rank, its host; a link: its suspect hosts
            if f.kind == "slow_link":
                for host in f.hosts:
                    self.link_hiccups[(job, host)] = self.link_hiccups.get((job, host), 0) + 1
                continue
            key = (job, f.ranks[0], f.hosts[0] if f.hosts else "")
            self.hiccups[key] = self.hiccups.get(key, 0) + 1
        if jl is not None:
            for rank, rl in list(jl.ranks.items()):
                if rl.host:
                    self.hiccups.setdefault((job, rank, rl.host), 0)
                    self.link_hiccups.setdefault((job, rl.host), 0)

    def _loop(self) -> None:
        while not self.stop_event.wait(self.config.window_s):
            self.analyze_once()

    # --- control --------------------------------------------------------------------------
    def control(self, *, pause: list[str] = (), resume: list[str] = (),
                thresholds: dict | None = None) -> dict:
        """Pause or resume detectors, change thresholds; returns the new settings.

        Raises:
            ValueError: an unknown detector or threshold, or a threshold that is not a
                positive number.
        """
        unknown = (set(pause) | set(resume)) - set(DETECTORS)
        if unknown:
            raise ValueError(f"unknown detector(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(DETECTORS)}")
        with self.lock:
            # validated as a whole (ThresholdError is a ValueError): nothing changes on a
            # bad name or value
            th = self.config.thresholds.with_values(thresholds or {})
            self.config.detectors -= set(pause)
            self.config.detectors |= set(resume)
            self.config.thresholds = th
            return self.settings()

    def settings(self) -> dict:
        return {"detectors": {d: d in self.config.detectors for d in DETECTORS},
                "thresholds": self.config.thresholds.to_dict(),
                "window_s": self.config.window_s}

    # --- life -----------------------------------------------------------------------------
    def start(self) -> Service:
        """Binds the receivers and the API and starts the analysis loop; returns self.

        Raises:
            OSError: An address cannot be bound (what was started is stopped again).
            ImportError: A gRPC receiver is asked for and ``grpcio`` is missing.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        from ringwatch.service._api import ApiServer
        from ringwatch.service._receiver import OtlpReceiver

        cfg = self.config
        host, port = parse_listen(cfg.otlp_listen)
        self.receiver = OtlpReceiver(handler=self._on_request, host=host, port=port,
                                     token=cfg.token, clock=self.clock,
                                     max_decompressed_bytes=16 << 20,
                                     max_connections=cfg.max_connections,
                                     read_timeout_s=cfg.read_timeout_s).start()
        if cfg.otlp_grpc_listen:
            from ringwatch.service._grpc_receiver import OtlpGrpcReceiver

            host, port = parse_listen(cfg.otlp_grpc_listen)
            self.grpc_receiver = OtlpGrpcReceiver(
                handler=self._on_request, host=host, port=port, token=cfg.token,
                clock=self.clock, max_request_bytes=16 << 20).start()
        host, port = parse_listen(cfg.api_listen)
        self.api = ApiServer(self, host=host, port=port, max_connections=cfg.max_connections,
                             read_timeout_s=cfg.read_timeout_s).start()
        self._thread = threading.Thread(target=self._loop, name="ringwatch-serve-analysis",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(10)
        for s in (self.receiver, self.grpc_receiver, self.api):
            if s is not None:
                s.stop()
        self.store.close()
