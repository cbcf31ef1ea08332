"""The alerts end to end: a real local-cluster run watched by a real `ringwatch agent` (serving
/metrics, two GPUs replayed from a synthetic recording) and a real `ringwatch serve`, both
scraped by a real Prometheus that evaluates deploy/prometheus/alerts.yml and sends to a real
Alertmanager run with deploy/alertmanager/alertmanager.yml, whose webhooks post to a receiver
on the loopback. A straggler reaches the webhook with its job, rank and severity; a healthy run
sends nothing. The cluster's 2 hosts are network namespaces when run as root, loopback labels
otherwise (`ringwatch cluster --netns auto`); both pass, so the tests never skip.

What differs from a deployment, and only in copies written for the test:

* alerts.yml: every ``for:`` is ``FOR_IN_TEST`` (15 s; 1 to 15 minutes as deployed), so that
  a straggler of a 90-step run fires while it lasts. Expressions, labels and annotations are
  the deployed ones. 15 s is also longer than a fresh Prometheus takes to scrape its targets
  the first time (about 5 s), so the absent() guards stay pending then, as they would.
* alertmanager.yml: each receiver's webhook URL is the local receiver's, at the receiver's
  name (``/ringwatch-warning``, ...), and the group timers are shortened (group_wait 1 s,
  group_interval 2 s). Routes, grouping and inhibitions are the deployed ones.
* Prometheus scrapes every second (``running_prometheus``) with the deployed jobs' names and
  ``honor_labels`` (deploy/prometheus/prometheus.yml), from static loopback targets.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml
from test_serve_live import Stack

from jobtools import job_env, ringwatch_cmd
from promtools import free_port, running_alertmanager, running_prometheus, running_webhook

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
FOR_IN_TEST = "15s"
# After a run: long enough for an alert whose condition held at the very end to go through
# `for:` (15 s), an evaluation (1 s) and Alertmanager's group_wait (1 s).
QUIET_AFTER_S = 25
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from env


def rules_for_test(tmp_path: Path) -> Path:
    """A copy of alerts.yml whose every ``for:`` is ``FOR_IN_TEST``."""
    text, n = re.subn(r"^(\s+for:) \S+$", rf"\1 {FOR_IN_TEST}", RULES.read_text(), flags=re.M)
    assert n >= 10, n  # the deployed rules wait before most alerts
    path = tmp_path / "alerts-test.yml"
    path.write_text(text)
    return path


def alertmanager_config(webhook_url: str) -> dict:
    """deploy/alertmanager/alertmanager.yml, its webhooks on ``webhook_url`` and its timers
    short."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for receiver in config["receivers"]:
        assert set(receiver) == {"name", "webhook_configs"}, receiver  # nothing leaves the host
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"{webhook_url}/{receiver['name']}"

    def shorten(route: dict, top: bool) -> None:
        for key, value in (("group_wait", "1s"), ("group_interval", "2s")):
            if top or key in route:
                route[key] = value
        for sub in route.get("routes", []):
            shorten(sub, False)

    shorten(config["route"], True)
    return config


class AlertStack(Stack):
    """The serve and agent of ``Stack``, the agent on a /metrics Prometheus can scrape and with
    two synthetic GPUs (so the GPU rules read real agent series too)."""

    def __init__(self, tmp_path, run_dir):
        super().__init__(tmp_path, run_dir)
        self.agent.terminate()  # Stack's own agent serves no /metrics
        self.agent.wait(15)
        self.agent_port = free_port()
        self.agent = subprocess.Popen(ringwatch_cmd(
            "agent", "--log-dir", str(run_dir / "logs"), "--prometheus",
            f"127.0.0.1:{self.agent_port}",
            "--otlp-endpoint", f"http://127.0.0.1:{self.otlp}/v1/metrics",
            "--export-interval-s", "1", "--logs-interval-s", "0.5", "--replay", "synthetic:2"),
            env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            self._wait_for_agent()
        except BaseException:
            self.stop()
            raise

    def _wait_for_agent(self) -> None:
        deadline = time.monotonic() + 60
        while True:  # up before Prometheus starts, so that its first scrape finds it
            try:
                with _LOOPBACK.open(f"http://127.0.0.1:{self.agent_port}/metrics",
                                    timeout=2) as r:
                    if b"ringwatch_agent_cpu_seconds_total" in r.read():
                        break
            except OSError:
                pass
            assert self.agent.poll() is None, "ringwatch agent exited"
            assert time.monotonic() < deadline, "ringwatch agent's /metrics did not come up"
            time.sleep(0.2)

    def scrape_configs(self) -> list[dict]:
        """The deployed scrape jobs' names and label handling, on static loopback targets."""
        return [{"job_name": "ringwatch-agent", "honor_labels": True,
                 "static_configs": [{"targets": [f"127.0.0.1:{self.agent_port}"]}]},
                {"job_name": "ringwatch-serve", "honor_labels": True,
                 "static_configs": [{"targets": [f"127.0.0.1:{self.api}"]}]}]


def _watching(stack: AlertStack, tmp_path: Path, alertmanager):
    """A Prometheus scraping the stack, evaluating the test's copy of the rules and sending to
    ``alertmanager``; returned once both targets have been scraped."""
    return running_prometheus(
        [], tmp_path=tmp_path, rule_files=[rules_for_test(tmp_path)],
        extra_config={"scrape_configs": stack.scrape_configs(),
                      "alerting": {"alertmanagers": [
                          {"static_configs": [{"targets": [alertmanager.address]}]}]}})


def _ready(prom) -> None:
    prom.wait_for('up{job="ringwatch-serve"} == 1')
    prom.wait_for('up{job="ringwatch-agent"} == 1')
    prom.wait_for("ringwatch_gpu_info")  # the GPU rules have their inputs
    assert prom._api("alertmanagers")["activeAlertmanagers"], "Prometheus knows no Alertmanager"


def _rules_healthy(prom) -> None:
    """Every rule evaluated on the real series without an error (a many-to-many match, ...)."""
    groups = prom._api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 15, rules
    bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") != "ok"]
    assert not bad, bad


def _wait_for_alert(webhook, status: str, timeout_s: float) -> list[tuple[str, dict]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = [(p, a) for p, a in webhook.alerts() if a["status"] == status]
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"no {status} alert at the webhook after {timeout_s} s: "
                         f"{webhook.notifications()}")


def test_a_straggler_reaches_the_webhook_with_its_job_rank_and_severity(tmp_path):
    with running_webhook() as webhook, \
            running_alertmanager(alertmanager_config(webhook.url), tmp_path=tmp_path) as am:
        stack = AlertStack(tmp_path, tmp_path / "run")
        try:
            with _watching(stack, tmp_path, am) as prom:
                _ready(prom)
                truth, _ = stack.run_cluster(
                    "--nproc", "4", "--hosts", "2", "--steps", "90", "--fault", "straggler",
                    "--straggler-mode", "work", "--at-step", "30", "--", "--step-sleep-ms", "60")
                firing = _wait_for_alert(webhook, "firing", 60)
                am_alerts = am.alerts()  # active there now, neither silenced nor inhibited
                _rules_healthy(prom)
                # the finding is resolved 30 s after the job's last step; so is the alert
                resolved = _wait_for_alert(webhook, "resolved", 90)
                fired = prom.query('count by (alertname) (max_over_time('
                                   'ALERTS{alertstate="firing"}[10m]))')
        finally:
            stack.stop()

    path, alert = firing[0]
    labels = alert["labels"]
    assert labels["alertname"] == "RingwatchStraggler", alert
    assert labels["job"] == truth["job_id"], (labels, truth)
    assert labels["rank"] == str(truth["rank"]) and labels["host"] == truth["host"], (labels,
                                                                                      truth)
    assert labels["severity"] == "warning" and labels["cls"] == "compute straggler", labels
    assert alert["annotations"]["runbook_url"] == "docs/runbooks.md#ringwatchstraggler"
    assert f"rank {truth['rank']}" in alert["annotations"]["summary"], alert
    # routed by severity, grouped by job
    assert path == "/ringwatch-warning", path
    note = next(n for p, n in webhook.notifications() if p == path)
    assert note["receiver"] == "ringwatch-warning" and note["groupLabels"] == {
        "job": truth["job_id"]}, note
    # the same alert, resolved; and nothing else ever fired
    assert [a["labels"] for _, a in resolved] == [labels], resolved
    assert {a["labels"]["alertname"] for _, a in webhook.alerts()} == {"RingwatchStraggler"}, \
        webhook.notifications()
    assert [r["metric"]["alertname"] for r in fired] == ["RingwatchStraggler"], fired
    assert [(a["labels"], a["status"]["state"]) for a in am_alerts] == [(labels, "active")], \
        am_alerts


def test_a_healthy_run_sends_nothing(tmp_path):
    with running_webhook() as webhook, \
            running_alertmanager(alertmanager_config(webhook.url), tmp_path=tmp_path) as am:
        stack = AlertStack(tmp_path, tmp_path / "run")
        try:
            with _watching(stack, tmp_path, am) as prom:
                _ready(prom)
                stack.run_cluster("--nproc", "4", "--hosts", "2", "--steps", "60",
                                  "--fault", "none", "--", "--step-sleep-ms", "40")
                time.sleep(QUIET_AFTER_S)
                _rules_healthy(prom)
                # the run was watched: its ranks, its job at the service, its GPUs
                job = prom.wait_for("ringwatch_serve_analysis_lag_seconds")[0]["metric"]["job"]
                assert prom.query(f'count(ringwatch_rank_step{{job="{job}"}})')[0]["value"][1] \
                    == "4"
                fired = prom.query('max_over_time(ALERTS{alertstate="firing"}[10m])')
        finally:
            stack.stop()
        am_alerts = am.alerts()
    assert stack.seen == {}, stack.seen  # serve found nothing either
    assert fired == [], fired
    assert webhook.notifications() == [], webhook.notifications()
    assert am_alerts == [], am_alerts
