"""What the training edge received, for the privacy test (``python -m agents.train_edge --record FILE``).

Every received message's header goes to FILE as a JSON line and its tensors' bytes to FILE.bin; a Python audit
hook collects every path the process opens, and the last line lists those and the loaded modules. The test then
searches the bytes for labels and raw inputs (tests/training/test_split_training.py).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from testbed.wire.envelope import Envelope

__all__ = ["Recorder"]


class Recorder:
    """What the edge received, for the privacy test: headers as JSON lines, tensor bytes appended to .bin."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = open(path, "a")  # noqa: SIM115 - closed in close()
        self.blob = open(path.with_suffix(path.suffix + ".bin"), "ab")  # noqa: SIM115
        self.opened: set[str] = set()

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
            self.opened.add(os.fsdecode(args[0]))

    def record(self, socket: str, env: Envelope, tensors: Mapping[str, np.ndarray]) -> None:
        entries = []
        for name, arr in tensors.items():
            offset = self.blob.tell()
            self.blob.write(np.ascontiguousarray(arr).tobytes())
            entries.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape), "offset": offset,
                            "nbytes": int(arr.nbytes)})
        line = {"socket": socket, "kind": env.kind.value, "device": env.device, "seq": env.seq,
                "partition": env.partition, "tensors": entries}
        self.lines.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self.lines.write(json.dumps({"opened": sorted(self.opened), "modules": sorted(sys.modules)}) + "\n")
        self.lines.close()
        self.blob.close()
