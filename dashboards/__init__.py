"""Grafana dashboards as code (``ringwatch.dashboards``), generated from the metric table."""
