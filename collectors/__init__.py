"""Node-level collectors (``ringwatch.collectors``): NVML and host/NIC counters for the sidecar.

The per-rank collective capture lives in :mod:`ringwatch.agent`; this package holds the
collectors of the node sidecar.
"""
