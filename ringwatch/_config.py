"""Capture configuration: frozen, keyword-only, CLI flag > environment variable > default.

Every environment variable ringwatch reads is declared here, once, with its unit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

# --- environment variables (the only place their names appear) -------------------------------
ENV_LOG_DIR = "RINGWATCH_LOG_DIR"  # path: root folder of the per-rank logs
ENV_JOB_ID = "RINGWATCH_JOB_ID"  # str: job identifier shared by all ranks
ENV_HOST = "RINGWATCH_HOST"  # str: host name to record (defaults to the machine's name)
ENV_FLUSH_INTERVAL_S = "RINGWATCH_FLUSH_INTERVAL_S"  # seconds between segment writes
ENV_BUFFER_EVENTS = "RINGWATCH_BUFFER_EVENTS"  # events: bound of the in-memory buffer
ENV_COMPACT_SEGMENTS = "RINGWATCH_COMPACT_SEGMENTS"  # segments merged into one file
ENV_DDP_HOOK = "RINGWATCH_DDP_HOOK"  # 0/1: time DDP buckets through a comm hook
ENV_NCCL_HOOK = "RINGWATCH_NCCL_HOOK"  # 0/1: NCCL completion hook + CUDA-event timing
ENV_FR_BACKFILL = "RINGWATCH_FR_BACKFILL"  # 0/1: recover unseen collectives from the FR
ENV_FR_BACKFILL_INTERVAL_S = "RINGWATCH_FR_BACKFILL_INTERVAL_S"  # seconds between FR reads
ENV_FR_DUMP = "RINGWATCH_FR_DUMP"  # 0/1: save the Flight Recorder beside the log at exit
ENV_WRAP_BACKEND = "RINGWATCH_WRAP_BACKEND"  # 0/1: opt-in wrapper ProcessGroup backend
ENV_AUTO_STEP = "RINGWATCH_AUTO_STEP"  # 0/1: count optimizer steps as the `step` column
ENV_NATIVE = "RINGWATCH_NATIVE"  # 0/1: record Gloo groups with the native backend wrapper
ENV_AUTOATTACH = "RINGWATCH_AUTOATTACH"  # 1: set by `ringwatch run` for the child processes
ENV_DISABLE = "RINGWATCH_DISABLE"  # 1: attach() does nothing
# The node sidecar (`ringwatch agent`):
ENV_AGENT_FAST_INTERVAL_S = "RINGWATCH_AGENT_FAST_INTERVAL_S"  # s: power/energy/clock sampling
ENV_AGENT_SLOW_INTERVAL_S = "RINGWATCH_AGENT_SLOW_INTERVAL_S"  # s: other GPU + host reads
ENV_AGENT_LOGS_INTERVAL_S = "RINGWATCH_AGENT_LOGS_INTERVAL_S"  # s: reading the ranks' logs
ENV_AGENT_EXPORT_INTERVAL_S = "RINGWATCH_AGENT_EXPORT_INTERVAL_S"  # s: between OTLP pushes
ENV_AGENT_PROMETHEUS = "RINGWATCH_AGENT_PROMETHEUS"  # HOST:PORT of /metrics, "off": none
ENV_AGENT_POWER_WINDOW_S = "RINGWATCH_AGENT_POWER_WINDOW_S"  # s: span of peak/min power
ENV_AGENT_TOKEN = "RINGWATCH_AGENT_TOKEN"  # str: bearer token sent with each OTLP push
ENV_AGENT_TOKEN_FILE = "RINGWATCH_AGENT_TOKEN_FILE"  # path: file holding that token
# The central service (`ringwatch serve`, `ringwatch status`); secrets never go on argv:
ENV_TOKEN = "RINGWATCH_TOKEN"  # str: bearer token of pushes and API changes (and reads)
ENV_TOKEN_FILE = "RINGWATCH_TOKEN_FILE"  # path: file holding that token
ENV_READ_TOKEN = "RINGWATCH_READ_TOKEN"  # str: bearer token that allows API reads only
ENV_READ_TOKEN_FILE = "RINGWATCH_READ_TOKEN_FILE"  # path: file holding that token
# OpenTelemetry's own variables, honoured as the SDK documents them:
ENV_OTLP_METRICS_ENDPOINT = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"  # URL of /v1/metrics
ENV_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"  # base URL; /v1/metrics is appended
ENV_OTLP_HEADERS = "OTEL_EXPORTER_OTLP_HEADERS"  # key=value,key=value (e.g. authorization)

DEFAULT_LOG_DIR = "ringwatch-logs"


class ConfigError(ValueError):
    """A configuration value is malformed (raised at start-up only)."""


def _parse_bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r}: expected 0 or 1")


def _parse_pos(name: str, raw: str, kind: type) -> float | int:
    try:
        v = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a positive {kind.__name__}") from None
    if v <= 0:
        raise ConfigError(f"{name}={raw!r}: expected a positive {kind.__name__}")
    return v


@dataclass(frozen=True, kw_only=True, slots=True)
class CaptureConfig:
    """How the in-process agent captures and stores collectives.

    Attributes:
        log_dir: Root folder; rank logs go to ``log_dir/<job_id>/rank-<RANK>/``.
        job_id: Job identifier; ``None`` means ``TORCHELASTIC_RUN_ID`` or one agreed by the
            ranks through the rendezvous store.
        host: Host name to record; ``None`` means ``socket.gethostname()``.
        flush_interval_s: Seconds between segment writes (bounds what a SIGKILL can lose).
        buffer_events: Bound of the in-memory event buffer; events past it are counted and
            dropped.
        compact_segments: Merge this many small segments into one file.
        ddp_hook: Time DDP's gradient buckets through an automatically installed comm hook.
        nccl_hook: On NCCL groups, turn on collective timing and register a completion hook.
        fr_backfill: Recover collectives issued from C++ outside ringwatch's hooks from the
            Flight Recorder.
        fr_backfill_interval_s: Minimum seconds between two Flight Recorder reads.
        fr_dump: Save the Flight Recorder's content beside the rank's log at exit.
        wrap_backend: Create Gloo groups through the ringwatch wrapper backend (sees every
            collective, including functional and compiled ones, at a higher cost).
        auto_step: Fill the ``step`` column from optimizer steps when the job gives no markers.
        native: Record Gloo groups with the native C++ backend wrapper (within about 2 µs
            of the bare call on the calling thread, C++-issued collectives included), built
            against the installed torch on first use; where it cannot be built, the Python
            hooks.
    """

    log_dir: Path = Path(DEFAULT_LOG_DIR)
    job_id: str | None = None
    host: str | None = None
    flush_interval_s: float = 2.0
    buffer_events: int = 200_000
    compact_segments: int = 32
    ddp_hook: bool = True
    nccl_hook: bool = True
    fr_backfill: bool = True
    fr_backfill_interval_s: float = 10.0
    fr_dump: bool = True
    wrap_backend: bool = False
    auto_step: bool = True
    native: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> CaptureConfig:
        """Build a config from ``env`` (default ``os.environ``), then apply ``overrides``.

        Args:
            env: Environment mapping to read.
            **overrides: Explicit values (CLI flags, ``attach()`` arguments); ``None`` values
                are ignored so callers can pass optional flags straight through.

        Raises:
            ConfigError: a variable or override is malformed.
        """
        env = os.environ if env is None else env
        kw: dict = {}
        if env.get(ENV_LOG_DIR):
            kw["log_dir"] = Path(env[ENV_LOG_DIR])
        if env.get(ENV_JOB_ID):
            kw["job_id"] = env[ENV_JOB_ID]
        if env.get(ENV_HOST):
            kw["host"] = env[ENV_HOST]
        for name, key, kind in (
            (ENV_FLUSH_INTERVAL_S, "flush_interval_s", float),
            (ENV_BUFFER_EVENTS, "buffer_events", int),
            (ENV_COMPACT_SEGMENTS, "compact_segments", int),
            (ENV_FR_BACKFILL_INTERVAL_S, "fr_backfill_interval_s", float),
        ):
            if env.get(name):
                kw[key] = _parse_pos(name, env[name], kind)
        for name, key in (
            (ENV_DDP_HOOK, "ddp_hook"),
            (ENV_NCCL_HOOK, "nccl_hook"),
            (ENV_FR_BACKFILL, "fr_backfill"),
            (ENV_FR_DUMP, "fr_dump"),
            (ENV_WRAP_BACKEND, "wrap_backend"),
            (ENV_AUTO_STEP, "auto_step"),
            (ENV_NATIVE, "native"),
        ):
            if name in env:
                kw[key] = _parse_bool(name, env[name])
        cfg = cls(**kw)
        given = {k: v for k, v in overrides.items() if v is not None}
        known = {f.name for f in fields(cls)}
        unknown = set(given) - known
        if unknown:
            raise ConfigError(f"unknown capture option(s): {', '.join(sorted(unknown))}")
        if "log_dir" in given:
            given["log_dir"] = Path(given["log_dir"])
        cfg = replace(cfg, **given)
        if min(cfg.flush_interval_s, cfg.buffer_events, cfg.compact_segments,
               cfg.fr_backfill_interval_s) <= 0:
            raise ConfigError("flush_interval_s, buffer_events, compact_segments and "
                              "fr_backfill_interval_s must be > 0")
        return cfg

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce this config in a child process."""
        out = {
            ENV_LOG_DIR: str(self.log_dir),
            ENV_FLUSH_INTERVAL_S: repr(self.flush_interval_s),
            ENV_BUFFER_EVENTS: str(self.buffer_events),
            ENV_COMPACT_SEGMENTS: str(self.compact_segments),
            ENV_DDP_HOOK: str(int(self.ddp_hook)),
            ENV_NCCL_HOOK: str(int(self.nccl_hook)),
            ENV_FR_BACKFILL: str(int(self.fr_backfill)),
            ENV_FR_BACKFILL_INTERVAL_S: repr(self.fr_backfill_interval_s),
            ENV_FR_DUMP: str(int(self.fr_dump)),
            ENV_WRAP_BACKEND: str(int(self.wrap_backend)),
            ENV_AUTO_STEP: str(int(self.auto_step)),
            ENV_NATIVE: str(int(self.native)),
        }
        if self.job_id:
            out[ENV_JOB_ID] = self.job_id
        if self.host:
            out[ENV_HOST] = self.host
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentConfig:
    """How the node sidecar (``ringwatch agent``) samples and exports.

    Attributes:
        fast_interval_s: Seconds between power/energy/clock samples (0.05: 20 Hz).
        slow_interval_s: Seconds between the other GPU reads and the host reads.
        logs_interval_s: Seconds between reads of the ranks' logs.
        export_interval_s: Seconds between OTLP pushes.
        otlp_endpoint: URL the OTLP/HTTP metrics go to (None: no push).
        otlp_headers: Extra headers of each push.
        prometheus_listen: ``HOST:PORT`` of ``/metrics`` (None: not served); loopback by
            default, like ``ringwatch serve``: open it (``0.0.0.0:9400``) for a scraper on
            another machine.
        log_dir: Root of the ranks' logs on this node (None: no collective summaries).
        job_id: Job label of the node's GPU and host series ("" : taken from the one job
            whose ranks run here, if only one does).
        host: Host name label (default: the machine's name).
        power_window_s: Span of the peak/min power gauges, seconds.
        stale_after_s: A rank whose log has not been written for this long is dropped.
        token: Bearer token sent as ``authorization`` with each push (None: none); read from
            ``token_file=`` (the ``--token-file`` flag), else the file named by
            ``RINGWATCH_AGENT_TOKEN_FILE``, else ``RINGWATCH_AGENT_TOKEN``; never shown in
            the config's repr.
    """

    fast_interval_s: float = 0.05
    slow_interval_s: float = 1.0
    logs_interval_s: float = 2.0
    export_interval_s: float = 10.0
    otlp_endpoint: str | None = None
    otlp_headers: tuple[tuple[str, str], ...] = ()
    prometheus_listen: str | None = "127.0.0.1:9400"
    log_dir: Path | None = Path(DEFAULT_LOG_DIR)
    job_id: str = ""
    host: str = ""
    power_window_s: float = 10.0
    stale_after_s: float = 300.0
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> AgentConfig:
        """Defaults, then ``env`` (default ``os.environ``), then non-None ``overrides``
        (``token_file=`` names a file holding the token).

        Raises:
            ConfigError: a variable or override is malformed.
        """
        import socket

        env = os.environ if env is None else env
        kw: dict = {"host": env.get(ENV_HOST) or socket.gethostname()}
        for name, key in ((ENV_AGENT_FAST_INTERVAL_S, "fast_interval_s"),
                          (ENV_AGENT_SLOW_INTERVAL_S, "slow_interval_s"),
                          (ENV_AGENT_LOGS_INTERVAL_S, "logs_interval_s"),
                          (ENV_AGENT_EXPORT_INTERVAL_S, "export_interval_s"),
                          (ENV_AGENT_POWER_WINDOW_S, "power_window_s")):
            if env.get(name):
                kw[key] = _parse_pos(name, env[name], float)
        if env.get(ENV_LOG_DIR):
            kw["log_dir"] = Path(env[ENV_LOG_DIR])
        if env.get(ENV_JOB_ID):
            kw["job_id"] = env[ENV_JOB_ID]
        if env.get(ENV_AGENT_PROMETHEUS):
            kw["prometheus_listen"] = env[ENV_AGENT_PROMETHEUS]
        if env.get(ENV_OTLP_METRICS_ENDPOINT):
            kw["otlp_endpoint"] = env[ENV_OTLP_METRICS_ENDPOINT]
        elif env.get(ENV_OTLP_ENDPOINT):
            kw["otlp_endpoint"] = env[ENV_OTLP_ENDPOINT].rstrip("/") + "/v1/metrics"
        if env.get(ENV_OTLP_HEADERS):
            kw["otlp_headers"] = parse_headers(ENV_OTLP_HEADERS, env[ENV_OTLP_HEADERS])
        token_file = overrides.pop("token_file", None)
        token = read_secret(env, file=token_file, value_var=ENV_AGENT_TOKEN,
                            file_var=ENV_AGENT_TOKEN_FILE)
        if token is not None:
            kw["token"] = token
        kw.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(kw) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown agent option(s): {', '.join(sorted(unknown))}")
        if kw.get("prometheus_listen") in ("off", "none", ""):
            kw["prometheus_listen"] = None
        if isinstance(kw.get("log_dir"), str):
            kw["log_dir"] = None if kw["log_dir"] in ("off", "none") else Path(kw["log_dir"])
        cfg = cls(**kw)
        for key in ("fast_interval_s", "slow_interval_s", "logs_interval_s",
                    "export_interval_s", "power_window_s", "stale_after_s"):
            if getattr(cfg, key) <= 0:
                raise ConfigError(f"{key} must be > 0")
        if cfg.prometheus_listen is not None:
            from ringwatch._net import parse_listen

            parse_listen(cfg.prometheus_listen)
        return cfg


def read_secret(env: Mapping[str, str] | None = None, *, file: str | Path | None = None,
                value_var: str, file_var: str) -> str | None:
    """A bearer token from a file or the environment, never from argv: ``file`` (a
    ``--token-file`` flag), else the file named by ``env[file_var]``, else
    ``env[value_var]``; None when none is given. Surrounding whitespace (a file's trailing
    newline) is dropped.

    Raises:
        ConfigError: The file cannot be read, or the token is empty or holds a character
            that cannot travel in an HTTP header (outside printable ASCII, or a space).
    """
    env = os.environ if env is None else env
    path = file if file is not None else env.get(file_var) or None
    if path is not None:
        try:
            raw = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {path}: "
                              f"{exc.strerror or exc}") from None
        where = f"token file {path}"
    elif env.get(value_var):
        raw, where = env[value_var], value_var
    else:
        return None
    token = raw.strip()
    if not token or not all(33 <= ord(c) <= 126 for c in token):
        raise ConfigError(f"{where}: a token is one word of printable ASCII")
    return token


def parse_headers(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    """``key=value,key=value`` (OpenTelemetry's header syntax, values URL-encoded).

    Raises:
        ConfigError: an item has no ``=``.
    """
    from urllib.parse import unquote

    out = []
    for item in filter(None, (x.strip() for x in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{name}: {item!r} is not key=value")
        out.append((key.strip().lower(), unquote(value.strip())))
    return tuple(out)
