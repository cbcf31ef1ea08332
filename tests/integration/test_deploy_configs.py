"""The deployment configs under deploy/: Prometheus scrape config and alerting rules (checked
and exercised with promtool: deploy/prometheus/tests/*.yml hold a case where each alert fires
and one where it does not), the runbook of every alert (docs/runbooks.md), the Alertmanager
config (checked with amtool), and the OpenTelemetry Collector gateway config (no collector
binary here: checked against the metric table as text).

promtool and amtool run from the repository root with the paths relative to it, as a person
would run them; the config names its rule file relative to its own folder, and the rule tests
theirs relative to theirs, which promtool resolves.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from ringwatch._metrics import METRICS, POINT_LABELS, RESOURCE_LABELS
from ringwatch.service._api import SERVICE_METRICS

from promtools import AMTOOL, PROMTOOL, require_alertmanager, require_prometheus

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "alerts.yml"
CONFIG = PROM_DIR / "prometheus.yml"
RULE_TESTS = PROM_DIR / "tests"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
GATEWAY = ROOT / "deploy" / "otelcol" / "agent-gateway.yaml"


def promtool(*args: str, cwd: Path = ROOT) -> tuple[int, str]:
    require_prometheus()
    p = subprocess.run([shutil.which(PROMTOOL) or PROMTOOL, *args], cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    return p.returncode, (p.stdout + p.stderr).strip()


def uncommented(path: Path) -> str:
    """The file without its comment lines (names quoted in comments are not uses)."""
    return "\n".join(ln for ln in path.read_text().splitlines()
                     if not ln.lstrip().startswith("#"))


# --- Prometheus ---------------------------------------------------------------------------

def test_promtool_check_rules_is_clean():
    rc, out = promtool("check", "rules", "--lint=all", "--lint-fatal",
                       str(RULES.relative_to(ROOT)))
    assert rc == 0, out
    assert "SUCCESS" in out and "WARNING" not in out, out


def test_promtool_check_config_is_clean():
    rc, out = promtool("check", "config", "--lint=all", "--lint-fatal",
                       str(CONFIG.relative_to(ROOT)))
    assert rc == 0, out
    # The rule file is found through the config (relative to the config's folder).
    assert "1 rule files found" in out, out
    assert "WARNING" not in out, out


def test_rules_use_only_exported_metric_names():
    agent = {m.prom: m for m in METRICS}
    used = set(re.findall(r"\bringwatch_[a-z0-9_]*[a-z0-9]\b", uncommented(RULES)))
    assert used, "no ringwatch_* metric in the rules"
    unknown = sorted(n for n in used if n not in agent and n not in SERVICE_METRICS)
    assert not unknown, f"not exported by the agent (ringwatch/_metrics.py) nor the service " \
                        f"(SERVICE_METRICS): {unknown}"
    otlp_only = sorted(n for n in used if n in agent and agent[n].otlp_only)
    assert not otlp_only, f"OTLP-only (never in Prometheus): {otlp_only}"
    # The brief's series are all covered.
    for name in ("ringwatch_hang_suspect", "ringwatch_straggler_suspect",
                 "ringwatch_link_suspect", "ringwatch_serve_analysis_lag_seconds",
                 "ringwatch_agent_errors_total", "ringwatch_gpu_xid_events_total",
                 "ringwatch_gpu_ecc_errors_total", "ringwatch_gpu_power_average_watts",
                 "ringwatch_gpu_power_limit_watts", "ringwatch_gpu_throttle_seconds_total",
                 "ringwatch_gpu_info", "ringwatch_gpu_samples_total",
                 "ringwatch_agent_cpu_seconds_total", "ringwatch_serve_analysis_rounds_total",
                 "ringwatch_serve_analysis_errors_total", "ringwatch_serve_rejected_points_total",
                 "ringwatch_serve_connections_refused_total"):
        assert name in used, name


# --- alert rules: conventions, runbooks, `promtool test rules` ---------------------------------

SEVERITIES = ("critical", "warning", "info")
ANNOTATIONS = {"summary", "description", "runbook_url"}


def alert_rules(path: Path = RULES) -> dict[str, dict]:
    """Every alerting rule of ``path``, by name (recording rules have none)."""
    out: dict[str, dict] = {}
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] not in out, f"alert {rule['alert']} defined twice"
                out[rule["alert"]] = rule
    return out


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bringwatch_[a-z0-9_]*[a-z0-9]\b|\bup\b", expr))


def rule_test_cases(files: list[Path]) -> list[dict]:
    """Every ``alert_rule_test`` case of the ``promtool test rules`` files, each with the
    metric names of its test group's input series (``inputs``) and its file."""
    cases = []
    for f in files:
        for group in yaml.safe_load(f.read_text()).get("tests") or []:
            inputs = {re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", s["series"]).group(1)
                      for s in group.get("input_series") or []}
            for case in group.get("alert_rule_test") or []:
                cases.append({**case, "inputs": inputs, "file": f.name})
    return cases


def missing_rule_tests(rules: dict[str, dict], cases: list[dict]) -> list[str]:
    """What each alert lacks: a case where it fires (``exp_alerts`` not empty), and a case where
    it does not (``exp_alerts`` empty) over input series its expression reads: a quiet case
    with none of its inputs would prove nothing."""
    problems = []
    for name, rule in sorted(rules.items()):
        mine = [c for c in cases if c.get("alertname") == name]
        if not any(c.get("exp_alerts") for c in mine):
            problems.append(f"{name}: no case where it fires")
        reads = metric_names_in(rule["expr"])
        if not any(not c.get("exp_alerts") and c["inputs"] & reads for c in mine):
            problems.append(f"{name}: no case where it does not fire over its own inputs "
                            f"({', '.join(sorted(reads))})")
    unknown = sorted({c.get("alertname") for c in cases} - set(rules))
    problems += [f"{n}: tested but not in alerts.yml" for n in unknown]
    return problems


def test_alerts_follow_the_mixin_conventions():
    rules = alert_rules()
    assert len(rules) >= 15, sorted(rules)
    for name, rule in rules.items():
        assert re.fullmatch(r"Ringwatch[A-Z][A-Za-z]+", name), name
        assert rule.get("labels", {}).get("severity") in SEVERITIES, (name, rule.get("labels"))
        assert set(rule.get("annotations", {})) == ANNOTATIONS, (name, rule.get("annotations"))
        assert rule["annotations"]["runbook_url"] == f"docs/runbooks.md#{name.lower()}", name
    # the brief's classes of alert, each at its severity
    expected = {
        "RingwatchHang": "critical", "RingwatchStraggler": "warning",
        "RingwatchSlowLink": "warning", "RingwatchGpuXidCritical": "critical",
        "RingwatchGpuXid": "info", "RingwatchGpuEccUncorrected": "critical",
        "RingwatchGpuFellOffBus": "critical", "RingwatchGpuThrottling": "warning",
        "RingwatchAgentsAbsent": "critical", "RingwatchServeAbsent": "critical",
        "RingwatchServeAnalysisErrors": "warning", "RingwatchAnalysisLag": "warning",
        "RingwatchServeRejectedPoints": "warning",
        "RingwatchServeConnectionsRefused": "warning",
    }
    got = {n: rules[n]["labels"]["severity"] for n in expected if n in rules}
    assert got == expected
    # the absent() guards of the findings and of the agents' series
    assert rules["RingwatchServeAbsent"]["expr"].strip() == \
        "absent(ringwatch_serve_analysis_rounds_total)"
    assert rules["RingwatchAgentsAbsent"]["expr"].strip() == \
        "absent(ringwatch_agent_cpu_seconds_total)"


def _runbook_sections() -> dict[str, str]:
    text = RUNBOOKS.read_text()
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_alert_has_its_runbook_section():
    rules = alert_rules()
    sections = _runbook_sections()
    assert set(sections) == set(rules), (set(rules) ^ set(sections))
    for name, body in sections.items():
        # GitHub's anchor of "## RingwatchHang" is #ringwatchhang: the rule's runbook_url
        assert re.fullmatch(r"[A-Za-z]+", name), name
        for part in ("**Meaning.**", "**Confirm.**", "**Act.**"):
            assert part in body, f"{name}: no {part}"
        confirm = body[body.index("**Confirm.**"):body.index("**Act.**")]
        assert re.search(r"\bringwatch (status|analyze|logs|agent|probe)\b", confirm), \
            f"{name}: no ringwatch command to confirm it"
    # the summary table lists every alert once, at its severity
    table = dict(re.findall(r"^\| \[(Ringwatch\w+)\]\(#\w+\) \| (\w+) \|", RUNBOOKS.read_text(),
                            flags=re.M))
    assert table == {n: r["labels"]["severity"] for n, r in rules.items()}


def test_promtool_rule_tests_pass():
    files = sorted(RULE_TESTS.glob("*.yml"))
    assert files, RULE_TESTS
    rc, out = promtool("test", "rules", *(str(f.relative_to(ROOT)) for f in files))
    assert rc == 0, out
    assert out.count("SUCCESS") == len(files) and "FAILED" not in out, out


def test_every_alert_has_a_firing_and_a_quiet_case():
    problems = missing_rule_tests(alert_rules(), rule_test_cases(sorted(RULE_TESTS.glob("*.yml"))))
    assert not problems, "\n".join(problems)


def test_the_coverage_check_catches_an_untested_alert(tmp_path):
    rules = alert_rules()
    cases = rule_test_cases(sorted(RULE_TESTS.glob("*.yml")))
    new = {"RingwatchNew": {"alert": "RingwatchNew", "expr": "ringwatch_serve_jobs > 100"}}
    assert missing_rule_tests({**rules, **new}, cases) == ["RingwatchNew: no case where it fires",
                                                          "RingwatchNew: no case where it does "
                                                          "not fire over its own inputs "
                                                          "(ringwatch_serve_jobs)"]
    # a quiet case over inputs the expression does not read does not count
    hang = [c for c in cases if c["alertname"] == "RingwatchHang"]
    blind = [{**c, "inputs": {"up"}} if not c["exp_alerts"] else c for c in hang]
    assert missing_rule_tests({"RingwatchHang": rules["RingwatchHang"]}, blind) == [
        "RingwatchHang: no case where it does not fire over its own inputs "
        "(ringwatch_hang_suspect, ringwatch_serve_analysis_lag_seconds)"]
    firing_only = [c for c in hang if c["exp_alerts"]]
    assert missing_rule_tests({"RingwatchHang": rules["RingwatchHang"]}, firing_only)


# A healthy fleet, as Prometheus would hold it, for 40 minutes (one sample every 15 s): one
# serve instance analysing a live job j1, two nodes whose agents report two GPUs each, a rank
# per GPU. Every alert's input is there, at healthy values, except the series that only exist
# when something is wrong (open findings, XIDs, agent errors).
_SERVE = 'job="ringwatch-serve",instance="serve-0:9410"'
HEALTHY = {
    f"ringwatch_serve_analysis_rounds_total{{{_SERVE}}}": "0+15x160",
    f"ringwatch_serve_analysis_errors_total{{{_SERVE}}}": "0x160",
    f"ringwatch_serve_rejected_points_total{{{_SERVE}}}": "0x160",
    f'ringwatch_serve_connections_refused_total{{{_SERVE},server="otlp_http"}}': "0x160",
    f'ringwatch_serve_connections_refused_total{{{_SERVE},server="api"}}': "0x160",
    f"up{{{_SERVE}}}": "1x160",
    'ringwatch_serve_analysis_lag_seconds{job="j1",instance="serve-0:9410"}': "0.8x160",
}
for _h in ("h1", "h2"):
    _inst = f'instance="{_h}:9400"'
    HEALTHY[f'up{{job="ringwatch-agent",{_inst}}}'] = "1x160"
    HEALTHY[f'ringwatch_agent_cpu_seconds_total{{job="j1",host="{_h}",{_inst}}}'] = "0+0.1x160"
    for _g in ("0", "1"):
        _rank = str(2 * int(_h[1]) - 2 + int(_g))
        _gpu = f'job="j1",rank="{_rank}",host="{_h}",gpu="{_g}",uuid="GPU-{_h}-{_g}",{_inst}'
        HEALTHY[f'ringwatch_gpu_info{{{_gpu},pci_bus_id="0000:1{_g}:00.0"}}'] = "1x160"
        HEALTHY[f"ringwatch_gpu_samples_total{{{_gpu}}}"] = "0+300x160"
        HEALTHY[f'ringwatch_gpu_ecc_errors_total{{{_gpu},type="ecc_uncorrected"}}'] = "0x160"
        HEALTHY[f'ringwatch_gpu_ecc_errors_total{{{_gpu},type="ecc_corrected"}}'] = "0+1x160"
        HEALTHY[f"ringwatch_gpu_row_remap_pending{{{_gpu}}}"] = "0x160"
        HEALTHY[f"ringwatch_gpu_row_remap_failed{{{_gpu}}}"] = "0x160"
        HEALTHY[f"ringwatch_gpu_power_average_watts{{{_gpu}}}"] = "560x160"
        HEALTHY[f'ringwatch_gpu_power_limit_watts{{{_gpu},kind="enforced"}}'] = "700x160"
        HEALTHY[f'ringwatch_gpu_power_limit_watts{{{_gpu},kind="default"}}'] = "700x160"
        for _reason, _per_step in (("power", "0.6"), ("thermal", "0"),
                                   ("low_utilization", "0.2")):
            HEALTHY[f'ringwatch_gpu_throttle_seconds_total{{{_gpu},reason="{_reason}"}}'] = \
                f"0+{_per_step}x160"
        HEALTHY[f'ringwatch_rank_log_age_seconds{{job="j1",rank="{_rank}",host="{_h}",'
                f'{_inst}}}'] = "1x160"
#: Series that exist only when something is wrong.
ONLY_WHEN_WRONG = {"ringwatch_hang_suspect", "ringwatch_straggler_suspect",
                   "ringwatch_link_suspect", "ringwatch_gpu_xid_events_total",
                   "ringwatch_agent_errors_total"}


def test_a_healthy_fleet_fires_nothing(tmp_path):
    rules = alert_rules()
    read = set().union(*(metric_names_in(r["expr"]) for r in rules.values()))
    given = {re.match(r"[a-z_]+", s).group(0) for s in HEALTHY}
    # every series an alert reads is in the healthy fleet, or only exists when things go wrong
    assert read - given == ONLY_WHEN_WRONG, read - given
    times = ["15s", "1m", "5m", "10m", "15m", "20m", "30m", "39m"]
    spec = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [{"series": s, "values": v} for s, v in HEALTHY.items()],
            # nothing firing, nothing even pending
            "promql_expr_test": [{"expr": "ALERTS", "eval_time": t, "exp_samples": []}
                                 for t in times],
        }],
    }
    path = tmp_path / "healthy_test.json"  # JSON is YAML: promtool reads it as is
    path.write_text(json.dumps(spec, indent=1))
    rc, out = promtool("test", "rules", str(path))
    assert rc == 0, out
    assert "SUCCESS" in out, out
    # ...and the same fleet with one GPU lost at minute 20 does fire: the check can fail
    lost = 'ringwatch_gpu_samples_total{job="j1",rank="1",host="h1",gpu="1",uuid="GPU-h1-1",' \
           'instance="h1:9400"}'
    assert lost in HEALTHY
    spec["tests"][0]["input_series"] = [
        {"series": s, "values": "0+300x80 24000x80" if s == lost else v}
        for s, v in HEALTHY.items()]
    path.write_text(json.dumps(spec, indent=1))
    rc, out = promtool("test", "rules", str(path))
    assert rc != 0 and 'alertname="RingwatchGpuFellOffBus"' in out, out


# --- Alertmanager --------------------------------------------------------------------------

def amtool(*args: str) -> tuple[int, str, str]:
    require_alertmanager()
    p = subprocess.run([shutil.which(AMTOOL) or AMTOOL, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    return p.returncode, p.stdout.strip(), p.stderr.strip()


def test_amtool_check_config_is_clean():
    rc, out, err = amtool("check-config", str(ALERTMANAGER_CONFIG.relative_to(ROOT)))
    assert rc == 0, out + err
    assert "SUCCESS" in out and "3 receivers" in out, out


def test_alertmanager_routes_by_severity_and_groups_by_job():
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert config["route"]["group_by"] == ["job"]
    used = {r["labels"]["severity"] for r in alert_rules().values()}
    assert used == set(SEVERITIES)
    cfg = f"--config.file={ALERTMANAGER_CONFIG.relative_to(ROOT)}"
    for severity in SEVERITIES:
        rc, out, err = amtool("config", "routes", "test", cfg, f"severity={severity}",
                              "job=j1", "alertname=RingwatchHang")
        assert rc == 0 and out == f"ringwatch-{severity}", (severity, out, err)
    # an alert without a severity is not dropped
    rc, out, err = amtool("config", "routes", "test", cfg, "alertname=Other")
    assert rc == 0 and out == "ringwatch-warning", (out, err)
    # every receiver is a webhook that reports resolutions of the alerts that page
    for receiver in config["receivers"]:
        assert set(receiver) == {"name", "webhook_configs"}, receiver
        assert [w["url"].rsplit("/", 1)[1] for w in receiver["webhook_configs"]] == \
            [receiver["name"]]


def test_alertmanager_inhibitions_name_real_alerts():
    names = set(alert_rules())
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert config.get("inhibit_rules")
    for rule in config["inhibit_rules"]:
        for key in ("source_matchers", "target_matchers"):
            for matcher in rule[key]:
                m = re.fullmatch(r'alertname(=~|=)"(.+)"', matcher)
                assert m, matcher
                op, value = m.groups()
                hits = {n for n in names if (re.fullmatch(value, n) if op == "=~"
                                             else n == value)}
                assert hits, f"{matcher} matches no alert of alerts.yml"
        # labels compared between source and target exist on the source alert's series
        for label in rule.get("equal", []):
            assert label in {"job", "host", "uuid", "gpu", "instance"}, label


# --- OpenTelemetry Collector gateway ---------------------------------------------------------

def test_otelcol_gateway_routes_by_job_and_keeps_step_stream_out_of_prometheus():
    assert GATEWAY.is_file()
    text = uncommented(GATEWAY)
    assert "\t" not in text, "YAML must be indented with spaces"
    # serve-bound: every data point of a job to one instance, keyed on the job id
    assert "  loadbalancing:" in text
    assert "routing_key: attributes" in text
    assert 'routing_attributes: ["ringwatch.job.id"]' in text
    assert "resolver:\n      dns:" in text
    # Prometheus-bound: the per-step stream is filtered out before remote write
    assert "'IsMatch(name, \"^ringwatch[.]step[.]\")'" in text
    assert "  prometheusremotewrite:" in text
    pipelines = text[text.index("  pipelines:"):]
    serve = pipelines[pipelines.index("metrics/serve:"):pipelines.index("metrics/prometheus:")]
    prom = pipelines[pipelines.index("metrics/prometheus:"):]
    assert "exporters: [loadbalancing]" in serve and "filter/drop_step_stream" not in serve
    assert "filter/drop_step_stream" in prom and "exporters: [prometheusremotewrite]" in prom
    assert prom.index("filter/drop_step_stream") < prom.index("transform/prometheus_names")


def test_otelcol_gateway_renames_every_series_to_its_prometheus_name():
    """The remote-written series must be the ones Prometheus scrapes from /metrics, or
    alerts.yml and dashboards would see two schemas: every metric of the table renamed,
    the step stream never, every label renamed to its /metrics name."""
    text = uncommented(GATEWAY)
    labels: set[str] = set()
    for m in METRICS:
        line = f"'set(name, \"{m.prom}\") where name == \"{m.otel}\"'"
        if m.otlp_only:
            assert f'"{m.otel}"' not in text, f"step stream {m.otel} must not be renamed"
            continue
        assert line in text, f"missing rename: {line}"
        labels |= set(m.labels) | {k for k, _ in dict(m.const_labels).items()}
        if m.key_label:
            labels.add(m.key_label)
    for prom, otel in [*RESOURCE_LABELS.items(), *((k, POINT_LABELS[k]) for k in labels)]:
        assert (f"'set(attributes[\"{prom}\"], attributes[\"{otel}\"]) "
                f"where attributes[\"{otel}\"] != nil'") in text, f"{otel} -> {prom}"
        assert f"'delete_key(attributes, \"{otel}\")'" in text, otel
    assert "add_metric_suffixes: false" in text
    assert "resource_to_telemetry_conversion:\n      enabled: true" in text

