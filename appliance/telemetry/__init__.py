"""Telemetry: structured log, metrics, and the stats endpoint the `stats` command reads."""
