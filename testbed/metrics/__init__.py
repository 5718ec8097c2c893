"""Prometheus metrics of the testbed: what the device agents, the edge server and the controller export.

Every component gets a `prometheus_client.CollectorRegistry` passed in; nothing here touches the
process-wide default registry. Names follow Prometheus conventions (docs/metrics.md lists them all).
"""
