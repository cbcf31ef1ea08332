"""Grafana dashboards as code (``ringwatch.dashboards``), generated from the metric table.

Five dashboards built with Grafana's foundation SDK (one module each: ``_fleet``, ``_job``,
``_node``, ``_power``, ``_self``); their JSON is committed under ``dashboards/json/``.
``ringwatch dashboards export DIR`` writes it, ``ringwatch dashboards push --url URL`` uploads
it. Importing this package loads nothing heavy: the SDK is imported by the builders only.
"""

from ringwatch.dashboards._export import JSON_DIR, build_all, export, load_all

__all__ = ["JSON_DIR", "build_all", "export", "load_all"]
