"""Edge shares: the pure fair scheduler, and a real edge splitting its compute in the planned ratio."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import zmq

from agents.scheduler import FairScheduler, SharesError, parse_shares
from testbed.partition import PartitionId
from testbed.wire import channel
from testbed.wire.envelope import Envelope, Kind, WireLimits

from ..conftest import start_edge, stop_process


def run_saturated(scheduler: FairScheduler[int], cost: dict[str, float], rounds: int) -> dict[str, float]:
    """Every device always has work queued; returns compute seconds served per device."""
    for device in cost:
        for i in range(3):
            scheduler.push(device, i)
    for _ in range(rounds):
        picked = scheduler.pop()
        assert picked is not None
        device, job = picked
        scheduler.charge(device, cost[device])
        scheduler.push(device, job)
    return scheduler.used_s


def test_saturated_devices_get_compute_in_the_ratio_of_their_shares() -> None:
    used = run_saturated(FairScheduler({"a": 3, "b": 1}), {"a": 0.01, "b": 0.01}, 4000)
    assert used["a"] / used["b"] == pytest.approx(3.0, rel=0.01)
    # Unequal job sizes: still compute time, not job count, that is shared.
    used = run_saturated(FairScheduler({"a": 1, "b": 1}), {"a": 0.03, "b": 0.01}, 4000)
    assert used["a"] / used["b"] == pytest.approx(1.0, rel=0.02)


def test_idle_devices_bank_no_credit_and_unknown_devices_get_the_default() -> None:
    s: FairScheduler[int] = FairScheduler({"a": 1, "b": 1})
    for i in range(100):  # a alone: work-conserving, it gets everything
        s.push("a", i)
        device, _ = s.pop()  # type: ignore[misc]
        s.charge(device, 0.01)
    s.push("a", 0)
    s.push("b", 0)  # b arrives now: it must not run 100 jobs in a row to "catch up"
    order = []
    for _ in range(6):
        device, _ = s.pop()  # type: ignore[misc]
        order.append(device)
        s.charge(device, 0.01)
        s.push(device, 0)
    assert order.count("a") == 3 and order.count("b") == 3
    assert s.share("stranger") == 1.0
    assert s.pop() is not None and len(s) >= 1


@pytest.mark.parametrize(("text", "message"), [("a=0", "positive"), ("a=-1", "positive"), ("a", "DEVICE=WEIGHT"),
                                               ("a=x", "not a number"), ("a=inf", "positive")])
def test_bad_shares_are_refused(text: str, message: str) -> None:
    with pytest.raises(SharesError, match=message):
        parse_shares(text)
    assert parse_shares("dev1=0.7, dev2=0.3") == {"dev1": 0.7, "dev2": 0.3}


@pytest.mark.slow
def test_edge_splits_body_throughput_in_the_planned_ratio(cnn_weights, tmp_path) -> None:
    """Two devices keep the edge saturated; body compute served must follow shares 3:1 within 10%.

    Each device keeps 8 batches of 32 in flight: enough queued work on the edge (tens of ms) that a stall of
    this process's client threads does not leave a device idle, which would hand its time to the other."""
    proc, info = start_edge(cnn_weights.path, tmp_path, "--shares", "fast=3,slow=1")
    model = cnn_weights.model
    a, b = 1, 9
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((32, *model.input_shape), dtype=np.float32))
    with torch.inference_mode():
        a1 = model.run(x, 0, a).numpy()
    pid = str(PartitionId(cnn_weights.weights_hash, a, b))
    ctx = zmq.Context()
    served: dict[str, list[tuple[int, int]]] = {"fast": [], "slow": []}
    stop = threading.Event()

    def device(name: str) -> None:
        sock = ctx.socket(zmq.DEALER)
        channel.configure_socket(sock, WireLimits(), linger_ms=0)
        sock.connect(str(info["endpoint"]))
        seq = 0
        in_flight = 0
        try:
            while not stop.is_set() or in_flight:
                while in_flight < 8 and not stop.is_set():
                    seq += 1
                    channel.send(sock, Envelope(Kind.INFER_REQUEST, name, seq, partition=pid), {"a1": a1.copy()})
                    in_flight += 1
                if not sock.poll(5000):
                    break
                reply = channel.recv(sock)[1].envelope
                in_flight -= 1
                assert reply.kind is Kind.INFER_REPLY, reply
                served[name].append((reply.times_ns["edge_end_ns"], reply.times_ns["edge_compute_ns"]))
        finally:
            sock.close()

    threads = [threading.Thread(target=device, args=(n,)) for n in served]
    try:
        for t in threads:
            t.start()
        time.sleep(4.0)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        ctx.term()
        stop_process(proc)
    # Count only the window in which both devices were surely saturating the edge.
    start = max(min(e for e, _ in v) for v in served.values()) + 500_000_000
    end = min(max(e for e, _ in v) for v in served.values()) - 500_000_000
    compute = {n: sum(c for e, c in v if start <= e <= end) for n, v in served.items()}
    assert end - start > 1_000_000_000 and compute["slow"] > 0
    assert compute["fast"] / compute["slow"] == pytest.approx(3.0, rel=0.10), compute
