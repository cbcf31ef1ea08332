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

import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from ringwatch import _config
from ringwatch._cli import main

from deploytools import (
    DOCS,
    GATEWAY,
    K8S,
    K8S_VERSION,
    NAMESPACE,
    OTEL_EXPORTER_VARS,
    PROMETHEUS,
    RINGWATCH,
    TOKEN_KEY,
    TOKEN_SECRET,
    argv,
    by_kind,
    clean_env,
    container_ports,
    containers,
    deployed,
    env_of,
    examples,
    expand_env_default,
    fake_container_root,
    flag,
    headless_service_for,
    kustomization,
    load_all,
    mount_of,
    parse_cli,
    pod_spec,
    port_of,
    relocate,
    ringwatch_env_names,
    service_target,
    workload_of,
)
from otlp_receiver import OtlpReceiver

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
