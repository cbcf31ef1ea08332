"""The deployment configs under deploy/: Prometheus scrape config and alerting rules (checked
and exercised with promtool), and the OpenTelemetry Collector gateway config (no collector
binary here: checked against the metric table as text).

promtool runs from the repository root with the paths relative to it, as a person would run
it; the config names its rule file relative to its own folder, which promtool resolves.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from ringwatch._metrics import METRICS, POINT_LABELS, RESOURCE_LABELS
from ringwatch.service._api import SERVICE_METRICS

from promtools import PROMTOOL, require_prometheus

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "alerts.yml"
CONFIG = PROM_DIR / "prometheus.yml"
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
                 "ringwatch_gpu_power_limit_watts", "ringwatch_gpu_throttle_seconds_total"):
        assert name in used, name


# Input series for `promtool test rules`, one sample every 15 s for 15 minutes.
_SERVE = 'instance="serve-0:9410"'
_GPU0 = 'job="j1",rank="0",host="h1",gpu="0",uuid="GPU-0",instance="h1"'
SERIES = {
    # a live job j1 with a hang, a straggler, an imbalance (never alerted) and a slow link
    f'ringwatch_serve_analysis_lag_seconds{{job="j1",{_SERVE}}}': "2x60",
    f'ringwatch_hang_suspect{{job="j1",rank="3",host="h1",cls="never arrived",{_SERVE}}}':
        "0.9x60",
    f'ringwatch_straggler_suspect{{job="j1",rank="5",host="h2",cls="compute straggler",'
    f'{_SERVE}}}': "0.95x60",
    f'ringwatch_straggler_suspect{{job="j1",rank="6",host="h2",cls="structural imbalance",'
    f'{_SERVE}}}': "0.99x60",
    f'ringwatch_link_suspect{{job="j1",host="h4",{_SERVE}}}': "0.5x60",
    # a stale finding of a job this instance no longer analyses: no page
    f'ringwatch_serve_analysis_lag_seconds{{job="jold",{_SERVE}}}': "900x60",
    f'ringwatch_hang_suspect{{job="jold",rank="1",host="h9",cls="never arrived",{_SERVE}}}':
        "1x60",
    # j2 alive on the nodes but 45 s behind at the service; j3 ended long ago
    f'ringwatch_serve_analysis_lag_seconds{{job="j2",{_SERVE}}}': "45x60",
    'ringwatch_rank_log_age_seconds{job="j2",rank="0",host="h5",instance="h5"}': "2x60",
    f'ringwatch_serve_analysis_lag_seconds{{job="j3",{_SERVE}}}': "500x60",
    'ringwatch_rank_log_age_seconds{job="j3",rank="0",host="h6",instance="h6"}': "400x60",
    f"ringwatch_serve_analysis_errors_total{{{_SERVE}}}": "0x60",
    # agents: one failing its pushes from minute 5, one with old errors only, one down
    'ringwatch_agent_errors_total{host="h6",cause="otlp_export",instance="h6"}': "0x20 1+1x40",
    'ringwatch_agent_errors_total{host="h7",cause="nvml",instance="h7"}': "3x60",
    'up{job="ringwatch-agent",instance="h9:9400"}': "0x60",
    'up{job="ringwatch-agent",instance="h1:9400"}': "1x60",
    # XIDs: 79 and 13 first seen at minute 11 (series born then), 31 counted long ago
    'ringwatch_gpu_xid_events_total{job="j1",rank="3",host="h1",gpu="3",uuid="GPU-3",'
    'xid="79",instance="h1"}': "_x44 1x16",
    'ringwatch_gpu_xid_events_total{job="j1",rank="4",host="h1",gpu="4",uuid="GPU-4",'
    'xid="13",instance="h1"}': "_x44 1x16",
    'ringwatch_gpu_xid_events_total{job="j1",rank="2",host="h1",gpu="2",uuid="GPU-2",'
    'xid="31",instance="h1"}': "2x60",
    # ECC on an idle GPU (no job, no rank): one uncorrected at minute 10; corrected ones grow
    'ringwatch_gpu_ecc_errors_total{host="h8",gpu="0",uuid="GPU-h8-0",type="ecc_uncorrected",'
    'instance="h8"}': "0x40 1x20",
    'ringwatch_gpu_ecc_errors_total{host="h8",gpu="0",uuid="GPU-h8-0",type="ecc_corrected",'
    'instance="h8"}': "0+5x60",
    # GPU 0 at 98.6% of its enforced limit, GPU 1 at 71%
    f"ringwatch_gpu_power_average_watts{{{_GPU0}}}": "690x60",
    f'ringwatch_gpu_power_limit_watts{{{_GPU0},kind="enforced"}}': "700x60",
    f'ringwatch_gpu_power_limit_watts{{{_GPU0},kind="default"}}': "700x60",
    'ringwatch_gpu_power_average_watts{job="j1",rank="1",host="h1",gpu="1",uuid="GPU-1",'
    'instance="h1"}': "500x60",
    'ringwatch_gpu_power_limit_watts{job="j1",rank="1",host="h1",gpu="1",uuid="GPU-1",'
    'instance="h1",kind="enforced"}': "700x60",
    # GPU 0 held down by heat 20% of the time; idle time (low_utilization) is not alerted
    f'ringwatch_gpu_throttle_seconds_total{{{_GPU0},reason="thermal"}}': "0+3x60",
    f'ringwatch_gpu_throttle_seconds_total{{{_GPU0},reason="low_utilization"}}': "0+15x60",
}
_FIRING = ('count by (alertname, job, rank, host, gpu, xid, reason, cause) '
           '(ALERTS{alertstate="firing"})')


def _firing(*alerts: dict) -> list[dict]:
    return [{"labels": "{" + ",".join(f'{k}="{v}"' for k, v in sorted(a.items())) + "}",
             "value": 1} for a in alerts]


def test_alert_rules_fire_as_intended(tmp_path):
    at_30s = _firing(
        {"alertname": "RingwatchHang", "job": "j1", "rank": "3", "host": "h1"},
        # A counter Prometheus has seen for less than 10 minutes counts as new: right after
        # Prometheus starts, every XID series already counted alerts once.
        {"alertname": "RingwatchGpuXid", "job": "j1", "rank": "2", "host": "h1", "gpu": "2",
         "xid": "31"},
    )
    at_13m = _firing(
        {"alertname": "RingwatchHang", "job": "j1", "rank": "3", "host": "h1"},
        {"alertname": "RingwatchStraggler", "job": "j1", "rank": "5", "host": "h2"},
        {"alertname": "RingwatchSlowLink", "job": "j1", "host": "h4"},
        {"alertname": "RingwatchAnalysisLag", "job": "j2"},
        {"alertname": "RingwatchAgentErrors", "host": "h6", "cause": "otlp_export"},
        {"alertname": "RingwatchAgentDown", "job": "ringwatch-agent"},
        {"alertname": "RingwatchGpuXidCritical", "job": "j1", "rank": "3", "host": "h1",
         "gpu": "3", "xid": "79"},
        {"alertname": "RingwatchGpuXid", "job": "j1", "rank": "4", "host": "h1", "gpu": "4",
         "xid": "13"},
        {"alertname": "RingwatchGpuEccUncorrected", "host": "h8", "gpu": "0"},
        {"alertname": "RingwatchGpuPowerAtLimit", "job": "j1", "rank": "0", "host": "h1",
         "gpu": "0"},
        {"alertname": "RingwatchGpuThrottling", "job": "j1", "rank": "0", "host": "h1",
         "gpu": "0", "reason": "thermal"},
    )
    hang = {
        "eval_time": "13m", "alertname": "RingwatchHang",
        "exp_alerts": [{
            "exp_labels": {"severity": "page", "job": "j1", "rank": "3", "host": "h1",
                           "cls": "never arrived", "instance": "serve-0:9410"},
            "exp_annotations": {
                "summary": "Job j1 hangs on rank 3 (host h1)",
                "description": "ringwatch serve names rank 3 on host h1 as holding its process "
                               "group in a hang in job j1 (never arrived, confidence 0.90); the "
                               "other members wait in the collective. Evidence: `ringwatch "
                               "status --url http://serve-0:9410 --job j1`."}}]}
    ecc = {  # a GPU with no job and no rank: the optional parts of the text are left out
        "eval_time": "13m", "alertname": "RingwatchGpuEccUncorrected",
        "exp_alerts": [{
            "exp_labels": {"severity": "critical", "host": "h8", "gpu": "0",
                           "uuid": "GPU-h8-0", "type": "ecc_uncorrected", "instance": "h8"},
            "exp_annotations": {
                "summary": "Uncorrected ECC errors on GPU 0 of h8",
                "description": "GPU 0 (GPU-h8-0) on host h8, had 1 uncorrected ECC error(s) in "
                               "the last 10 minutes: the job's results on it may be corrupt and "
                               "the process has likely been killed."}}]}
    spec = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [{"series": s, "values": v} for s, v in SERIES.items()],
            "promql_expr_test": [{"expr": _FIRING, "eval_time": "30s", "exp_samples": at_30s},
                                 {"expr": _FIRING, "eval_time": "13m", "exp_samples": at_13m}],
            "alert_rule_test": [hang, ecc],
        }],
    }
    path = tmp_path / "alerts_test.json"  # JSON is YAML: promtool reads it as is
    path.write_text(json.dumps(spec, indent=1))
    rc, out = promtool("test", "rules", str(path))
    assert rc == 0, out
    assert "SUCCESS" in out, out


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

