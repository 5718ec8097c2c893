"""The block profiler on the real runtimes (structure and sanity, not tight numbers), and `testbed profile`."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from testbed.cli.errors import friendly_errors
from testbed.cli.profile import profile as profile_command
from testbed.models import build_model, state_hash
from testbed.partition import activation_shape
from testbed.profiling.blocks import CALL_REPEATS, _prefix_timings, param_bytes, profile_blocks, sum_vs_model
from testbed.profiling.records import BlockProfile, ProfileError, to_model_profile
from testbed.profiling.store import load_block_profile, save_profile

HOST = {"hostname": "testhost"}


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return build_model("cnn").eval()


@pytest.fixture(scope="module")
def ort_profile(cnn) -> BlockProfile:
    return profile_blocks(cnn, [1, 4], repeats=11, warmup=2, host=HOST)


def check_structure(prof: BlockProfile, model) -> None:
    L = model.num_blocks
    assert prof.num_blocks == L and prof.model == "cnn" and prof.config == model.config
    assert prof.act_shapes == tuple(activation_shape(model, p) for p in range(L + 1))
    assert prof.param_bytes == param_bytes(model)
    assert sum(prof.param_bytes) == sum(p.numel() * 4 for p in model.parameters())
    assert prof.weights_hash == state_hash(model)
    for b in prof.batches:
        assert len(b.fwd) == L and all(s.median >= 0 and s.p10 <= s.median <= s.p90 for s in b.fwd)
        assert b.model_fwd.median > 0
        # The heavy convolutions (blocks 1 and 4) cost more than the last, tiny linear layer.
        assert b.fwd[1].median > b.fwd[9].median and b.fwd[4].median > b.fwd[9].median
        assert_sum_near_whole(b.fwd, b.model_fwd)


def assert_sum_near_whole(blocks, whole, factor: float = 4.0) -> None:
    """The per-block times add up to the whole model's within a loose factor. Each side of the comparison uses
    the statistic that preemption by other work on a shared machine cannot push the wrong way: a slow outlier
    only raises medians and p90s, so low quantiles bound from below and medians from above."""
    assert math.fsum(s.median for s in blocks) > whole.p10 / factor, (blocks, whole)
    assert math.fsum(s.p10 for s in blocks) < whole.median * factor, (blocks, whole)


def test_onnxruntime_prefix_profile(ort_profile: BlockProfile, cnn) -> None:
    prof = ort_profile
    check_structure(prof, cnn)
    assert (prof.runtime, prof.device, prof.method, prof.training) == ("onnxruntime", "cpu", "prefix", False)
    assert prof.batch_sizes == (1, 4) and prof.threads == 1 and prof.repeats == 11
    assert all(b.bwd is None for b in prof.batches)
    assert prof.batch(4).model_fwd.median > prof.batch(1).model_fwd.median
    assert prof.host == HOST and prof.speed_vs_pi4 > 0
    # Prefix differences add up to the (monotone) head times: at most the whole model, up to noise.
    for b in prof.batches:
        assert math.fsum(b.fwd_s) >= b.model_fwd.median * 0.999
        # The tail session's call, measured after idle waits, goes to the planner's tail_call_s.
        assert b.call is not None and b.call.n == CALL_REPEATS
        assert to_model_profile(prof, batch_size=b.batch_size).tail_call_s == b.call.median


def test_onnxruntime_block_method(cnn) -> None:
    prof = profile_blocks(cnn, [2], repeats=5, warmup=1, method="block", host=HOST)
    check_structure(prof, cnn)
    assert prof.method == "block"
    assert prof.batches[0].call is None  # every block is its own call already


def test_torch_inference_and_training(cnn) -> None:
    inf = profile_blocks(cnn, [1], runtime="torch", device="cpu", repeats=5, warmup=1, host=HOST)
    check_structure(inf, cnn)
    assert (inf.runtime, inf.method, inf.training) == ("torch", "block", False)
    train = profile_blocks(cnn, [2], runtime="torch", device="cpu", training=True, repeats=5, warmup=1, host=HOST)
    check_structure(train, cnn)
    b = train.batches[0]
    assert b.bwd is not None and b.model_bwd is not None and train.training
    assert all(s.median > 0 for s in b.bwd) and b.model_bwd.median > 0
    assert_sum_near_whole(b.bwd, b.model_bwd)
    # The backward of a convolution costs more than that of the last linear layer.
    assert b.bwd[1].median > b.bwd[9].median


def test_served_torch_profile_waits_runs_on_a_serving_thread_and_measures_the_wake_up(cnn) -> None:
    """With an idle wait every timed call waits first and runs on a thread of its own (as the edge's compute
    thread does); the body's wake-up is measured apart from the blocks and reaches the planner as body_call_s."""
    threads: set[str] = set()

    def clock() -> int:
        threads.add(threading.current_thread().name)
        return time.perf_counter_ns()

    idle = 0.004
    start = time.perf_counter()
    prof = profile_blocks(cnn, [2], runtime="torch", device="cpu", repeats=4, warmup=1, host=HOST, idle_s=idle,
                          clock=clock)
    elapsed = time.perf_counter() - start
    check_structure(prof, cnn)
    assert prof.idle_s == idle and threads == {"profile-serving"}
    assert elapsed >= (2 * 4 + CALL_REPEATS) * idle  # a wait before every timed chain, whole model and wake-up
    b = prof.batches[0]
    assert b.call is not None and b.call.n == CALL_REPEATS and b.call.median >= 0
    model = to_model_profile(profile_blocks(cnn, [2], repeats=2, warmup=0, host=HOST), edge=prof)
    assert model.body_call_s == b.call.median and model.edge_fwd_s == b.fwd_s
    # Back to back (the default): no wake-up term, nothing on another thread.
    plain = profile_blocks(cnn, [2], runtime="torch", device="cpu", repeats=2, warmup=0, host=HOST)
    assert plain.idle_s == 0 and plain.batches[0].call is None
    assert to_model_profile(plain).body_call_s == 0.0


def test_served_wake_up_is_taken_out_of_block_zero(cnn) -> None:
    """Injected clock: every timed call of the chain spans 1 µs, a run's first block 3 µs (the wake-up). Block 0,
    first in every chain, keeps its 1 µs; the 2 µs go to ``call``."""
    state = {"t": 0, "first": True}

    def clock() -> int:  # called twice per block: start, end
        if state["first"]:
            state["first"] = False
            return state["t"]
        state["first"] = True
        state["t"] += 1000
        return state["t"]

    prof = profile_blocks(cnn, [1], runtime="torch", device="cpu", repeats=3, warmup=0, host=HOST, idle_s=0.001,
                          clock=clock)
    b = prof.batches[0]
    assert b.fwd_s == pytest.approx((1e-6,) * 10) and b.call is not None and b.call.median == 0.0


def test_served_onnxruntime_profile_waits_before_every_call(cnn, tmp_path: Path) -> None:
    idle = 0.003
    start = time.perf_counter()
    prof = profile_blocks(cnn, [1], repeats=2, warmup=0, host=HOST, idle_s=idle)
    # A wait before each of the 10 head prefixes and the whole model, in each of the 2 repeats.
    assert time.perf_counter() - start >= 2 * 11 * idle and prof.idle_s == idle
    assert prof.batches[0].call is not None
    assert load_block_profile(save_profile(prof, tmp_path / "p.yaml")).idle_s == idle


def test_training_profiles_ignore_the_idle_wait(cnn) -> None:
    prof = profile_blocks(cnn, [2], runtime="torch", device="cpu", training=True, repeats=2, warmup=0, host=HOST,
                          idle_s=0.01)
    assert prof.idle_s == 0 and prof.batches[0].call is None


def test_the_model_is_left_untouched() -> None:
    torch.manual_seed(1)
    model = build_model("cnn", batch_norm=True).eval()
    before = state_hash(model)
    profile_blocks(model, [2], runtime="torch", device="cpu", training=True, repeats=2, warmup=0, host=HOST)
    assert state_hash(model) == before and not model.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.get_num_threads() >= 1


def test_injected_clock_and_progress(cnn) -> None:
    ticks = iter(range(0, 10**12, 1000))
    calls: list[tuple[int, int]] = []
    prof = profile_blocks(cnn, [1, 2], runtime="torch", device="cpu", repeats=4, warmup=1, host=HOST,
                          clock=lambda: next(ticks), progress=lambda d, t: calls.append((d, t)))
    # Every timed call spans exactly one tick of 1000 ns.
    for b in prof.batches:
        assert b.fwd_s == pytest.approx((1e-6,) * 10) and b.model_fwd.median == pytest.approx(1e-6)
        assert b.model_fwd.n == 4 and b.fwd[3].p90 == pytest.approx(1e-6)
    assert calls[-1] == (10, 10) and [d for d, _ in calls] == list(range(1, 11))


def test_prefix_differencing_is_monotone_and_telescopes() -> None:
    # Prefix medians 1, 3, 2, 5 (ms): the dip at 3 blocks is flattened, then differences add up to 5.
    prefix = [[1e-3] * 3, [3e-3] * 3, [2e-3] * 3, [5e-3] * 3]
    b = _prefix_timings(4, prefix)
    assert b.fwd_s == pytest.approx((1e-3, 2e-3, 0.0, 2e-3))
    assert b.model_fwd.median == pytest.approx(5e-3)
    assert all(s.p10 <= s.median <= s.p90 for s in b.fwd)
    assert np.isclose(math.fsum(b.fwd_s), 5e-3) and sum_vs_model(b) == pytest.approx(1.0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"runtime": "onnxruntime", "training": True}, "torch"),
    ({"runtime": "tvm"}, "runtime"),
    ({"runtime": "torch", "method": "prefix"}, "one by one"),
    ({"method": "magic"}, "method"),
    ({"repeats": 0}, "repeats"),
    ({"threads": 0}, "threads"),
    ({"batch_sizes": []}, "at least one batch size"),
    ({"batch_sizes": [0]}, "batch size"),
    ({"batch_sizes": [2, 2]}, "repeat"),
    ({"idle_s": -0.1}, "idle wait"),
    ({"idle_s": 5.0}, "idle wait"),
    ({"idle_s": True}, "idle wait"),
])
def test_bad_arguments(cnn, kwargs: dict, message: str) -> None:
    args = {"batch_sizes": [1], **kwargs}
    with pytest.raises(ProfileError, match=message):
        profile_blocks(cnn, args.pop("batch_sizes"), host=HOST, **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_asked_for_without_cuda(cnn) -> None:
    with pytest.raises(ProfileError, match="no CUDA"):
        profile_blocks(cnn, [1], runtime="torch", device="cuda", host=HOST)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile(cnn) -> None:
    prof = profile_blocks(cnn, [1, 32], runtime="torch", device="cuda", repeats=10, warmup=3, host=HOST)
    check_structure(prof, cnn)
    assert prof.device.startswith("cuda")


# ---- the command


def cli() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("profile")(friendly_errors(profile_command))

    @app.command("other")
    def other() -> None:
        """Keeps `profile` a sub-command."""

    return app


def run(*args: str):
    return CliRunner().invoke(cli(), ["profile", *args], env={"COLUMNS": "200"})


def test_cli_profiles_and_saves(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    result = run("-b", "1", "-b", "2", "--runtime", "torch", "--device", "cpu", "--training", "--repeats", "3",
                 "--warmup", "1", "--out", str(out), "--device-class", "raspberry-pi-4")
    assert result.exit_code == 0, result.output
    for text in ("cnn on torch", "fwd b=1", "bwd b=2", "sum", "model", str(out)):
        assert text in result.output
    prof = load_block_profile(out)
    assert prof.training and prof.batch_sizes == (1, 2) and prof.repeats == 3
    assert prof.speed_vs_pi4 == 1.0 and prof.speed_source == "device class raspberry-pi-4"


def test_cli_served_profile(tmp_path: Path) -> None:
    out = tmp_path / "served.yaml"
    result = run("--runtime", "torch", "--device", "cpu", "--repeats", "2", "--warmup", "0", "--idle-ms", "2",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "wake-up of a body run" in result.output
    prof = load_block_profile(out)
    assert prof.idle_s == pytest.approx(0.002) and prof.batches[0].call is not None
    bad = run("--idle-ms", "-1", "--repeats", "1", "--warmup", "0")
    assert bad.exit_code == 2 and "--idle-ms" in bad.output and "Traceback" not in bad.output


def test_cli_with_weights(tmp_path: Path, cnn_weights) -> None:
    out = tmp_path / "w.yaml"
    result = run("--weights", str(cnn_weights.path), "--repeats", "2", "--warmup", "0", "--out", str(out),
                 "--method", "block")
    assert result.exit_code == 0, result.output
    prof = load_block_profile(out)
    assert prof.weights_hash == cnn_weights.weights_hash and prof.method == "block"


@pytest.mark.parametrize(("args", "message"), [
    (["--runtime", "onnxruntime", "--training"], "training is profiled on torch"),
    (["--model", "nope"], "unknown model"),
    (["--config", "{bad"], "JSON object"),
    (["--config", '{"width": 3}'], "does not accept"),
    (["--no-blocks"], "nothing to do"),
    (["--device-class", "toaster"], "unknown device class"),
    (["--no-blocks", "--edge", "tcp://127.0.0.1:9", "--link-timeout", "0.2"], "no reply"),
])
def test_cli_errors_are_one_line(args: list[str], message: str) -> None:
    result = run(*args, "--repeats", "1", "--warmup", "0")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
