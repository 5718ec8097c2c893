"""Measure a zoo model block by block, on the runtime that will really run each block.

* ``onnxruntime`` (device inference), with the device agent's session options (``intra_op_num_threads =
  threads``, one inter-op thread, CPU provider) and the exporter of its heads and tails (dynamic batch axis).
  Method ``prefix`` (the default) exports every head prefix ``[0, k)`` and takes block ``i`` as
  ``H(i+1) - H(i)``: a head is one session, and onnxruntime's per-call cost (about 8 µs here) and its fusions
  across blocks would make a sum of single-block times overstate a head by up to a third for a small model.
  Method ``block`` exports every block ``[i, i+1)`` on its own and chains the sessions.
  With ``prefix``, a device's tail ``[b, L)`` is its own session call, whose fixed cost the differences leave
  out; it is measured as the agent pays it — after an idle wait like the wait for the edge's reply, when caches
  and the CPU have gone cold (on the CI VM about 0.14 ms against 0.01 ms back to back): the last block
  ``[L-1, L)`` as its own session, called ``CALL_REPEATS`` times each after ``CALL_IDLE_S`` of sleep, less the
  block's compute — its prefix difference ``H(L) - H(L-1)``, or the same session's back-to-back time if smaller
  (the batch's ``call``; the planner charges it to the tail).
* ``torch`` inference (the edge body): ``torch.inference_mode``, on CPU or CUDA; on CUDA every timed call is
  bracketed by ``torch.cuda.synchronize`` so the time covers the kernels, not only their launch.
* ``torch`` training (device or edge training): the model in train mode; per block, the forward with autograd
  recording, then the backward of that block alone (``y.backward(grad)``, the gradient coming from the block
  above, parameter gradients included; the optimiser step is not timed).

With ``idle_s > 0`` every timed call is made after that long an idle wait, as served work runs: the edge's body
after waiting for the next request. On a shared machine caches go cold in such a wait (on the CI VM an idle
20 ms makes a 0.6 ms body take 1.5 ms), so back-to-back times underestimate what a request pays. (A device's head
follows its tail at once: profile devices back to back.) Torch bodies then run as the edge runs them
(testbed.profiling.served), with the body's wake-up as the batch's ``call``. Backward (training) ignores ``idle_s``.

Every repeat runs the whole chain (``block``: block ``i`` receives the real output of block ``i - 1``;
``prefix``: every prefix on the same input), in the order a real pass takes them. Each repeat also times the
whole model in one call, a check on the per-block sum. ``warmup`` untimed repeats come first; the
garbage collector is paused while timing. The result is a :class:`~testbed.profiling.records.BlockProfile`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from testbed.errors import TestbedError
from testbed.models.blocks import BlockModel
from testbed.models.weights import state_hash
from testbed.onnx_runtime import cpu_session
from testbed.partition import activation_shapes
from testbed.profiling.hostfacts import host_facts
from testbed.profiling.records import MAX_IDLE_S, RUNTIMES, BatchTimings, BlockProfile, ProfileError, Stat, utc_now
from testbed.profiling.served import run_torch_served
from testbed.profiling.timing import (
    CALL_IDLE_S,
    CALL_REPEATS,
    BlockSamples,
    Clock,
    Progress,
    ProgressCounter,
    idle,
    sync_for,
)

__all__ = ["ORT_METHODS", "Progress", "param_bytes", "pick_torch_device", "profile_blocks", "reference_speed",
           "sum_vs_model"]

MAX_BATCH = 65536
#: How onnxruntime block times are measured (see the module docstring); the first is the default.
ORT_METHODS: tuple[str, ...] = ("prefix", "block")


def param_bytes(model: BlockModel) -> tuple[int, ...]:
    """Bytes of every block's parameters and buffers (what a device holding the block must store)."""
    out = []
    for block in model.blocks:
        tensors = list(block.parameters()) + list(block.buffers())
        out.append(sum(t.numel() * t.element_size() for t in tensors))
    return tuple(out)


def pick_torch_device(name: str) -> torch.device:
    """``auto`` (CUDA when torch sees one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ProfileError(f"unknown torch device {name!r} (auto, cpu, cuda or cuda:N): {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProfileError(f"torch device {name!r} asked for, but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ProfileError(f"torch device {name!r}: only cpu and cuda are supported")
    return dev


def reference_speed(device_class: str | None = None) -> tuple[float, str]:
    """The measuring machine's speed in Pi-4 units and where that number comes from.

    A named device class (``profiles/devices/NAME.yaml``) when the profile is measured on a real device of that
    class; otherwise this host's estimate (``TESTBED_HOST_SPEED``, else ``profiles/devices/host.yaml``).
    """
    from testbed.lab.devices import host_speed_vs_pi4, load_device_class

    try:
        if device_class:
            return load_device_class(device_class).speed_vs_pi4, f"device class {device_class}"
        if os.environ.get("TESTBED_HOST_SPEED"):
            return host_speed_vs_pi4(), "TESTBED_HOST_SPEED"
        return host_speed_vs_pi4(), "device class host (profiles/devices/host.yaml, an estimate)"
    except TestbedError as exc:
        raise ProfileError(str(exc)) from None


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---------------------------------------------------------------------------------------------
# Runners: one repeat = the chain of blocks, timed block by block, then the whole model in one call.


def _ort_session(path: Path, threads: int) -> Any:
    return cpu_session(path, threads, error=ProfileError)


def _export_graphs(model: BlockModel, workdir: Path, method: str, counter: ProgressCounter
                   ) -> tuple[list[Path], Path, Path | None]:
    """ONNX graphs (input ``x``, output ``y``): one per block (``block``) or one per head prefix ``[0, k)``
    (``prefix``, k = 1..L-1), one of the whole model, and (``prefix``) the last block on its own."""
    from testbed.errors import PartitionError
    from testbed.partition import _export  # the exporter of heads and tails, with its fallback and checks

    shapes = activation_shapes(model)
    gen = torch.Generator().manual_seed(0)
    blocks = list(model.blocks)
    L = len(blocks)
    paths = []
    try:
        for i in range(L if method == "block" else L - 1):
            module = nn.Sequential(blocks[i]) if method == "block" else nn.Sequential(*blocks[: i + 1])
            example = torch.randn(2, *(shapes[i] if method == "block" else shapes[0]), generator=gen)
            meta = {"testbed.model": model.name, "testbed.blocks": f"{i if method == 'block' else 0}:{i + 1}"}
            paths.append(_export(module, example, "x", "y", workdir / f"{method}{i:02d}.onnx", meta, None))
            counter.step()
        example = torch.randn(2, *shapes[0], generator=gen)
        full = _export(nn.Sequential(*blocks), example, "x", "y", workdir / "model.onnx",
                       {"testbed.model": model.name, "testbed.blocks": f"0:{L}"}, None)
        counter.step()
        last = None
        if method == "prefix":
            example = torch.randn(2, *shapes[L - 1], generator=gen)
            last = _export(nn.Sequential(blocks[L - 1]), example, "x", "y", workdir / "last.onnx",
                           {"testbed.model": model.name, "testbed.blocks": f"{L - 1}:{L}"}, None)
            counter.step()
    except PartitionError as exc:
        raise ProfileError(f"cannot export {model.name!r} to ONNX: {exc}") from None
    return paths, full, last


def _prefix_timings(batch: int, prefix: list[list[float]]) -> BatchTimings:
    """Per-block timings from head-prefix timings ``prefix[k-1]`` = samples of blocks ``[0, k)``.

    Block ``i`` gets the difference of the prefix medians ``H(i+1) - H(i)`` after making the medians
    non-decreasing (a longer head never counts as faster than a shorter one), so the per-block medians add up
    to the head times exactly, up to that correction. p10/p90 are those of the paired per-repeat differences,
    clamped at 0 and widened to contain the median.
    """
    medians = np.maximum.accumulate(np.array([float(np.median(s)) for s in prefix]))
    diffs = np.diff(np.concatenate([[0.0], medians]))
    arr = np.array(prefix)  # (L, repeats)
    paired = np.maximum(np.diff(np.vstack([np.zeros(arr.shape[1]), arr]), axis=0), 0.0)
    fwd = []
    for i, med in enumerate(diffs):
        p10, p90 = np.percentile(paired[i], [10, 90])
        fwd.append(Stat(float(med), min(float(p10), float(med)), max(float(p90), float(med)), arr.shape[1]))
    return BatchTimings(batch_size=batch, fwd=tuple(fwd), model_fwd=Stat.of(prefix[-1]))


def _call_cost(last: Any, x_last: np.ndarray, last_block_s: float, clock: Clock) -> Stat:
    """The fixed cost of one more session call, as an agent pays it after waiting for the edge: the last block's
    own session after an idle sleep each time, less the block's own compute (clamped at 0).

    The block's compute is its prefix difference, or the session's median back-to-back time if that is smaller
    (a difference of two medians is noisy on a shared machine; the back-to-back call bounds it from above)."""
    hot = []
    for _ in range(CALL_REPEATS + 1):  # the first call allocates
        t0 = clock()
        last.run(None, {"x": x_last})
        t1 = clock()
        hot.append((t1 - t0) * 1e-9)
    compute_s = min(last_block_s, float(np.median(hot[1:])))
    samples = []
    for _ in range(CALL_REPEATS):
        time.sleep(CALL_IDLE_S)
        t0 = clock()
        last.run(None, {"x": x_last})
        t1 = clock()
        samples.append(max(0.0, (t1 - t0) * 1e-9 - compute_s))
    return Stat.of(samples)


def _run_ort(model: BlockModel, batch_sizes: Sequence[int], threads: int, warmup: int, repeats: int,
             method: str, clock: Clock, counter: ProgressCounter, workdir: Path, idle_s: float = 0.0
             ) -> list[BatchTimings]:
    paths, full_path, last_path = _export_graphs(model, workdir, method, counter)
    sessions = [_ort_session(p, threads) for p in paths]
    full = _ort_session(full_path, threads)
    last = None if last_path is None else _ort_session(last_path, threads)
    rng = np.random.default_rng(0)
    out = []
    L = model.num_blocks
    for batch in batch_sizes:
        x0 = rng.standard_normal((batch, *model.input_shape), dtype=np.float32)
        samples = BlockSamples(L, training=False)
        prefix: list[list[float]] = [[] for _ in range(L)]
        for rep in range(warmup + repeats):
            timed = rep >= warmup
            x = x0
            for i, sess in enumerate(sessions):
                if timed and (method == "prefix" or i == 0):  # a chain of block sessions is one served call
                    idle(idle_s)
                t0 = clock()
                y = sess.run(None, {"x": x})[0]
                t1 = clock()
                if timed:
                    (samples.fwd if method == "block" else prefix)[i].append((t1 - t0) * 1e-9)
                if method == "block":
                    x = y
            if timed:
                idle(idle_s)
            t0 = clock()
            full.run(None, {"x": x0})
            t1 = clock()
            if timed:
                samples.model_fwd.append((t1 - t0) * 1e-9)
                prefix[L - 1].append((t1 - t0) * 1e-9)
            counter.step()
        if method == "block":
            out.append(samples.timings(batch))
            continue
        timings = _prefix_timings(batch, prefix)
        assert last is not None
        x_last = sessions[L - 2].run(None, {"x": x0})[0]  # the activation entering the last block
        out.append(dataclasses.replace(timings, call=_call_cost(last, x_last, timings.fwd_s[L - 1], clock)))
    return out


def _run_torch_inference(model: BlockModel, batch_sizes: Sequence[int], device: torch.device, warmup: int,
                         repeats: int, clock: Clock, counter: ProgressCounter) -> list[BatchTimings]:
    model.eval()
    sync = sync_for(device)
    gen = torch.Generator().manual_seed(0)
    out = []
    for batch in batch_sizes:
        x0 = torch.randn(batch, *model.input_shape, generator=gen).to(device)
        samples = BlockSamples(model.num_blocks, training=False)
        with torch.inference_mode():
            for rep in range(warmup + repeats):
                timed = rep >= warmup
                x = x0
                for i, block in enumerate(model.blocks):
                    sync()
                    t0 = clock()
                    x = block(x)
                    sync()
                    t1 = clock()
                    if timed:
                        samples.fwd[i].append((t1 - t0) * 1e-9)
                sync()
                t0 = clock()
                model.run(x0, 0, model.num_blocks)
                sync()
                t1 = clock()
                if timed:
                    samples.model_fwd.append((t1 - t0) * 1e-9)
                counter.step()
        out.append(samples.timings(batch))
    return out


def _zero_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def _run_torch_training(model: BlockModel, batch_sizes: Sequence[int], device: torch.device, warmup: int,
                        repeats: int, clock: Clock, counter: ProgressCounter) -> list[BatchTimings]:
    model.train()
    sync = sync_for(device)
    gen = torch.Generator().manual_seed(0)
    L = model.num_blocks
    out = []
    for batch in batch_sizes:
        x0 = torch.randn(batch, *model.input_shape, generator=gen).to(device)
        # The loss gradient arriving at the logits; its values do not change the cost.
        with torch.no_grad():
            logits_shape = model.run(x0, 0, L).shape
        g_out = torch.randn(*logits_shape, generator=gen).to(device) / batch
        samples = BlockSamples(L, training=True)
        assert samples.bwd is not None and samples.model_bwd is not None
        for rep in range(warmup + repeats):
            timed = rep >= warmup
            _zero_grads(model)
            inputs: list[Tensor] = []
            outputs: list[Tensor] = []
            x = x0
            for i, block in enumerate(model.blocks):
                # Block 0 takes the raw input, which needs no gradient; every later block passes one down.
                xi = x.detach().requires_grad_(i > 0)
                sync()
                t0 = clock()
                y = block(xi)
                sync()
                t1 = clock()
                if timed:
                    samples.fwd[i].append((t1 - t0) * 1e-9)
                inputs.append(xi)
                outputs.append(y)
                x = y
            grad = g_out
            for i in reversed(range(L)):
                sync()
                t0 = clock()
                outputs[i].backward(grad)
                sync()
                t1 = clock()
                if timed:
                    samples.bwd[i].append((t1 - t0) * 1e-9)
                grad = inputs[i].grad if i > 0 else None
            del inputs, outputs, x, y
            _zero_grads(model)
            sync()
            t0 = clock()
            logits = model.run(x0, 0, L)
            sync()
            t1 = clock()
            logits.backward(g_out)
            sync()
            t2 = clock()
            if timed:
                samples.model_fwd.append((t1 - t0) * 1e-9)
                samples.model_bwd.append((t2 - t1) * 1e-9)
            del logits
            counter.step()
        out.append(samples.timings(batch))
    _zero_grads(model)
    return out


# ---------------------------------------------------------------------------------------------


def _check_args(batch_sizes: Sequence[int], runtime: str, training: bool, repeats: int, warmup: int,
                threads: int, method: str, idle_s: float = 0.0) -> list[int]:
    if isinstance(idle_s, bool) or not isinstance(idle_s, int | float) or not 0 <= idle_s <= MAX_IDLE_S:
        raise ProfileError(f"idle wait must be a number of seconds in 0..{MAX_IDLE_S:g}, got {idle_s!r}")
    if runtime not in RUNTIMES:
        raise ProfileError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime" and method not in ORT_METHODS:
        raise ProfileError(f"method {method!r} is not one of {', '.join(ORT_METHODS)}")
    if runtime == "torch" and method != "block":
        raise ProfileError("torch blocks are timed one by one (method 'block'; eager torch does not fuse blocks)")
    if training and runtime != "torch":
        raise ProfileError("training is profiled on torch (a device trains its head and tail with torch); "
                           "use runtime 'torch' with training")
    sizes = list(batch_sizes)
    if not sizes:
        raise ProfileError("give at least one batch size")
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH:
            raise ProfileError(f"batch size {b!r} must be an integer in 1..{MAX_BATCH}")
    if len(set(sizes)) != len(sizes):
        raise ProfileError(f"batch sizes repeat: {sizes}")
    for name, v, low in (("repeats", repeats, 1), ("warmup", warmup, 0), ("threads", threads, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ProfileError(f"{name} must be an integer >= {low}, got {v!r}")
    return sorted(sizes)


def profile_blocks(
    model: BlockModel,
    batch_sizes: Sequence[int] = (1,),
    *,
    runtime: str = "onnxruntime",
    training: bool = False,
    repeats: int = 50,
    warmup: int = 10,
    threads: int = 1,
    device: str = "cpu",
    method: str | None = None,
    weights_hash: str | None = None,
    speed_vs_pi4: float | None = None,
    speed_source: str | None = None,
    host: dict[str, Any] | None = None,
    progress: Progress | None = None,
    clock: Clock = time.perf_counter_ns,
    workdir: Path | None = None,
    idle_s: float = 0.0,
) -> BlockProfile:
    """Measure every block of ``model`` at each batch size; see the module docstring for what runs where.

    ``device`` is the torch device (``cpu``, ``cuda``, ``cuda:N`` or ``auto``; onnxruntime is always CPU).
    ``method`` is ``prefix`` or ``block`` for onnxruntime (default ``prefix``), ``block`` for torch.
    The model is not modified: a copy is measured. ``weights_hash`` defaults to the model's state hash;
    ``speed_vs_pi4``/``speed_source`` default to this host's (:func:`reference_speed`); ``host`` to
    :func:`~testbed.profiling.hostfacts.host_facts`. ``clock`` returns nanoseconds (tests may inject one).
    ONNX graphs are written to ``workdir`` (default: a temporary folder, removed afterwards). ``idle_s`` is the
    idle wait before every timed call (0: back to back; see the module docstring).
    """
    if not isinstance(model, BlockModel):
        raise ProfileError(f"profile_blocks needs a BlockModel (from build_model), got {type(model).__name__}")
    method = method or ("prefix" if runtime == "onnxruntime" else "block")
    sizes = _check_args(batch_sizes, runtime, training, repeats, warmup, threads, method, idle_s)
    idle_s = 0.0 if training else float(idle_s)
    dev = torch.device("cpu") if runtime == "onnxruntime" else pick_torch_device(device)
    if speed_vs_pi4 is None:
        speed_vs_pi4, default_source = reference_speed()
        speed_source = speed_source or default_source
    speed_source = speed_source or "given"
    weights_hash = weights_hash or state_hash(model)
    shapes = activation_shapes(model)
    pbytes = param_bytes(model)
    exports = 0 if runtime != "onnxruntime" else model.num_blocks + 1
    counter = ProgressCounter(exports + len(sizes) * (warmup + repeats), progress)
    work = copy.deepcopy(model).to(dev)
    work.requires_grad_(training)
    try:
        with _torch_threads(threads), _gc_paused():
            if runtime == "onnxruntime":
                with contextlib.ExitStack() as stack:
                    folder = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="profile-")))
                    Path(folder).mkdir(parents=True, exist_ok=True)
                    batches = _run_ort(work, sizes, threads, warmup, repeats, method, clock, counter,
                                       Path(folder), idle_s)
            elif training:
                batches = _run_torch_training(work, sizes, dev, warmup, repeats, clock, counter)
            elif idle_s > 0:

                batches = run_torch_served(work, sizes, dev, warmup, repeats, clock, counter, idle_s)
            else:
                batches = _run_torch_inference(work, sizes, dev, warmup, repeats, clock, counter)
    except TestbedError:
        raise
    except Exception as exc:  # torch/onnxruntime failures (out of memory, a block that cannot run at batch 1…)
        raise ProfileError(f"profiling {model.name!r} on {runtime} ({dev}) failed: {type(exc).__name__}: {exc}"
                           ) from None
    finally:
        del work
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return BlockProfile(
        model=model.name,
        config=model.config,
        weights_hash=weights_hash,
        runtime=runtime,
        device=str(dev) if dev.type == "cpu" or dev.index is not None else f"{dev.type}:{torch.cuda.current_device()}",
        threads=threads,
        method=method,
        training=training,
        warmup=warmup,
        repeats=repeats,
        act_shapes=shapes,
        param_bytes=pbytes,
        batches=tuple(batches),
        speed_vs_pi4=speed_vs_pi4,
        speed_source=speed_source,
        host=host if host is not None else host_facts(),
        created=utc_now(),
        idle_s=idle_s,
    )


def sum_vs_model(batch: BatchTimings) -> float:
    """Sum of the per-block forward medians over the whole-model median (about 1; above 1: per-call overhead)."""
    total = math.fsum(batch.fwd_s)
    return total / batch.model_fwd.median if batch.model_fwd.median > 0 else math.inf
