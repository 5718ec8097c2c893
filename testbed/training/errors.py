"""Errors of the training runs (the CLI maps every TestbedError to a one-line message)."""

from __future__ import annotations

from testbed.errors import TestbedError

__all__ = ["ExperimentError", "ProtocolError", "RunFailed"]


class ExperimentError(TestbedError):
    """The experiment file is invalid; the message lists every problem, one per line."""


class ProtocolError(TestbedError):
    """A training message is well formed on the wire but wrong for the protocol (kind, meta, shapes)."""


class RunFailed(TestbedError):
    """A training run stopped before its end; the message says how to resume."""
