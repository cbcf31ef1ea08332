"""Shared by the tests of deploy/ (Kubernetes, Slurm, compose): paths, and readers of the
manifests and of the commands they run."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from ringwatch import _config
from ringwatch._cli import build_parser

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
