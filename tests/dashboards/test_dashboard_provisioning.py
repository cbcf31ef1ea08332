"""deploy/grafana/provisioning parses as Grafana's provisioning files, and points at the
committed dashboards: the provider's folder is where deploy/grafana/README.md mounts
dashboards/json/, and what is there is every dashboard, each linking only to the others."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from ringwatch.dashboards import JSON_DIR, load_all
from ringwatch.dashboards._queries import panels

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
PROVISIONING = GRAFANA / "provisioning"


def _yaml(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == 1, path
    return doc


def test_the_datasource_is_the_default_prometheus():
    (ds,) = _yaml(PROVISIONING / "datasources" / "ringwatch.yaml")["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True and ds["access"] == "proxy"
    assert ds["url"].startswith("http") and ds["uid"]
    # $__rate_interval is 4x this: it must be the scrape interval of the Prometheus config
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert ds["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    for dash in load_all().values():
        (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
        assert var["query"] == ds["type"]


def test_the_provider_loads_the_committed_json():
    (prov,) = _yaml(PROVISIONING / "dashboards" / "ringwatch.yaml")["providers"]
    assert prov["type"] == "file" and prov["allowUiUpdates"] is False
    mounts = dict(re.findall(r'-v "\$PWD/([^:"]+):([^:"]+):ro"',
                             (GRAFANA / "README.md").read_text()))
    assert mounts["dashboards/json"] == prov["options"]["path"]
    assert REPO / "dashboards/json" == JSON_DIR
    assert mounts["deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    files = sorted(JSON_DIR.glob("*.json"))
    assert len(files) == 5 and all(load_all()[p.stem]["uid"] == p.stem for p in files)


def test_links_between_dashboards_reach_dashboards_that_exist():
    dashboards = load_all()
    urls = []
    for dash in dashboards.values():
        urls += [link.get("url", "") for link in dash.get("links", [])]
        for p in panels(dash):
            for o in p["fieldConfig"].get("overrides", []):
                for prop in o["properties"]:
                    if prop["id"] == "links":
                        urls += [v["url"] for v in prop["value"]]
    targets = [m for u in urls for m in re.findall(r"/d/([\w-]+)", u)]
    fleet_links = [u for u in urls if "var-job=${__data.fields.job}" in u
                   or "var-host=${__data.fields.host}" in u]
    assert len(fleet_links) >= 3
    assert targets and set(targets) <= set(dashboards), set(targets) - set(dashboards)
    assert {"ringwatch-job", "ringwatch-node"} <= set(targets)
