"""The dashboards as JSON: built, rendered byte-for-byte the same every time, written out.

``dashboards/json/<uid>.json`` is the committed rendering (a test regenerates it and compares);
``ringwatch dashboards export DIR`` writes the same files anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Where the committed JSON lives (the provisioning config points here).
JSON_DIR = Path(__file__).resolve().parent / "json"


def builders() -> dict:
    """``{name: build function}`` of every dashboard, in menu order."""
    from ringwatch.dashboards import _fleet, _job, _node, _power, _self

    return {"fleet": _fleet.build, "job": _job.build, "node": _node.build,
            "power": _power.build, "self": _self.build}


def render(model) -> str:
    """A dashboard model as the JSON Grafana imports: keys sorted, 2-space indent, newline."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    return JSONEncoder(sort_keys=True, indent=2).encode(model) + "\n"


def build_all() -> dict[str, str]:
    """``{uid: JSON text}`` of every dashboard."""
    out = {}
    for build in builders().values():
        text = render(build())
        out[json.loads(text)["uid"]] = text
    return out


def load_all(folder: str | Path = JSON_DIR) -> dict[str, dict]:
    """``{uid: dashboard}`` of the JSON files in ``folder``."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))}


def export(folder: str | Path) -> list[Path]:
    """Write ``<uid>.json`` of every dashboard into ``folder`` (made if missing); returns the
    paths. A file is rewritten only when its content changes.

    Raises:
        OSError: The folder cannot be made or written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, text in build_all().items():
        path = folder / f"{uid}.json"
        if not path.exists() or path.read_text() != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        paths.append(path)
    return paths
