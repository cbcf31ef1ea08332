"""The node sidecar, ``ringwatch agent`` (``ringwatch.agent.sidecar``): a process of its own on
each node, beside the job. It samples the GPUs (through :mod:`ringwatch.collectors`), the host's
NICs and the ranks' log summaries, serves them on ``/metrics`` and pushes them over OTLP.
Nothing here is imported by the job's processes.

Entry point: :func:`ringwatch.agent.sidecar._main.cmd_agent` (the ``agent`` subcommand).
"""
