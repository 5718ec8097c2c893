"""The testbed's exception hierarchy.

Every error the library raises on purpose derives from :class:`TestbedError`, so
the CLI can catch one class and print the message without a traceback. Messages
are written for the person running the testbed: they say what was wrong and,
where possible, what to do about it (the valid range, the known names, the file
that is missing).
"""

from __future__ import annotations

__all__ = ["ModelError", "PartitionError", "TestbedError", "WeightsError"]


class TestbedError(Exception):
    """Base class of every deliberate testbed error; the message is user-actionable."""

    # Not a pytest test class, despite the name.
    __test__ = False


class ModelError(TestbedError):
    """An unknown model name, a bad model config, or a bad block range."""


class WeightsError(TestbedError):
    """A weights file that is missing, unreadable, not ours, or fails its hash check."""


class PartitionError(TestbedError):
    """An invalid split (a, b), a malformed partition id, or a failed export."""
