"""``ringwatch agent``: the composition root of the node sidecar.

Builds the device client (NVML, or a replay of a recording), the host collector, the log
follower, the Prometheus registry and the OTLP pusher, then runs until SIGTERM/SIGINT (or once).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from ringwatch._config import AgentConfig, ConfigError
from ringwatch.agent.sidecar._sidecar import Sidecar


def build_sidecar(config: AgentConfig, *, replay: str | Path | None = None,
                  record: str | Path | None = None, no_gpu: bool = False,
                  sysfs_root: str | Path = "/", loop: bool = True) -> Sidecar:
    """A sidecar wired for ``config``; nothing started yet.

    Raises:
        ConfigError: the recording to replay cannot be read, or holds no GPU.
    """
    from ringwatch.agent.sidecar._rank_tail import RankLogTail
    from ringwatch.collectors._host import HostCollector
    from ringwatch.collectors._types import CollectorError

    host = HostCollector(root=sysfs_root)
    if replay is not None:
        from ringwatch.collectors._recording import ReplayClient, ReplayHost, load_recording

        try:
            rec = load_recording(_synthetic(replay) if str(replay).startswith("synthetic")
                                 else replay)
        except (OSError, CollectorError) as exc:
            raise ConfigError(f"cannot replay {replay}: {exc}") from None
        client = ReplayClient(rec, loop=loop)
        if rec.host_readings[0]:
            host = ReplayHost(rec, loop=loop)
    elif no_gpu:
        client = None
    else:
        from ringwatch.collectors._nvml import NvmlClient

        client = NvmlClient()
    tail = (RankLogTail(config.log_dir, stale_after_s=config.stale_after_s)
            if config.log_dir is not None else None)
    sidecar = Sidecar(config, device_client=client, host_collector=host, tail=tail)
    try:
        sidecar.open_devices()
    except CollectorError as exc:
        raise ConfigError(str(exc)) from None
    if record is not None:
        from ringwatch.collectors._recording import RecordingWriter

        sidecar.recorder = RecordingWriter(
            record, host=config.host, gpus=list(g.identity for g in sidecar.state.gpus.values()),
            start_mono_ns=sidecar.clock.mono_ns(), started_wall_ns=sidecar.started_wall_ns,
            origin=sidecar.state.source)
    return sidecar


def _synthetic(spec: str) -> Path:
    """``synthetic`` or ``synthetic:N``: a fresh N-GPU synthetic recording (default 8)."""
    import tempfile

    from ringwatch.collectors._synthetic import write_synthetic_recording

    _, _, n = str(spec).partition(":")
    if n and not n.isdigit():
        raise ConfigError(f"--replay {spec}: expected synthetic or synthetic:N")
    path = Path(tempfile.gettempdir()) / f"ringwatch-synthetic-{int(n or 8)}gpu.jsonl.gz"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        write_synthetic_recording(tmp, gpus=int(n or 8))
        os.replace(tmp, path)
    return path


def run_agent(config: AgentConfig, *, once: bool = False, duration_s: float | None = None,
              **build) -> int:
    """Run the sidecar until a signal (or ``duration_s``), or one round with ``once``."""
    from ringwatch.agent.sidecar._prom_export import build_registry, exposition, serve_metrics

    sidecar = build_sidecar(config, **build)
    registry = build_registry(sidecar.state)
    if sidecar.device_problem:
        print(f"ringwatch agent: {sidecar.device_problem}; going on without GPU readings",
              file=sys.stderr)
    if once:
        sidecar.once()
        if config.otlp_endpoint:
            pusher = sidecar.make_pusher()
            ok = pusher.push(sidecar.clock.wall_ns())
            pusher.close()
            if not ok:
                print(f"ringwatch agent: OTLP push to {config.otlp_endpoint} failed",
                      file=sys.stderr)
        sys.stdout.write(exposition(registry))
        sidecar.stop()
        return 0
    server = None
    if config.prometheus_listen:
        try:
            server, _ = serve_metrics(registry, config.prometheus_listen)
        except OSError as exc:
            raise ConfigError(f"cannot serve /metrics on {config.prometheus_listen}: "
                              f"{exc.strerror or exc}") from None
    done = threading.Event()

    def _stop(signum, _frame):
        done.set()

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        sidecar.start()
        gpus = len(sidecar.state.gpus)
        src = sidecar.state.source
        where = f", /metrics on {config.prometheus_listen}" if server else ""
        push = f", OTLP to {config.otlp_endpoint}" if config.otlp_endpoint else ""
        print(f"ringwatch agent: {gpus} GPU(s) ({src}), host {config.host}{where}{push}",
              file=sys.stderr, flush=True)
        done.wait(duration_s)
    finally:
        sidecar.stop()
        if server is not None:
            server.shutdown()
        for s, h in old.items():
            signal.signal(s, h)
    return 0
