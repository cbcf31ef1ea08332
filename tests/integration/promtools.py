"""Helpers for tests that check metrics with a real Prometheus (the Debian package ``prometheus``).

* ``promtool_check_metrics(text)`` lints exposition text with ``promtool check metrics``.
* ``running_prometheus(targets, tmp_path=...)`` starts a private ``/usr/bin/prometheus`` on a free
  127.0.0.1 port (never 9090, where a system one may run) that scrapes ``targets`` as the job
  ``ringwatch``, and stops it on exit.
* ``require_prometheus()`` fails (never skips) a test where either binary is missing: tests that
  need a real Prometheus run in CI, which installs the package.
* ``running_alertmanager(config, tmp_path=...)`` starts a private Alertmanager (the Debian
  package ``prometheus-alertmanager``) on a free 127.0.0.1 port, clustering off, and stops it on
  exit; ``require_alertmanager()`` fails a test where it or ``amtool`` is missing.
* ``running_webhook()`` is a webhook receiver on 127.0.0.1 that keeps every notification
  Alertmanager posts to it.

Only the standard library talks to Prometheus and Alertmanager; proxies from the environment
are ignored, since everything is on the loopback.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "promtool"  # looked up on PATH (the package puts it in /usr/bin)
INSTALL_HINT = "install the Debian package prometheus (.ci/run does)"
JOB = "ringwatch"
SYSTEM_PORT = 9090  # a Prometheus installed as a service listens here: never ours

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
# Loopback only: a proxy from the environment (http_proxy, ...) must never see these requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def require_prometheus() -> None:
    """Fail the calling test (never skip it) if ``/usr/bin/prometheus`` or ``promtool`` is
    missing."""
    missing = []
    if not os.access(PROMETHEUS, os.X_OK):
        missing.append(PROMETHEUS)
    if shutil.which(PROMTOOL) is None:
        missing.append(PROMTOOL)
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: {INSTALL_HINT}", pytrace=False)


def promtool_check_metrics(text: str) -> tuple[bool, str]:
    """Lint Prometheus exposition ``text`` with ``promtool check metrics``: ``(ok, output)``.

    promtool prints nothing when the text is clean. Each lint problem is one line on stderr,
    ``<metric> <problem>`` (``foo no help text``, ``foo counter metrics should have "_total"
    suffix``, ...) and the exit status is 3; text it cannot parse gives ``error while linting:
    ...`` and status 1. (So does promtool 2.42 here, and so does the 3.x source; the lint
    warnings that exit 0 are those of ``check rules`` and ``check config`` without
    ``--lint-fatal``.) The status alone is not trusted all the same:
    ``ok`` is True only if it is 0 AND promtool printed nothing at all (without ``--extended``
    it writes nothing to stdout, so every line it prints is a problem). ``output`` is stdout
    and stderr together, stripped.
    """
    require_prometheus()
    p = subprocess.run([shutil.which(PROMTOOL) or PROMTOOL, "check", "metrics"], input=text,
                       capture_output=True, text=True, timeout=60)
    output = (p.stdout + p.stderr).strip()
    return p.returncode == 0 and not output, output


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now (never ``SYSTEM_PORT``)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != SYSTEM_PORT:
            return port


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (even by SIGKILL), so that no
    server outlives a killed test run (Linux; elsewhere a no-op). Strictly, when the thread that
    started it ends: start servers from the test's own thread, not a short-lived one."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _merge(config: dict, extra: dict) -> dict:
    """``extra`` merged into ``config``: dicts are updated (one level), lists extended, other
    values replaced."""
    for key, value in extra.items():
        old = config.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            config[key] = {**old, **value}
        elif isinstance(old, list) and isinstance(value, list):
            config[key] = old + value
        else:
            config[key] = value
    return config


class _Server:
    """A server process started by a test: its HTTP requests, log, readiness and stop."""

    NAME = "server"

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path, config_path: Path):
        self.proc = proc
        self.url = url
        self.log_path = log_path
        self.config_path = config_path

    def _request(self, path: str, *, method: str = "GET", timeout: float = 10) -> bytes:
        req = urllib.request.Request(self.url + path, method=method)
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise RuntimeError(f"{method} {path}: HTTP {e.code}: {body}") from None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.NAME} exited with status {self.proc.returncode}; "
                               f"its log:\n{self.log()}")

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self._request("/-/ready", timeout=2)
                return
            except (OSError, RuntimeError) as e:
                last = str(e)
            time.sleep(0.1)
        raise RuntimeError(f"{self.NAME} at {self.url} not ready after {timeout_s} s ({last}); "
                           f"its log:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 10 s, and reap."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


class Prometheus(_Server):
    """A running Prometheus (see ``running_prometheus``)."""

    NAME = "prometheus"

    # -- HTTP API -----------------------------------------------------------------------------

    def _api(self, path: str, **params: str) -> dict | list:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        doc = json.loads(self._request(f"/api/v1/{path}{query}"))
        if doc.get("status") != "success":
            raise RuntimeError(f"/api/v1/{path} {params}: {doc}")
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query: ``data.result`` (``[{"metric": {...}, "value": [ts, "1"]}, ...]`` for a
        vector). A bad expression raises RuntimeError with Prometheus's error."""
        return self._api("query", query=expr)["result"]

    def wait_for(self, expr: str, timeout_s: float = 30) -> list[dict]:
        """Poll ``query(expr)`` until its result is non-empty and return it; AssertionError with
        the targets' state (and their last scrape error) after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() >= deadline:
                break
            self._check_alive()
            time.sleep(0.2)
        targets = [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
                   for t in self.targets()]
        raise AssertionError(f"Prometheus {self.url}: {expr!r} still empty after {timeout_s} s;"
                             f" targets: {targets}")

    def targets(self) -> list[dict]:
        """``activeTargets`` of ``/api/v1/targets`` (``labels``, ``scrapeUrl``, ``health``:
        "up"/"down"/"unknown", ``lastError``, ...)."""
        return self._api("targets", state="active")["activeTargets"]

    def reload(self) -> None:
        """Re-read the configuration file (after editing ``config_path``)."""
        self._request("/-/reload", method="POST")


@contextlib.contextmanager
def running_prometheus(targets: list[str], *, scrape_interval_s: float = 1.0, tmp_path: Path,
                       extra_config: dict | None = None,
                       rule_files: list[Path] | None = None) -> Iterator[Prometheus]:
    """A private Prometheus scraping ``targets`` (``"127.0.0.1:9400"``, ...) as job
    ``ringwatch`` every ``scrape_interval_s`` (also the scrape timeout and the rule evaluation
    interval), listening on a free 127.0.0.1 port with the lifecycle API on.

    Its config (``prometheus.yml``, JSON, which is YAML), data and log (``prometheus.log``) go
    in a fresh folder under ``tmp_path``. ``extra_config`` is merged into the top level of the
    config: dicts (``global``) are updated one level deep, lists (``scrape_configs``, ...) are
    extended. ``rule_files`` are loaded as ``rule_files``. Yields a ``Prometheus`` once
    ``/-/ready`` answers (RuntimeError with the server's log if that takes over 30 s or the
    server exits); on exit the server gets SIGTERM, then SIGKILL after 10 s, and is reaped.

    Timing (2.42): ready about 0.1 s after the start, but the first samples come about 5 s
    after it, whatever ``scrape_interval_s``: Prometheus hands discovered targets (static ones
    too) to the scraper on a fixed 5 s tick. Share one server between tests where you can.
    """
    require_prometheus()
    interval = _duration(scrape_interval_s)
    config: dict = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval,
                   "evaluation_interval": interval},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(targets)}]}],
    }
    if rule_files:
        config["rule_files"] = [str(Path(f).resolve()) for f in rule_files]
    if extra_config:
        _merge(config, extra_config)

    base = Path(tmp_path) / f"prometheus-{time.monotonic_ns()}"
    base.mkdir(parents=True)
    config_path = base / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    log_path = base / "prometheus.log"

    prom = None
    for _attempt in range(3):  # the free port may be taken between the probe and the bind
        port = free_port()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config_path}",
                 f"--storage.tsdb.path={base / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
                cwd=base, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)
        prom = Prometheus(proc, f"http://127.0.0.1:{port}", log_path, config_path)
        try:
            prom._wait_ready(_START_TIMEOUT_S)
            break
        except RuntimeError:
            prom.stop()
            if "address already in use" not in prom.log():
                raise
    else:
        raise RuntimeError(f"prometheus found no free port; its log:\n{prom.log()}")
    try:
        yield prom
    finally:
        prom.stop()


def samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of the series of metric ``name`` in exposition ``text`` that carry ``labels``."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


# --- Alertmanager ------------------------------------------------------------------------------

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
AMTOOL = "amtool"  # looked up on PATH (the same package puts it in /usr/bin)
AM_INSTALL_HINT = "install the Debian package prometheus-alertmanager (tests/tools/require.sh does)"


def require_alertmanager() -> None:
    """Fail the calling test (never skip it) if ``/usr/bin/prometheus-alertmanager`` or
    ``amtool`` is missing."""
    missing = []
    if not os.access(ALERTMANAGER, os.X_OK):
        missing.append(ALERTMANAGER)
    if shutil.which(AMTOOL) is None:
        missing.append(AMTOOL)
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: {AM_INSTALL_HINT}", pytrace=False)


class Alertmanager(_Server):
    """A running Alertmanager (see ``running_alertmanager``); ``address`` is its
    ``127.0.0.1:<port>``, what Prometheus's ``alerting`` section names."""

    NAME = "alertmanager"

    def __init__(self, proc: subprocess.Popen, address: str, log_path: Path, config_path: Path):
        super().__init__(proc, f"http://{address}", log_path, config_path)
        self.address = address

    def alerts(self) -> list[dict]:
        """The alerts it holds (``/api/v2/alerts``: ``labels``, ``annotations``, ``status``,
        ...), active, silenced and inhibited."""
        return json.loads(self._request("/api/v2/alerts"))


@contextlib.contextmanager
def running_alertmanager(config: dict, *, tmp_path: Path) -> Iterator[Alertmanager]:
    """A private Alertmanager with ``config`` (a dict: written as JSON, which is YAML),
    listening on a free 127.0.0.1 port, with its own storage folder under ``tmp_path`` and
    clustering off (``--cluster.listen-address=``: no gossip port on 0.0.0.0:9094, which two
    instances would fight over). Yields an ``Alertmanager`` once ``/-/ready`` answers
    (RuntimeError with its log if that takes over 30 s or it exits); on exit it gets SIGTERM,
    then SIGKILL after 10 s, and is reaped."""
    require_alertmanager()
    base = Path(tmp_path) / f"alertmanager-{time.monotonic_ns()}"
    base.mkdir(parents=True)
    config_path = base / "alertmanager.yml"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    log_path = base / "alertmanager.log"
    am = None
    for _attempt in range(3):  # the free port may be taken between the probe and the bind
        address = f"127.0.0.1:{free_port()}"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [ALERTMANAGER, f"--config.file={config_path}",
                 f"--storage.path={base / 'data'}", f"--web.listen-address={address}",
                 "--cluster.listen-address="],
                cwd=base, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)
        am = Alertmanager(proc, address, log_path, config_path)
        try:
            am._wait_ready(_START_TIMEOUT_S)
            break
        except RuntimeError:
            am.stop()
            if "address already in use" not in am.log():
                raise
    else:
        raise RuntimeError(f"alertmanager found no free port; its log:\n{am.log()}")
    try:
        yield am
    finally:
        am.stop()


class Webhook:
    """What a ``running_webhook()`` received: ``notifications()`` are ``(path, payload)``
    pairs, in the order they came (the payload is Alertmanager's webhook JSON: ``receiver``,
    ``status``, ``alerts``, ``groupLabels``, ...)."""

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.Lock()
        self._received: list[tuple[str, dict]] = []

    def _add(self, path: str, payload: dict) -> None:
        with self._lock:
            self._received.append((path, payload))

    def notifications(self) -> list[tuple[str, dict]]:
        with self._lock:
            return list(self._received)

    def alerts(self) -> list[tuple[str, dict]]:
        """Every alert of every notification, as ``(path, alert)``."""
        return [(path, a) for path, n in self.notifications() for a in n.get("alerts", [])]


@contextlib.contextmanager
def running_webhook() -> Iterator[Webhook]:
    """A webhook receiver on a free 127.0.0.1 port: every POST's JSON body is kept with its
    path and answered 200 (a body that is not JSON is kept as ``{"unparsed": text}``). Yields a
    ``Webhook`` whose ``url`` is ``http://127.0.0.1:<port>``; stopped on exit."""
    holder: dict[str, Webhook] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                payload = json.loads(body)
            except ValueError:
                payload = {"unparsed": body.decode(errors="replace")}
            holder["hook"]._add(self.path, payload)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook = holder["hook"] = Webhook(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
