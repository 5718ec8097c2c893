"""Shared by the tests that bring an emulated lab up (root)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from testbed.lab.hosts import list_namespaces
from testbed.lab.lab import Lab
from testbed.lab.state import StateStore


@contextlib.contextmanager
def fresh_lab(state_dir: Path, prefix: str) -> Iterator[Lab]:
    """A lab handle with nothing of ``prefix`` left from a crashed run; taken down, and checked gone, afterwards."""
    lab = Lab(StateStore(state_dir), prefix)
    lab.down()
    try:
        yield lab
    finally:
        lab.down()
        assert not [ns for ns in list_namespaces() if ns.startswith(f"{prefix}-")]
