"""What the block profilers (testbed.profiling.blocks, and testbed.profiling.served for the edge body as served)
share: the clock and progress types, the count of timed calls, the per-block sample store, the idle wait before a
served call and the device synchronization that ends a timed torch call."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from testbed.profiling.records import BatchTimings, Stat

__all__ = ["CALL_IDLE_S", "CALL_REPEATS", "BlockSamples", "Clock", "Progress", "ProgressCounter", "idle",
           "sync_for"]

#: ``progress(done, total)``: called after every repeat (warm-up included) and every exported block.
Progress = Callable[[int, int], None]
#: Nanoseconds, monotonic (time.perf_counter_ns; tests inject their own).
Clock = Callable[[], int]

#: The per-call cost: calls of the last block's own session (devices) or of the body's first block after the
#: edge idled (the edge), each after an idle wait.
CALL_REPEATS = 30
CALL_IDLE_S = 0.010


class ProgressCounter:
    """Counts the profiler's steps and reports each to ``progress``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.done, self.total, self.progress = 0, total, progress

    def step(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


class BlockSamples:
    """Per-block forward (and backward) samples of one batch size, and the whole model's, in seconds."""

    def __init__(self, num_blocks: int, training: bool) -> None:
        self.fwd: list[list[float]] = [[] for _ in range(num_blocks)]
        self.bwd: list[list[float]] | None = [[] for _ in range(num_blocks)] if training else None
        self.model_fwd: list[float] = []
        self.model_bwd: list[float] | None = [] if training else None

    def timings(self, batch_size: int) -> BatchTimings:
        return BatchTimings(
            batch_size=batch_size,
            fwd=tuple(Stat.of(s) for s in self.fwd),
            model_fwd=Stat.of(self.model_fwd),
            bwd=None if self.bwd is None else tuple(Stat.of(s) for s in self.bwd),
            model_bwd=None if self.model_bwd is None else Stat.of(self.model_bwd),
        )


def idle(seconds: float) -> None:
    """Sleep ``seconds`` before a timed call (none for 0): the wait a served call sees."""
    if seconds > 0:
        time.sleep(seconds)


def sync_for(device: torch.device) -> Callable[[], None]:
    """What ends a timed torch call on ``device``: a CUDA synchronize, nothing on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None
