"""A real edge server process, real ZeroMQ clients: concurrent devices with different splits, and garbage."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import zmq

from testbed.partition import PartitionId, activation_shape
from testbed.wire import channel
from testbed.wire.envelope import Envelope, Kind, WireLimits

pytestmark = pytest.mark.slow


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.term()


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    channel.configure_socket(sock, WireLimits(), linger_ms=0)
    sock.connect(endpoint)
    return sock


def request(sock: zmq.Socket, env: Envelope, tensors: dict[str, np.ndarray]):
    channel.send(sock, env, tensors)
    assert sock.poll(20_000), "no reply from the edge within 20 s"
    return channel.recv(sock)[1]


def head_activations(model, a: int, batch: int, seed: int) -> np.ndarray:
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, *model.input_shape), dtype=np.float32))
    with torch.inference_mode():
        return model.run(x, 0, a).numpy()


def test_concurrent_devices_with_different_splits(cnn_weights, edge_server, ctx) -> None:
    model = cnn_weights.model
    splits = [(1, 4), (2, 8), (3, 5), (5, 9)]
    errors: list[str] = []

    def device(i: int, a: int, b: int) -> None:
        sock = dealer(ctx, edge_server.endpoint)
        try:
            pid = str(PartitionId(cnn_weights.weights_hash, a, b))
            for seq in range(1, 16):
                a1 = head_activations(model, a, batch=1 + (seq % 5), seed=100 * i + seq)
                reply = request(sock, Envelope(Kind.INFER_REQUEST, f"dev{i}", seq, partition=pid), {"a1": a1})
                env = reply.envelope
                if env.kind is not Kind.INFER_REPLY or env.seq != seq or env.partition != pid:
                    errors.append(f"dev{i} seq {seq}: bad reply {env}")
                    continue
                with torch.inference_mode():
                    expected = model.run(torch.from_numpy(a1), a, b).numpy()
                np.testing.assert_allclose(reply.tensors["a2"], expected, rtol=1e-5, atol=1e-5)
                t = env.times_ns
                assert t["edge_queue_ns"] >= 0 and t["edge_compute_ns"] > 0
                assert t["edge_recv_ns"] <= t["edge_start_ns"] <= t["edge_end_ns"] <= t["edge_send_ns"]
        except Exception as exc:  # collected so the main thread reports every device's failure
            errors.append(f"dev{i}: {exc!r}")
        finally:
            sock.close()

    threads = [threading.Thread(target=device, args=(i, a, b)) for i, (a, b) in enumerate(splits)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert edge_server.proc.poll() is None


def bad_requests(weights_hash: str, model) -> list[tuple[str, Envelope, dict[str, np.ndarray]]]:
    good_a1 = np.zeros((2, *activation_shape(model, 2)), dtype=np.float32)
    pid = str(PartitionId(weights_hash, 2, 5))
    L = model.num_blocks
    return [
        ("unknown_weights", Envelope(Kind.INFER_REQUEST, "bad", 1, partition=f"{'0' * 16}:2:5"), {"a1": good_a1}),
        ("bad_partition", Envelope(Kind.INFER_REQUEST, "bad", 2, partition=f"{weights_hash[:16]}:0:{L}"),
         {"a1": good_a1}),
        ("bad_partition", Envelope(Kind.INFER_REQUEST, "bad", 3, partition="not-a-partition"), {"a1": good_a1}),
        ("bad_shape", Envelope(Kind.INFER_REQUEST, "bad", 4, partition=pid), {"a1": good_a1[:, :1]}),
        ("bad_shape", Envelope(Kind.INFER_REQUEST, "bad", 5, partition=pid), {"a1": good_a1.astype(np.float64)}),
        ("bad_tensors", Envelope(Kind.INFER_REQUEST, "bad", 6, partition=pid), {"x": good_a1}),
        ("bad_kind", Envelope(Kind.INFER_REPLY, "bad", 7, partition=pid), {"a1": good_a1}),
    ]


def test_bad_requests_get_named_errors_and_others_keep_being_served(cnn_weights, edge_server, ctx) -> None:
    model = cnn_weights.model
    bad = dealer(ctx, edge_server.endpoint)
    good = dealer(ctx, edge_server.endpoint)
    pid = str(PartitionId(cnn_weights.weights_hash, 2, 5))
    a1 = head_activations(model, 2, batch=3, seed=1)
    try:
        for code, env, tensors in bad_requests(cnn_weights.weights_hash, model):
            reply = request(bad, env, tensors)
            assert reply.envelope.kind is Kind.ERROR, code
            assert reply.envelope.error is not None and reply.envelope.error.code == code
            assert reply.envelope.seq == env.seq
            ok = request(good, Envelope(Kind.INFER_REQUEST, "good", env.seq, partition=pid), {"a1": a1})
            assert ok.envelope.kind is Kind.INFER_REPLY
        # Garbage below the envelope layer: not JSON, JSON of the wrong shape, a lying byte count.
        for frames, code in [
            ([b"\xff\x00garbage"], "bad_header"),
            ([json.dumps([1, 2, 3]).encode()], "bad_header"),
            ([json.dumps({"v": 99}).encode()], None),
        ]:
            bad.send_multipart(frames)
            assert bad.poll(20_000)
            reply = channel.recv(bad)[1]
            assert reply.envelope.kind is Kind.ERROR
            if code:
                assert reply.envelope.error.code == code
        ping = request(good, Envelope(Kind.PING, "good", 99), {})
        assert ping.envelope.kind is Kind.PONG and ping.envelope.seq == 99
    finally:
        bad.close()
        good.close()
    assert edge_server.proc.poll() is None
