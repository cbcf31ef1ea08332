"""The committed JSON is what the code builds, byte for byte, and it fits the dashboard schema
of Grafana's foundation SDK (vendored in dashboards/schema/, see its README)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from ringwatch.dashboards import JSON_DIR, build_all, load_all
from ringwatch.dashboards._queries import panels

SCHEMA = Path(JSON_DIR).parent / "schema"
UIDS = {"ringwatch-fleet", "ringwatch-job", "ringwatch-node", "ringwatch-power",
        "ringwatch-self"}


def _validator(name: str, ref: str | None = None) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMA / name).read_text())
    if ref is not None:
        schema = {"$ref": f"#/definitions/{ref}", "definitions": schema["definitions"]}
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, instance) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}"
            for e in validator.iter_errors(instance)]


def test_regenerating_changes_nothing():
    built = build_all()
    assert set(built) == UIDS
    on_disk = {p.stem: p.read_text() for p in JSON_DIR.glob("*.json")}
    assert set(on_disk) == UIDS, "dashboards/json holds a file no dashboard builds"
    stale = [uid for uid in UIDS if on_disk[uid] != built[uid]]
    assert not stale, f"run `ringwatch dashboards export dashboards/json`: {stale} differ"


def test_building_twice_gives_the_same_bytes():
    assert build_all() == build_all()


def test_export_writes_the_committed_files(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ringwatch._cli", "dashboards", "export",
                          str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    written = sorted(tmp_path.joinpath("d").glob("*.json"))
    assert [p.name for p in written] == sorted(f"{u}.json" for u in UIDS)
    for p in written:
        assert p.read_bytes() == (JSON_DIR / p.name).read_bytes()
    assert sorted(out.stdout.split()) == sorted(map(str, written))


@pytest.mark.parametrize("uid", sorted(UIDS))
def test_each_dashboard_fits_the_sdk_schema(uid):
    dash = load_all()[uid]
    assert _errors(_validator("dashboard.schema.json"), dash) == []
    target = _validator("prometheus.schema.json")
    for p in panels(dash):
        kind = p["type"].replace("-", "")
        for t in p["targets"]:
            assert _errors(target, t) == [], (p["title"], t["refId"])
        assert _errors(_validator(f"panel-{kind}.schema.json", "Options"),
                       p.get("options", {})) == [], p["title"]
        defs = json.loads((SCHEMA / f"panel-{kind}.schema.json").read_text())["definitions"]
        custom = p["fieldConfig"]["defaults"].get("custom", {})
        if "FieldConfig" in defs:
            assert _errors(_validator(f"panel-{kind}.schema.json", "FieldConfig"),
                           custom) == [], p["title"]
        else:  # stat, bar gauge: no custom field options at all
            assert custom == {}, p["title"]


def test_the_schema_is_strict_enough_to_catch_mistakes():
    """A misspelt key, a wrong type and a missing required field each fail."""
    validator = _validator("dashboard.schema.json")
    good = load_all()["ringwatch-job"]
    assert _errors(validator, good) == []
    typo = copy.deepcopy(good)
    typo["panels"][1]["gridpos"] = typo["panels"][1].pop("gridPos")
    wrong = copy.deepcopy(good)
    wrong["panels"][1]["gridPos"]["w"] = "twelve"
    missing = copy.deepcopy(good)
    del missing["templating"]
    for bad in (typo, wrong, missing):
        assert _errors(validator, bad), bad.get("panels", [None, None])[1]
    query = _validator("prometheus.schema.json")
    t = copy.deepcopy(good["panels"][1]["targets"][0])
    t["format"] = "heat-map"
    assert _errors(query, t)
