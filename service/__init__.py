"""The central service (``ringwatch serve``, ``ringwatch.service``): receives what the node
agents push over OTLP, runs the analyzers continuously and publishes the findings."""
