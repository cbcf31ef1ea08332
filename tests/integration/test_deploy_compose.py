"""deploy/compose: no engine here; the file is parsed, its mounts are the repository's files,
and Prometheus's targets, the rule file and the service's token file agree with it."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from ringwatch import _config

from deploytools import (
    COMPOSE,
    COMPOSE_DIR,
    PROMETHEUS,
    ROOT,
    flag,
    parse_cli,
    port_of,
)

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
