"""One way to open an ONNX model with onnxruntime on the CPU (torch-free: the device agent uses it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testbed.errors import TestbedError


def cpu_session(path: str | Path, threads: int = 1, error: type[TestbedError] = TestbedError) -> Any:
    """An InferenceSession with `threads` intra-op threads, one inter-op thread and quiet logs.

    onnxruntime raises its own untyped errors for a missing or corrupt file; they become `error`.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise error(f"onnxruntime cannot load {path}: {exc}") from None
