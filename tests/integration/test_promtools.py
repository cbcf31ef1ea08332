"""The Prometheus harness (``promtools``) on a tiny real target: promtool's lint, and a real
Prometheus scraping a hand-written exposition text served on the loopback.

One Prometheus serves all the scraping tests (its first samples take about 5 s to come)."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time

import pytest

from promtools import (
    SYSTEM_PORT,
    free_port,
    promtool_check_metrics,
    require_prometheus,
    running_prometheus,
)

GOOD = """\
# HELP demo_requests_total Requests served.
# TYPE demo_requests_total counter
demo_requests_total{code="200"} 42
# HELP demo_temperature_celsius Temperature of the demo.
# TYPE demo_temperature_celsius gauge
demo_temperature_celsius 21.5
"""


@pytest.fixture(autouse=True)
def _prometheus_installed():
    require_prometheus()


@contextlib.contextmanager
def serving(text: str):
    """``text`` served as the exposition format at ``/metrics`` on 127.0.0.1; yields
    ``"127.0.0.1:<port>"``."""
    body = text.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/metrics":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def scraping(tmp_path_factory):
    """A Prometheus scraping ``GOOD`` (``target``) and a port nobody listens on (``dead``),
    with a recording rule and an external label; yields ``(prom, target, dead, timings)``."""
    require_prometheus()
    tmp = tmp_path_factory.mktemp("prometheus")
    rules = tmp / "rules.yml"
    rules.write_text('{"groups": [{"name": "demo", "rules": [{"record": "demo:requests:sum",'
                     ' "expr": "sum(demo_requests_total)"}]}]}\n')
    dead = f"127.0.0.1:{free_port()}"
    timings = {}
    t0 = time.monotonic()
    with serving(GOOD) as target, running_prometheus(
            [target, dead], tmp_path=tmp, rule_files=[rules],
            extra_config={"global": {"external_labels": {"cluster": "demo"}}}) as prom:
        timings["ready_s"] = time.monotonic() - t0
        prom.wait_for("demo_requests_total")
        timings["first_sample_s"] = time.monotonic() - t0
        yield prom, target, dead, timings
        t1 = time.monotonic()
    timings["stop_s"] = time.monotonic() - t1
    assert prom.proc.returncode is not None  # stopped and reaped
    print(f"\nprometheus: {timings}")


def test_promtool_passes_clean_text():
    ok, out = promtool_check_metrics(GOOD)
    assert ok, out
    assert out == ""


@pytest.mark.parametrize(("text", "problem"), [
    # a counter without the _total suffix
    ("# HELP demo_requests Requests.\n# TYPE demo_requests counter\ndemo_requests 1\n",
     'demo_requests counter metrics should have "_total" suffix'),
    # no HELP line
    ("# TYPE demo_requests_total counter\ndemo_requests_total 1\n",
     "demo_requests_total no help text"),
    # camelCase name
    ("# HELP demoRequests_total Requests.\n# TYPE demoRequests_total counter\n"
     "demoRequests_total 1\n", "metric names should be written in 'snake_case'"),
    # not the exposition format at all
    ('# HELP demo_x X.\n# TYPE demo_x gauge\ndemo_x{code= 1\n', "error while linting"),
])
def test_promtool_flags_lint_problems(text, problem):
    ok, out = promtool_check_metrics(text)
    assert not ok
    assert problem in out


def test_free_port_is_never_the_system_one():
    for _ in range(20):
        assert free_port() != SYSTEM_PORT


def test_prometheus_listens_on_the_loopback_only(scraping):
    prom, _, _, timings = scraping
    assert prom.url.startswith("http://127.0.0.1:")
    assert not prom.url.endswith(f":{SYSTEM_PORT}")
    assert timings["ready_s"] < 30


def test_prometheus_has_the_served_values(scraping):
    prom, target, _, _ = scraping
    result = prom.wait_for("demo_requests_total")
    assert len(result) == 1
    labels = result[0]["metric"]
    assert labels == {"__name__": "demo_requests_total", "code": "200", "job": "ringwatch",
                      "instance": target}
    assert float(result[0]["value"][1]) == 42

    gauge = prom.wait_for('demo_temperature_celsius{job="ringwatch"}')
    assert float(gauge[0]["value"][1]) == 21.5


def test_served_target_is_up_and_dead_one_down(scraping):
    prom, target, dead, _ = scraping
    assert prom.wait_for(f'up{{instance="{dead}"}} == 0')
    by_instance = {t["labels"]["instance"]: t for t in prom.targets()}
    assert set(by_instance) == {target, dead}
    up = by_instance[target]
    assert up["labels"]["job"] == "ringwatch"
    assert up["scrapeUrl"] == f"http://{target}/metrics"
    assert up["health"] == "up", up.get("lastError")
    assert float(prom.query(f'up{{instance="{target}"}}')[0]["value"][1]) == 1
    assert by_instance[dead]["health"] == "down"
    assert by_instance[dead]["lastError"]


def test_rule_files_and_extra_config(scraping):
    prom, _, _, _ = scraping
    assert float(prom.wait_for("demo:requests:sum")[0]["value"][1]) == 42
    assert '"cluster": "demo"' in prom.config_path.read_text()


def test_query_errors_and_wait_for_timeout(scraping):
    prom, _, _, _ = scraping
    with pytest.raises(RuntimeError, match="HTTP 400"):
        prom.query("sum(")
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="still empty.*scrapeUrl"):
        prom.wait_for("no_such_metric", timeout_s=0.5)
    assert time.monotonic() - t0 < 5


def test_a_bad_config_fails_fast_with_the_log(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with status") as e:
        with running_prometheus(["127.0.0.1:1"], tmp_path=tmp_path,
                                extra_config={"no_such_field": 1}):
            pass
    assert "no_such_field" in str(e.value)  # the server's own complaint, from its log
    assert time.monotonic() - t0 < 15


def test_missing_binaries_fail_rather_than_skip(monkeypatch):
    import promtools

    monkeypatch.setattr(promtools, "PROMETHEUS", "/nonexistent/prometheus")
    with pytest.raises(pytest.fail.Exception,
                       match=r"install the Debian package prometheus \(\.ci/run does\)"):
        require_prometheus()
    monkeypatch.undo()
    monkeypatch.setattr(promtools, "PROMTOOL", "no-such-promtool")
    with pytest.raises(pytest.fail.Exception, match="no-such-promtool not found"):
        promtool_check_metrics(GOOD)
