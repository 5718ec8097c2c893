"""Torch inference timed as the edge serves it (``profile_blocks(..., idle_s > 0)``; docs/profiling.md, "Served
timings").

Every timed run comes after an idle wait and runs on a thread of its own, handed over through a queue like the
edge's compute thread. The batch's ``call`` is the body's wake-up: each block run alone as the first of a run
after the wait (``CALL_REPEATS`` runs, every start in turn), less its median time inside a chain; block 0, first
in every timed chain, has that median taken out, so that a body ``[a, b)`` costs its blocks plus one ``call``
whatever ``a`` is.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from testbed.models.blocks import BlockModel
from testbed.profiling.records import BatchTimings, Stat
from testbed.profiling.timing import CALL_REPEATS, BlockSamples, Clock, ProgressCounter, idle, sync_for

__all__ = ["ServingThread", "run_torch_served"]


class ServingThread:
    """Runs calls on a thread of its own, handed over through a queue, as the edge's compute thread runs bodies."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="profile-serving", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._results.put((True, job()))
            except BaseException as exc:  # handed back to the caller, raised there
                self._results.put((False, exc))

    def run(self, job: Callable[[], Any]) -> Any:
        self._jobs.put(job)
        ok, value = self._results.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


def run_torch_served(model: BlockModel, batch_sizes: Sequence[int], device: torch.device, warmup: int,
                      repeats: int, clock: Clock, counter: ProgressCounter, idle_s: float) -> list[BatchTimings]:
    """Torch inference as the edge serves it: each timed run after ``idle_s``, on a serving thread; the wake-up
    of a run (``call``) measured apart from the blocks (see the module docstring)."""
    model.eval()
    sync = sync_for(device)
    gen = torch.Generator().manual_seed(0)
    L = model.num_blocks
    worker = ServingThread()

    def chain(x0: Tensor, start: int, stop: int) -> tuple[list[float], list[Tensor]]:
        times, inputs = [], []
        with torch.inference_mode():
            x = x0
            for i in range(start, stop):
                inputs.append(x)
                sync()
                t0 = clock()
                x = model.blocks[i](x)
                sync()
                times.append((clock() - t0) * 1e-9)
        return times, inputs

    def whole(x0: Tensor) -> float:
        with torch.inference_mode():
            sync()
            t0 = clock()
            model.run(x0, 0, L)
            sync()
            return (clock() - t0) * 1e-9

    out = []
    try:
        for batch in batch_sizes:
            x0 = torch.randn(batch, *model.input_shape, generator=gen).to(device)
            samples = BlockSamples(L, training=False)
            inputs: list[Tensor] = []
            for rep in range(warmup + repeats):
                timed = rep >= warmup
                if timed:
                    idle(idle_s)
                times, inputs = worker.run(lambda x0=x0: chain(x0, 0, L))
                if timed:
                    idle(idle_s)
                model_s = worker.run(lambda x0=x0: whole(x0))
                if timed:
                    for i, t in enumerate(times):
                        samples.fwd[i].append(t)
                    samples.model_fwd.append(model_s)
                counter.step()
            in_chain = [float(np.median(s)) for s in samples.fwd]
            wake = []
            for j in range(CALL_REPEATS):  # the first block of a run, for every start in turn
                i = j % L
                idle(idle_s)
                first, _ = worker.run(lambda i=i, x=inputs[i]: chain(x, i, i + 1))
                wake.append(max(0.0, first[0] - in_chain[i]))
            call = Stat.of(wake)
            # Block 0 of every timed chain was a first block: its wake-up is the call's, not the block's.
            samples.fwd[0] = [max(0.0, t - call.median) for t in samples.fwd[0]]
            out.append(dataclasses.replace(samples.timings(batch), call=call))
    finally:
        worker.close()
    return out
