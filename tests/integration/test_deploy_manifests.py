"""The deployments under deploy/ beyond the Prometheus and collector configs: Kubernetes
(deploy/kubernetes), Slurm (deploy/slurm) and the central compose stack (deploy/compose).

- Kubernetes: every manifest validated against the Kubernetes 1.30 API schemas (strict: no
  unknown field); every container's command parsed by the real CLI's argparse and, with its
  environment, ConfigMap and mounted Secret in place, turned into the agent's and the
  service's configuration by the real ``ringwatch agent`` / ``ringwatch serve`` code; tokens
  only from Secret files; references (Secrets, ConfigMaps, Services, ports, volumes) and the
  names deploy/prometheus and deploy/otelcol look for consistent.
- Slurm: the prolog and epilog run by bash against a fake Slurm environment start a real
  agent (its /metrics answers, it pushes with the token from the file) and stop it with
  SIGTERM; the batch script runs its launch under ``ringwatch run`` with srun, scontrol and
  torchrun stand-ins.
- Compose: no engine here; the file is parsed, its mounts are the repository's files, and
  Prometheus's targets, the rule file and the service's token file agree with it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from ringwatch import _config
from ringwatch._cli import build_parser, main

from otlp_receiver import OtlpReceiver

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
SLURM = ROOT / "deploy" / "slurm"
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GATEWAY = ROOT / "deploy" / "otelcol" / "agent-gateway.yaml"
DOCS = ROOT / "docs" / "deploy.md"
RINGWATCH = Path(sys.executable).with_name("ringwatch")

# The Kubernetes API version the manifests are validated against (the oldest one supported).
K8S_VERSION = "1.30.0"
NAMESPACE = "ringwatch"
TOKEN_SECRET, TOKEN_KEY = "ringwatch-token", "token"
# Environment variables read by the OpenTelemetry exporter the agent uses, beside ringwatch's.
OTEL_EXPORTER_VARS = {"OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TIMEOUT"}
WORKLOAD_KINDS = {"DaemonSet", "StatefulSet", "Deployment", "Pod"}


# --- helpers --------------------------------------------------------------------------------

def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def deployed() -> list[dict]:
    """The objects `kubectl apply -k deploy/kubernetes` creates."""
    return [d for name in kustomization()["resources"] for d in load_all(K8S / name)]


def examples() -> list[dict]:
    return [d for p in sorted((K8S / "examples").glob("*.yaml")) for d in load_all(p)]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(obj: dict) -> dict:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def pod_labels(obj: dict) -> dict:
    return obj["metadata"].get("labels", {}) if obj["kind"] == "Pod" else \
        obj["spec"]["template"]["metadata"]["labels"]


def containers(docs: list[dict]):
    """(workload, pod spec, container) of every container of every workload."""
    for d in docs:
        if d["kind"] in WORKLOAD_KINDS:
            spec = pod_spec(d)
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield d, spec, c


def argv(c: dict) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


def subparser(name: str) -> argparse.ArgumentParser:
    p = build_parser()
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("no subcommands")


def parse_cli(words: list[str]) -> argparse.Namespace:
    """``ringwatch WORDS...`` through the real parser; every flag spelled out in full (argparse
    would take an abbreviation that a later flag could make ambiguous)."""
    assert words and words[0] == "ringwatch", words
    sub = subparser(words[1])
    flags = words[2:words.index("--")] if "--" in words else words[2:]
    for w in flags:
        if w.startswith("-"):
            assert w.split("=")[0] in sub._option_string_actions, \
                f"`ringwatch {words[1]}` has no flag {w}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"ringwatch {' '.join(words[1:])}: {err.getvalue()}")


def flag(words: list[str], name: str) -> str | None:
    for i, w in enumerate(words):
        if w == name:
            return words[i + 1]
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
    return None


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def container_ports(c: dict) -> dict:
    """name -> number and number -> number of the container's declared ports."""
    out = {}
    for p in c.get("ports", []):
        out[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            out[p["name"]] = p["containerPort"]
    return out


def mount_of(c: dict, spec: dict, path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) of the mount holding container path ``path``."""
    best = None
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if (path == mp or path.startswith(mp + "/")) and (
                best is None or len(mp) > len(best["mountPath"])):
            best = m
    assert best is not None, f"{path} is on no volume of container {c['name']}"
    vol = {v["name"]: v for v in spec["volumes"]}[best["name"]]
    return best, vol


def env_of(c: dict, configmaps: dict[str, dict], node: str, pod: str) -> dict[str, str]:
    """The container's environment as the kubelet would set it."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        assert "configMapRef" in src, f"{c['name']}: envFrom only from ConfigMaps: {src}"
        env.update(configmaps[src["configMapRef"]["name"]]["data"])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            field = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = {"spec.nodeName": node, "metadata.name": pod}[field]
    return env


def fake_container_root(tmp: Path, c: dict, spec: dict, token: str) -> Path:
    """A folder standing for the container's filesystem: every mount made, every Secret item
    written (``token`` for the token key)."""
    croot = tmp / f"root-{c['name']}"
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        d = croot / m["mountPath"].lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        secret = vols.get(m["name"], {}).get("secret")
        if secret:
            for item in secret.get("items", [{"key": TOKEN_KEY, "path": TOKEN_KEY}]):
                assert item["key"] == TOKEN_KEY, item
                (d / item["path"]).write_text(token + "\n")
    return croot


def relocate(words: list[str], croot: Path) -> list[str]:
    """Absolute container paths moved under ``croot``."""
    return [str(croot / w.lstrip("/")) if w.startswith("/") else w for w in words]


def clean_env(monkeypatch) -> None:
    for k in list(os.environ):
        if k.startswith(("RINGWATCH_", "OTEL_")):
            monkeypatch.delenv(k)


def ringwatch_env_names() -> set[str]:
    return {v for k, v in vars(_config).items() if k.startswith("ENV_") and isinstance(v, str)}


def expand_env_default(value: str) -> str:
    """``${env:NAME:-default}`` (the collector's syntax) -> default."""
    return re.sub(r"\$\{env:[A-Z_]+:-([^}]*)\}", r"\1", value)


def headless_service_for(host: str, services: dict[str, dict]) -> dict:
    """The Service a ``<svc>.<ns>.svc[.cluster.local]`` name resolves to."""
    m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.cluster\.local)?", host)
    assert m, f"{host} is not a Service's DNS name"
    assert m.group(2) == NAMESPACE, host
    assert m.group(1) in services, f"no Service {m.group(1)} in deploy/kubernetes"
    return services[m.group(1)]


def workload_of(service: dict, docs: list[dict]) -> dict:
    sel = service["spec"]["selector"]
    hits = [d for d in docs if d["kind"] in WORKLOAD_KINDS
            and all(pod_labels(d).get(k) == v for k, v in sel.items())]
    assert len(hits) == 1, f"Service {service['metadata']['name']} selects {len(hits)} workloads"
    return hits[0]


def service_target(service: dict, port: int, docs: list[dict]) -> int:
    """The container port number a Service's ``port`` reaches."""
    w = workload_of(service, docs)
    sp = {p["port"]: p for p in service["spec"]["ports"]}
    assert port in sp, f"Service {service['metadata']['name']} has no port {port}"
    target = sp[port].get("targetPort", port)
    ports = {}
    for c in pod_spec(w)["containers"]:
        ports.update(container_ports(c))
    assert target in ports, f"{service['metadata']['name']}:{port} -> {target}: not declared"
    return ports[target]


# --- Kubernetes -----------------------------------------------------------------------------

ALL_K8S = [(p.relative_to(K8S).as_posix(), i, d)
           for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml"
           for i, d in enumerate(load_all(p))]


@pytest.mark.parametrize("doc", [d for _, _, d in ALL_K8S],
                         ids=[f"{n}#{i}:{d['kind']}" for n, i, d in ALL_K8S])
def test_kubernetes_manifests_validate_against_the_api_schemas(doc):
    # strict: an unknown or misspelt field fails, as `kubectl apply --validate=strict` would
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_applies_every_manifest_with_one_image_placeholder():
    k = kustomization()
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(k["resources"]) == files, "kustomization.yaml must list every manifest"
    kinds = {d["kind"] for d in deployed()}
    assert {"Namespace", "ConfigMap", "DaemonSet", "StatefulSet", "Service"} <= kinds
    (image,) = k["images"]
    for w, _, c in containers(deployed()):
        assert c["image"].split(":")[0] == image["name"], (w["metadata"]["name"], c["image"])
    for d in deployed():
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]["name"]
    assert NAMESPACE in by_kind(deployed(), "Namespace")


def test_every_container_command_parses_with_the_real_cli():
    seen = set()
    for _, _, c in containers(deployed() + examples()):
        args = parse_cli(argv(c))
        seen.add(args.cmd)
        if args.cmd == "run":  # the example training pod wraps its launcher
            assert args.command[:2] == ["--", "torchrun"], args.command
    assert seen == {"agent", "serve", "run"}, seen


def test_agent_daemonset_config_is_what_the_real_agent_reads(tmp_path, monkeypatch):
    docs = deployed()
    (ds,) = by_kind(docs, "DaemonSet").values()
    spec = pod_spec(ds)
    (c,) = spec["containers"]
    token = "k8s-agent-token-0123456789abcdef"
    croot = fake_container_root(tmp_path, c, spec, token)
    clean_env(monkeypatch)
    env = env_of(c, by_kind(docs, "ConfigMap"), node="gpu-node-7", pod="ringwatch-agent-x")
    for k, v in env.items():
        monkeypatch.setenv(k, str(croot / v.lstrip("/")) if k.endswith("_FILE") else v)
    got = {}

    def fake_run_agent(cfg, **kw):
        got.update(cfg=cfg, **kw)
        return 0

    import ringwatch.agent.sidecar._main as agent_main

    monkeypatch.setattr(agent_main, "run_agent", fake_run_agent)
    assert main(relocate(argv(c), croot)[1:]) == 0
    cfg = got["cfg"]
    assert cfg.token == token
    assert cfg.prometheus_listen == "0.0.0.0:9400"
    assert cfg.host == "gpu-node-7"
    assert cfg.export_interval_s == float(env["RINGWATCH_AGENT_EXPORT_INTERVAL_S"])
    assert cfg.otlp_endpoint and urlsplit(cfg.otlp_endpoint).path == "/v1/metrics"
    assert not got["no_gpu"] and got["replay"] is None
    # /sys and /proc of the host, read-only, where --sysfs-root looks for them
    words = argv(c)
    sysfs_root = flag(words, "--sysfs-root")
    assert Path(got["sysfs_root"]) == croot / sysfs_root.lstrip("/")
    for sub in ("sys", "proc"):
        m, vol = mount_of(c, spec, f"{sysfs_root}/{sub}")
        assert m["mountPath"] == f"{sysfs_root}/{sub}" and m.get("readOnly") is True
        assert vol["hostPath"]["path"] == f"/{sub}"
    # the ranks' logs: a hostPath folder, read-only, that --log-dir names
    log_dir = flag(words, "--log-dir")
    assert cfg.log_dir == croot / log_dir.lstrip("/")
    m, vol = mount_of(c, spec, log_dir)
    assert "hostPath" in vol and m.get("readOnly") is True
    # /metrics is open to the scraper and declared
    assert port_of(cfg.prometheus_listen) in container_ports(c).values()


def test_serve_statefulset_config_is_what_the_real_service_reads(tmp_path, monkeypatch):
    docs = deployed()
    (sts,) = by_kind(docs, "StatefulSet").values()
    spec = pod_spec(sts)
    (c,) = spec["containers"]
    token = "k8s-serve-token-0123456789abcdef"
    croot = fake_container_root(tmp_path, c, spec, token)
    clean_env(monkeypatch)
    got = {}

    class Captured(Exception):
        pass

    class FakeService:
        def __init__(self, cfg):
            got["cfg"] = cfg

        def start(self):
            raise Captured

    import ringwatch.service._service as service_mod

    monkeypatch.setattr(service_mod, "Service", FakeService)
    with pytest.raises(Captured):
        main(relocate(argv(c), croot)[1:])
    cfg = got["cfg"]
    assert cfg.token == token and cfg.read_token is None
    ports = container_ports(c)
    for listen in (cfg.otlp_listen, cfg.api_listen, cfg.otlp_grpc_listen):
        assert listen.startswith("0.0.0.0:"), listen
        assert port_of(listen) in ports.values(), listen
    # findings on the volume claimed per pod
    words = argv(c)
    state_dir = flag(words, "--state-dir")
    assert cfg.state_dir == croot / state_dir.lstrip("/")
    m, _ = next(((m, None) for m in c["volumeMounts"]
                 if state_dir.startswith(m["mountPath"].rstrip("/") + "/")), (None, None))
    assert m is not None, f"--state-dir {state_dir} is on no volume"
    assert m["name"] in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    # the probes reach /healthz on the API port (open even with --auth-reads)
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz" and ports[get["port"]] == port_of(cfg.api_listen)


def test_tokens_only_from_secret_files():
    docs = deployed() + examples()
    token_vars = {_config.ENV_TOKEN, _config.ENV_AGENT_TOKEN, _config.ENV_READ_TOKEN,
                  _config.ENV_OTLP_HEADERS}
    n_files = 0
    for w, spec, c in containers(docs):
        words = argv(c)
        name = f"{w['metadata']['name']}/{c['name']}"
        for bad in ("--token", "--read-token", "--otlp-header"):
            assert bad not in words, f"{name}: {bad} on the command line"
        assert not any(re.search(r"bearer|authorization", x, re.I) for x in words), name
        for e in c.get("env", []):
            assert e["name"] not in token_vars, f"{name}: {e['name']} in the environment"
            assert "secretKeyRef" not in e.get("valueFrom", {}), f"{name}: secret in env"
        assert not any("secretRef" in s for s in c.get("envFrom", [])), name
        path = flag(words, "--token-file")
        if path is not None:
            n_files += 1
            m, vol = mount_of(c, spec, path)
            assert vol["secret"]["secretName"] == TOKEN_SECRET
            assert m.get("readOnly") is True
            rel = path[len(m["mountPath"].rstrip("/")) + 1:]
            assert rel in {i["path"] for i in vol["secret"]["items"]}, path
            assert vol["secret"]["defaultMode"] == 0o440
    assert n_files == 2, "the agent and the service both read the token from a file"
    for cm in by_kind(docs, "ConfigMap").values():
        for k, v in cm["data"].items():
            assert "TOKEN" not in k and not re.search(r"bearer", str(v), re.I), k


def test_secrets_and_configmaps_referenced_exist_or_are_documented():
    docs = deployed()
    configmaps = by_kind(docs, "ConfigMap")
    known_env = ringwatch_env_names() | OTEL_EXPORTER_VARS
    secrets = set()
    for _, spec, c in containers(docs):
        for src in c.get("envFrom", []):
            name = src["configMapRef"]["name"]
            assert name in configmaps, f"ConfigMap {name} is not defined"
            unknown = set(configmaps[name]["data"]) - known_env
            assert not unknown, f"ConfigMap {name}: variables nothing reads: {unknown}"
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
            if "secret" in v:
                secrets.add(v["secret"]["secretName"])
                assert {i["key"] for i in v["secret"]["items"]} == {TOKEN_KEY}
    assert secrets == {TOKEN_SECRET}
    # No Secret is committed; the docs and the kustomization say how to create it.
    assert not by_kind(docs, "Secret")
    create = f"create secret generic {TOKEN_SECRET} --from-file={TOKEN_KEY}="
    assert create in DOCS.read_text(), "docs/deploy.md must show how to create the Secret"
    assert create in (K8S / "kustomization.yaml").read_text()


def test_agent_environment_is_accepted_by_the_agent_config():
    docs = deployed()
    (ds,) = by_kind(docs, "DaemonSet").values()
    (c,) = pod_spec(ds)["containers"]
    env = env_of(c, by_kind(docs, "ConfigMap"), node="n1", pod="p1")
    cfg = _config.AgentConfig.from_env(env)
    assert cfg.host == "n1" and cfg.logs_interval_s > 0 and cfg.export_interval_s > 0


def test_agent_configmap_compression_reaches_the_real_pushes():
    # The exporter reads OTEL_EXPORTER_OTLP_COMPRESSION itself: one real push, with the
    # ConfigMap's environment, must arrive gzip-compressed.
    (cm,) = by_kind(deployed(), "ConfigMap").values()
    assert cm["data"]["OTEL_EXPORTER_OTLP_COMPRESSION"] == "gzip"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RINGWATCH_", "OTEL_"))}
    env.update(cm["data"])
    with OtlpReceiver() as rx:
        p = subprocess.run([str(RINGWATCH), "agent", "--once", "--no-gpu", "--log-dir", "off",
                            "--prometheus", "off", "--otlp-endpoint", rx.url],
                           env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        (headers, _), = rx.snapshot()
    assert headers.get("content-encoding") == "gzip"


def test_services_select_their_pods_and_reach_declared_ports():
    docs = deployed()
    services = by_kind(docs, "Service")
    for svc in services.values():
        for p in svc["spec"]["ports"]:
            service_target(svc, p["port"], docs)
    for sts in by_kind(docs, "StatefulSet").values():
        svc = services[sts["spec"]["serviceName"]]
        assert svc["spec"].get("clusterIP") == "None", "a StatefulSet's Service is headless"
        assert workload_of(svc, docs) is sts
    for _, _, c in containers(docs):
        ports = container_ports(c)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c:
                p = c[probe].get("httpGet", c[probe].get("tcpSocket"))
                assert p["port"] in ports, f"{c['name']}.{probe}: port {p['port']}"


def test_agents_push_to_the_serve_service_on_its_otlp_port():
    docs = deployed()
    services = by_kind(docs, "Service")
    (ds,) = by_kind(docs, "DaemonSet").values()
    (agent,) = pod_spec(ds)["containers"]
    url = urlsplit(flag(argv(agent), "--otlp-endpoint"))
    assert url.scheme == "http" and url.path == "/v1/metrics"
    svc = headless_service_for(url.hostname, services)
    target = service_target(svc, url.port, docs)
    (serve,) = pod_spec(workload_of(svc, docs))["containers"]
    assert target == port_of(flag(argv(serve), "--otlp-listen"))


def test_prometheus_and_the_gateway_find_the_services_by_their_names():
    docs = deployed()
    services = by_kind(docs, "Service")
    prom = yaml.safe_load(PROMETHEUS.read_text())
    found = {}
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                svc = headless_service_for(name, services)
                assert svc["spec"].get("clusterIP") == "None", f"{name}: A records need headless"
                target = service_target(svc, sd["port"], docs)
                found[job["job_name"]] = target
    (ds,) = by_kind(docs, "DaemonSet").values()
    (agent,) = pod_spec(ds)["containers"]
    (sts,) = by_kind(docs, "StatefulSet").values()
    (serve,) = pod_spec(sts)["containers"]
    assert found["ringwatch-agent"] == port_of(flag(argv(agent), "--prometheus"))
    assert found["ringwatch-serve"] == port_of(flag(argv(serve), "--listen"))
    # the collector gateway's resolver: the headless Service, the gRPC port
    gw = yaml.safe_load(GATEWAY.read_text())
    dns = gw["exporters"]["loadbalancing"]["resolver"]["dns"]
    svc = headless_service_for(expand_env_default(dns["hostname"]), services)
    assert service_target(svc, int(dns["port"]), docs) == \
        port_of(flag(argv(serve), "--otlp-grpc-listen"))


def test_pods_run_non_root_read_only_with_requests_and_limits():
    docs = deployed()
    n = 0
    for w, spec, c in containers(docs):
        n += 1
        name = f"{w['metadata']['name']}/{c['name']}"
        psc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, name
        assert sc.get("runAsUser", psc.get("runAsUser", 0)) != 0, name
        assert sc.get("readOnlyRootFilesystem") is True, name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
        assert not sc.get("privileged") and not spec.get("hostPID"), name
        assert not spec.get("hostNetwork") and not spec.get("hostIPC"), name
        assert spec.get("automountServiceAccountToken") is False, name
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][part]), f"{name}: {part}"
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            if "hostPath" in vols.get(m["name"], {}):
                assert m.get("readOnly") is True, f"{name}: hostPath {m['mountPath']} writable"
    assert n == 2


def test_agent_sees_the_gpus_the_way_dcgm_exporter_does():
    (ds,) = by_kind(deployed(), "DaemonSet").values()
    spec = pod_spec(ds)
    (c,) = spec["containers"]
    assert spec["runtimeClassName"] == "nvidia"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    # no GPU taken from the jobs
    for part in ("requests", "limits"):
        assert not any("gpu" in k for k in c["resources"].get(part, {})), part
    assert "--no-gpu" not in argv(c)
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))


def test_training_pods_write_the_logs_where_the_agent_reads_them():
    (ds,) = by_kind(deployed(), "DaemonSet").values()
    aspec = pod_spec(ds)
    (agent,) = aspec["containers"]
    _, avol = mount_of(agent, aspec, flag(argv(agent), "--log-dir"))
    (pod,) = by_kind(examples(), "Pod").values()
    tspec = pod_spec(pod)
    (train,) = tspec["containers"]
    args = parse_cli(argv(train))
    m, tvol = mount_of(train, tspec, args.log_dir)
    assert tvol["hostPath"]["path"] == avol["hostPath"]["path"]
    assert not m.get("readOnly")
    # the same host label on the ranks and on the node's series
    for c in (agent, train):
        (host,) = [e for e in c["env"] if e["name"] == _config.ENV_HOST]
        assert host["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


# --- Slurm ----------------------------------------------------------------------------------

PROLOG = SLURM / "ringwatch-prolog.sh"
EPILOG = SLURM / "ringwatch-epilog.sh"
SBATCH = SLURM / "train.sbatch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(tmp: Path, **extra: str) -> Path:
    """A settings file like /etc/ringwatch/slurm.env, everything under ``tmp``."""
    settings = {
        "RINGWATCH_BIN": str(RINGWATCH),
        "RINGWATCH_SLURM_ROOT": str(tmp / "local"),
        "RINGWATCH_SLURM_RUN_DIR": str(tmp / "run"),
        "RINGWATCH_SLURM_PROMETHEUS": "127.0.0.1:0",
        "RINGWATCH_SLURM_TOKEN_FILE": "",
        "RINGWATCH_SLURM_AGENT_ARGS": "--no-gpu",
        "RINGWATCH_SLURM_START_TIMEOUT_S": "90",
        **extra,
    }
    conf = tmp / "slurm.env"
    conf.write_text("".join(f"{k}='{v}'\n" for k, v in settings.items()))
    return conf


def slurm_env(conf: Path, job: str, **extra: str) -> dict[str, str]:
    """What slurmd gives a prolog/epilog: no search path, the job's ids."""
    return {"SLURM_JOB_ID": job, "SLURM_JOB_UID": str(os.getuid()),
            "SLURM_JOB_USER": pwd.getpwuid(os.getuid()).pw_name,
            "RINGWATCH_SLURM_CONF": str(conf), **extra}


def run_like_slurmd(script: Path, env: dict[str, str], timeout: float = 120):
    """Run a prolog/epilog as slurmd does: its own process group, killed once it returns."""
    p = subprocess.Popen(["/bin/bash", str(script)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, out


def alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def kill_if_alive(pid: int | None) -> None:
    if pid and alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_slurm_prolog_starts_the_agent_and_the_epilog_stops_it(tmp_path):
    job, token, port = "4242", "slurm-token-0123456789abcdef", free_port()
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "token").chmod(0o600)
    pid = None
    with OtlpReceiver() as rx:
        conf = slurm_conf(tmp_path, RINGWATCH_SLURM_PROMETHEUS=f"127.0.0.1:{port}",
                          RINGWATCH_SLURM_OTLP_ENDPOINT=rx.url,
                          RINGWATCH_SLURM_TOKEN_FILE=str(tmp_path / "token"),
                          RINGWATCH_SLURM_AGENT_ARGS="--no-gpu --export-interval-s 0.5")
        env = slurm_env(conf, job)
        try:
            rc, out = run_like_slurmd(PROLOG, env)
            assert rc == 0, out
            pid_file = tmp_path / "run" / f"agent-{job}.pid"
            pid = int(pid_file.read_text())
            # it outlived the prolog and the kill of the prolog's process group
            assert alive(pid), out + (tmp_path / "run" / f"agent-{job}.log").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            words = [w.decode() for w in cmd if w]
            i = words.index("agent")
            args = parse_cli(["ringwatch", *words[i:]])
            assert args.job_id == job
            assert args.log_dir == str(tmp_path / "local" / job / "logs")
            assert args.token_file == str(tmp_path / "token")
            assert not any(token in w for w in words), "the token is on the command line"
            job_dir = tmp_path / "local" / job
            assert job_dir.stat().st_uid == os.getuid()
            assert (job_dir / "logs").is_dir()
            # /metrics answers, with the node's series labelled with the job id
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                body = r.read().decode()
            assert f'job="{job}"' in body and "ringwatch_host_cpu_seconds_total" in body
            # and it pushes with the token from the file
            deadline = time.monotonic() + 30
            while not rx.snapshot() and time.monotonic() < deadline:
                time.sleep(0.2)
            headers, _ = rx.snapshot()[0]
            assert headers.get("authorization") == f"Bearer {token}"

            rc, out = run_like_slurmd(EPILOG, env)
            assert rc == 0, out
            assert f"agent (pid {pid}) stopped on SIGTERM" in out, out
            assert not alive(pid)
            assert not pid_file.exists() and not job_dir.exists()
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
            # a second epilog (requeue, retry) has nothing to do and still succeeds
            rc, out = run_like_slurmd(EPILOG, env)
            assert rc == 0, out
        finally:
            kill_if_alive(pid)


def test_slurm_prolog_never_fails_the_node(tmp_path):
    conf = slurm_conf(tmp_path, RINGWATCH_SLURM_AGENT_ARGS="--no-gpu --no-such-flag")
    t0 = time.monotonic()
    rc, out = run_like_slurmd(PROLOG, slurm_env(conf, "7"))
    assert rc == 0, out
    assert "the agent exited at start" in out and "--no-such-flag" in out, out
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run" / "agent-7.pid").exists()
    # no job id, a job id that is a path, no ringwatch command: no agent, no failure
    for env in (slurm_env(conf, "../../etc"), slurm_env(conf, "")):
        rc, out = run_like_slurmd(PROLOG, env)
        assert rc == 0 and "not a job id" in out, out
    conf = slurm_conf(tmp_path, RINGWATCH_BIN=str(tmp_path / "missing"))
    rc, out = run_like_slurmd(PROLOG, slurm_env(conf, "8"))
    assert rc == 0 and "not executable" in out, out
    rc, out = run_like_slurmd(EPILOG, slurm_env(conf, "8"))
    assert rc == 0, out


def test_slurm_epilog_leaves_a_reused_pid_alone(tmp_path):
    conf = slurm_conf(tmp_path)
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "run").mkdir()
        pid_file = tmp_path / "run" / "agent-9.pid"
        pid_file.write_text(f"{other.pid}\n")
        rc, out = run_like_slurmd(EPILOG, slurm_env(conf, "9"))
        assert rc == 0, out
        assert "not this job's agent" in out, out
        assert other.poll() is None, "the epilog killed a process that is not the agent"
        assert not pid_file.exists()
    finally:
        other.kill()
        other.wait()


def test_sbatch_launches_under_ringwatch_run_and_gathers_the_logs(tmp_path):
    job = "5151"
    conf = slurm_conf(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "seen.txt"
    stubs = {
        # srun: drop its own options, run the step here (one node)
        "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": "#!/bin/bash\necho node001\n",
        # torchrun: say what it was given, write one rank's log, fail like a broken job
        "torchrun": (
            "#!/bin/bash\n"
            f'{{ echo "LOG_DIR=$RINGWATCH_LOG_DIR"; echo "JOB_ID=$RINGWATCH_JOB_ID"; '
            f'echo "AUTOATTACH=$RINGWATCH_AUTOATTACH"; echo "ARGS=$*"; }} > {seen}\n'
            'mkdir -p "$RINGWATCH_LOG_DIR/$RINGWATCH_JOB_ID/rank-0"\n'
            'echo x > "$RINGWATCH_LOG_DIR/$RINGWATCH_JOB_ID/rank-0/marker"\n'
            "exit 3\n"),
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "ringwatch").symlink_to(RINGWATCH)
    local_logs = tmp_path / "local" / job / "logs"
    local_logs.mkdir(parents=True)  # the prolog made it
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path),
           "SLURM_JOB_ID": job, "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node001",
           "RINGWATCH_SLURM_CONF": str(conf), "RINGWATCH_SHARED_LOGS": str(tmp_path / "shared"),
           "GPUS_PER_NODE": "2"}
    p = subprocess.run(["/bin/bash", str(SBATCH), "--epochs", "1"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    # the job's status is the launcher's
    assert p.returncode == 3, p.stdout + p.stderr
    got = dict(line.split("=", 1) for line in seen.read_text().splitlines())
    # the ranks write where the prolog pointed that node's agent, under the Slurm job id
    assert got["LOG_DIR"] == str(local_logs)
    assert got["JOB_ID"] == job and got["AUTOATTACH"] == "1"
    args = got["ARGS"].split()
    assert flag(args, "--rdzv-id") == job and flag(args, "--nproc-per-node") == "2"
    assert flag(args, "--rdzv-endpoint") == "node001:29500"
    assert args[-3:] == ["train.py", "--epochs", "1"]
    # the logs gathered to shared storage even though the job failed
    assert (tmp_path / "shared" / job / "rank-0" / "marker").read_text() == "x\n"


def test_slurm_scripts_are_executable_bash():
    for script in (PROLOG, EPILOG, SBATCH):
        assert script.read_text().startswith("#!/bin/bash\n"), script
        # slurmd executes the prolog and epilog themselves (sbatch reads its script)
        if script is not SBATCH:
            assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
        p = subprocess.run(["/bin/bash", "-n", str(script)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    # the settings file documents every setting the scripts read, and only those
    documented = set(re.findall(r"^(RINGWATCH_[A-Z_]+)=", (SLURM / "ringwatch-slurm.env")
                                .read_text(), re.M))
    used = set()
    for script in (PROLOG, EPILOG):
        used |= set(re.findall(r"\$\{(RINGWATCH_[A-Z_]+)", script.read_text()))
    used -= {"RINGWATCH_SLURM_CONF"}
    assert documented == used, (documented ^ used)


# --- compose --------------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def bind_mounts(svc: dict) -> list[tuple[Path, str, bool]]:
    """(host path, container path, read-only) of the service's bind mounts."""
    out = []
    for v in svc.get("volumes", []):
        parts = v.split(":")
        if parts[0].startswith((".", "/")):
            out.append(((COMPOSE_DIR / parts[0]).resolve(), parts[1],
                        len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def cmd_flag(words: list[str], name: str) -> str | None:
    """``--name=value`` or ``--name value``."""
    return flag(words, name)


def test_compose_parses_and_mounts_only_files_of_the_repository():
    c = compose()
    assert set(c["services"]) == {"ringwatch-serve", "prometheus", "alertmanager", "grafana"}
    mounted = {}
    for name, svc in c["services"].items():
        for host, cpath, ro in bind_mounts(svc):
            assert host.is_relative_to(ROOT), f"{name}: {host} is outside the repository"
            assert host.exists(), f"{name}: {host.relative_to(ROOT)} does not exist"
            assert ro, f"{name}: {cpath} is writable"
            mounted[host.relative_to(ROOT).as_posix()] = (name, cpath)
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in c["volumes"], f"{name}: volume {src} is not declared"
    for path, svc in (("deploy/prometheus/prometheus.yml", "prometheus"),
                      ("deploy/prometheus/alerts.yml", "prometheus"),
                      ("deploy/alertmanager/alertmanager.yml", "alertmanager"),
                      ("deploy/grafana/provisioning", "grafana"),
                      ("dashboards/json", "grafana")):
        assert mounted.get(path, ("",))[0] == svc, f"{path} is not mounted into {svc}"


def test_compose_prometheus_reaches_serve_and_alertmanager_by_their_compose_names():
    c = compose()
    svcs = c["services"]
    prom_words = svcs["prometheus"]["command"]
    mounts = {cpath: host for host, cpath, _ in bind_mounts(svcs["prometheus"])}
    config_path = cmd_flag(prom_words, "--config.file")
    assert mounts[config_path] == PROMETHEUS
    prom = yaml.safe_load(PROMETHEUS.read_text())
    # the rule files, relative to the config's folder, are mounted there
    for rule in prom["rule_files"]:
        in_container = str(Path(config_path).parent / rule)
        assert mounts.get(in_container) == (PROMETHEUS.parent / rule).resolve(), rule
    # the serve instances: the DNS name Prometheus resolves is the serve container's, and the
    # port its API listens on
    serve = svcs["ringwatch-serve"]
    names = {"ringwatch-serve", *serve["networks"]["default"]["aliases"]}
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "ringwatch-serve"]
    (sd,) = job["dns_sd_configs"]
    assert set(sd["names"]) <= names, sd["names"]
    args = parse_cli(serve["command"])
    assert sd["port"] == port_of(args.listen) and args.listen.startswith("0.0.0.0:")
    # Alertmanager: the target prometheus.yml names is the compose service and its port
    am_port = port_of(cmd_flag(svcs["alertmanager"]["command"], "--web.listen-address"))
    for am in prom["alerting"]["alertmanagers"]:
        for sc in am["static_configs"]:
            for target in sc["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in svcs and int(port) == am_port, target
    am_mounts = {cpath: host for host, cpath, _ in bind_mounts(svcs["alertmanager"])}
    assert cmd_flag(svcs["alertmanager"]["command"], "--config.file") in am_mounts
    # published ports are the ones listened on
    for name, listen in (("ringwatch-serve", args.listen),
                         ("ringwatch-serve", args.otlp_listen),
                         ("prometheus", cmd_flag(prom_words, "--web.listen-address")),
                         ("alertmanager", f":{am_port}")):
        published = {int(p.rsplit(":", 1)[1]) for p in svcs[name]["ports"]}
        assert port_of(listen) in published, (name, listen)


def test_compose_serve_reads_its_token_from_a_secret_file():
    c = compose()
    serve = c["services"]["ringwatch-serve"]
    words = serve["command"]
    args = parse_cli(words)
    assert "--token" not in words and args.token is None
    env = serve.get("environment", {})
    assert not {_config.ENV_TOKEN, _config.ENV_READ_TOKEN} & set(env), env
    path = args.token_file or env.get(_config.ENV_TOKEN_FILE)
    m = re.fullmatch(r"/run/secrets/([a-z_]+)", path or "")
    assert m, f"the token file {path} is not a compose secret"
    assert m.group(1) in serve["secrets"]
    source = (COMPOSE_DIR / c["secrets"][m.group(1)]["file"]).resolve()
    assert source.parent == COMPOSE_DIR / "secrets"
    # the secrets' folder keeps its files out of git
    ignore = (source.parent / ".gitignore").read_text().splitlines()
    assert "*" in ignore and "!.gitignore" in ignore
    # Grafana's admin password is a secret file too, never a value
    grafana = c["services"]["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith("/run/secrets/")
    # the service runs unprivileged on a read-only filesystem
    assert serve["read_only"] is True and not serve["user"].startswith("0")


def test_compose_grafana_datasource_is_the_compose_prometheus():
    svcs = compose()["services"]
    prom_port = port_of(cmd_flag(svcs["prometheus"]["command"], "--web.listen-address"))
    ds_dir = ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
    urls = []
    for p in sorted(ds_dir.glob("*.y*ml")):
        for ds in (yaml.safe_load(p.read_text()) or {}).get("datasources", []):
            if ds.get("type") == "prometheus":
                urls.append(ds["url"])
    assert urls, f"no Prometheus datasource in {ds_dir.relative_to(ROOT)}"
    for url in urls:
        u = urlsplit(url)
        assert (u.hostname, u.port) == ("prometheus", prom_port), url


def test_compose_grafana_loads_the_dashboards_where_they_are_mounted():
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    prov_dir = ROOT / "deploy" / "grafana" / "provisioning"
    (prov_mount,) = [cpath for host, cpath, _ in mounts if host == prov_dir]
    assert prov_mount == "/etc/grafana/provisioning"  # where Grafana looks by default
    providers = [pv for p in sorted((prov_dir / "dashboards").glob("*.y*ml"))
                 for pv in (yaml.safe_load(p.read_text()) or {}).get("providers", [])]
    assert providers, "no dashboard provider in deploy/grafana/provisioning/dashboards"
    for pv in providers:
        path = pv["options"]["path"]
        hosts = [h for h, cpath, _ in mounts if path == cpath or path.startswith(cpath + "/")]
        assert hosts, f"dashboard provider {pv['name']}: {path} is not mounted"
        assert any(h.is_dir() and any(h.rglob("*.json")) for h in hosts), \
            f"dashboard provider {pv['name']}: no dashboard JSON in {hosts}"
