"""The channel helpers over real ZeroMQ sockets (loopback TCP and inproc), no mocks."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from testbed.wire import (
    ALLOWED_DTYPES,
    DEFAULT_LIMITS,
    Envelope,
    Kind,
    Message,
    MessageTooLarge,
    WireError,
    WireLimits,
    configure_socket,
    recv,
    reply_error,
    send,
)

POLL_MS = 5000  # no single wait in these tests may take longer
_inproc_ids = itertools.count()


class EchoServer:
    """A ROUTER that echoes valid messages (same tensors, same ids) and answers bad ones with ERROR."""

    def __init__(self, ctx: zmq.Context, limits: WireLimits = DEFAULT_LIMITS, transport: str = "tcp") -> None:
        self.limits = limits
        self.sock = ctx.socket(zmq.ROUTER)
        configure_socket(self.sock, limits)
        if transport == "tcp":
            port = self.sock.bind_to_random_port("tcp://127.0.0.1")
            self.endpoint = f"tcp://127.0.0.1:{port}"
        else:
            self.endpoint = f"inproc://wire-echo-{next(_inproc_ids)}"
            self.sock.bind(self.endpoint)
        self.served = 0
        self.errors: list[WireError] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="echo-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.sock.poll(20):
                    continue
                try:
                    route, msg = recv(self.sock, limits=self.limits, routed=True)
                except WireError as err:
                    self.errors.append(err)
                    if err.route is not None:
                        reply_error(self.sock, err.route, err, limits=self.limits)
                    continue
                env = msg.envelope
                kind = Kind.PONG if env.kind is Kind.PING else Kind.INFER_REPLY
                reply = Envelope(kind, env.device, env.seq, env.partition, times_ns=env.times_ns)
                self.served += 1  # before the reply: a client that has it may check the count at once
                send(self.sock, reply, msg.tensors, limits=self.limits, route=route)
        finally:
            self.sock.close(linger=1000)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "echo server did not stop"


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=1000)


@pytest.fixture(params=["tcp", "inproc"])
def server(request: pytest.FixtureRequest, ctx: zmq.Context) -> Iterator[EchoServer]:
    srv = EchoServer(ctx, transport=request.param)
    yield srv
    srv.close()


@pytest.fixture
def tcp_server(ctx: zmq.Context) -> Iterator[EchoServer]:
    srv = EchoServer(ctx)
    yield srv
    srv.close()


def dealer(ctx: zmq.Context, endpoint: str, limits: WireLimits = DEFAULT_LIMITS, identity: bytes = b"") -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    configure_socket(sock, limits)
    if identity:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(endpoint)
    return sock


def get(sock: zmq.Socket, limits: WireLimits = DEFAULT_LIMITS, timeout_ms: int = POLL_MS) -> Message:
    assert sock.poll(timeout_ms, zmq.POLLIN), "no reply in time"
    route, msg = recv(sock, limits=limits)
    assert route is None
    return msg


def header(**fields: Any) -> bytes:
    base = {"version": 1, "kind": "infer_request", "device": "bad-client", "seq": 7}
    return json.dumps({**base, **fields}).encode()


def spec(name: str = "x", dtype: str = "float32", shape: list[Any] | None = None, nbytes: Any = 16) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": [4] if shape is None else shape, "nbytes": nbytes}


# ----------------------------------------------------------------------------- sockets


def test_configure_socket(ctx: zmq.Context) -> None:
    sock = ctx.socket(zmq.DEALER)
    configure_socket(sock, WireLimits(max_message_bytes=12345), linger_ms=77)
    assert sock.getsockopt(zmq.MAXMSGSIZE) == 12345
    assert sock.getsockopt(zmq.LINGER) == 77
    sock.close(linger=0)


def test_echo_is_bit_exact(server: EchoServer, ctx: zmq.Context) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        f"{dtype}_{i}": rng.integers(0, 256, size=n * np.dtype(dtype).itemsize, dtype=np.uint8).view(dtype)
        for i, n in enumerate([0, 1, 5, 40_000])  # 40_000 elements: above zmq.COPY_THRESHOLD
        for dtype in sorted(ALLOWED_DTYPES)
        if dtype != "bool"
    }
    tensors = dict(list(tensors.items())[:15])
    tensors["scalar"] = np.array(True)
    sock = dealer(ctx, server.endpoint)
    request = Envelope(Kind.INFER_REQUEST, "pi-1", 41, "3f2a9c0d1e2b4a5c:2:5", times_ns={"device_send_ns": 99})
    send(sock, request, tensors)
    reply = get(sock)
    assert reply.envelope.kind is Kind.INFER_REPLY
    assert (reply.envelope.device, reply.envelope.seq, reply.envelope.partition) == (
        "pi-1",
        41,
        request.partition,
    )
    assert reply.envelope.times_ns == {"device_send_ns": 99}
    assert list(reply.tensors) == list(tensors)
    for name, sent in tensors.items():
        got = reply.tensors[name]
        assert (got.dtype, got.shape) == (sent.dtype, sent.shape)
        assert got.tobytes() == sent.tobytes(), name
    send(sock, Envelope(Kind.PING, "pi-1", 42))
    pong = get(sock)
    assert (pong.envelope.kind, pong.envelope.seq, pong.tensors) == (Kind.PONG, 42, {})
    sock.close()


IDS = ("bad-client", 7)  # what peek_ids recovers from header() when device and seq are intact
UNKNOWN = ("unknown", 0)
BAD_MESSAGES: list[tuple[str, list[bytes], tuple[str, int]]] = [
    ("bad_header", [b"\x80not json"], UNKNOWN),
    ("bad_header", [header(extra=1)], IDS),
    ("bad_header", [header(seq="7")], ("bad-client", 0)),
    ("bad_header", [header(seq=True)], ("bad-client", 0)),
    ("bad_version", [header(version=2)], IDS),
    ("bad_kind", [header(kind="train_request")], IDS),
    ("bad_device", [header(device="no spaces allowed")], ("unknown", 7)),
    ("bad_dtype", [header(tensors=[spec(dtype="complex64", nbytes=32)]), bytes(32)], IDS),
    ("bad_shape", [header(tensors=[spec(shape=[-4], nbytes=-16)]), bytes(16)], IDS),
    ("bad_shape", [header(tensors=[spec(shape=[1] * 9, nbytes=4)]), bytes(4)], IDS),
    ("size_mismatch", [header(tensors=[spec(nbytes=12)]), bytes(12)], IDS),
    ("size_mismatch", [header(tensors=[spec()]), bytes(12)], IDS),
    ("frame_count", [header(tensors=[spec()])], IDS),
    ("frame_count", [header(), bytes(16)], IDS),
    ("too_large", [header(pad="x" * 70_000)], IDS),
    ("bad_field", [header(seq=-1)], ("bad-client", 0)),
    ("bad_field", [header(tensors=[spec(), spec()]), bytes(16), bytes(16)], IDS),
    ("bad_field", [header(kind="error")], IDS),
]


def test_bad_messages_get_specific_errors_while_others_are_served(server: EchoServer, ctx: zmq.Context) -> None:
    bad = dealer(ctx, server.endpoint)
    good = dealer(ctx, server.endpoint)
    payload = np.arange(20_000, dtype=np.float32)
    for seq, (code, frames, ids) in enumerate(BAD_MESSAGES):
        bad.send_multipart(frames)
        send(good, Envelope(Kind.INFER_REQUEST, "good-client", seq), {"x": payload})
        error = get(bad).envelope
        assert error.kind is Kind.ERROR and error.error is not None
        assert error.error.code == code, (code, error.error.message)
        assert error.error.message
        assert (error.device, error.seq) == ids  # addressed with the ids recovered from the bad header
        echo = get(good)
        assert echo.envelope.seq == seq
        np.testing.assert_array_equal(echo.tensors["x"], payload)
    assert [err.code for err in server.errors] == [code for code, _, _ in BAD_MESSAGES]
    bad.close()
    good.close()


def test_recv_reports_route_and_ids(ctx: zmq.Context) -> None:
    router = ctx.socket(zmq.ROUTER)
    configure_socket(router, WireLimits())
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = dealer(ctx, f"tcp://127.0.0.1:{port}", identity=b"client-9")
    client.send_multipart([header(seq=123, tensors=[spec(dtype="int128")]), bytes(16)])
    assert router.poll(POLL_MS)
    with pytest.raises(WireError) as exc_info:
        recv(router, routed=True)
    err = exc_info.value
    assert (err.code, err.route, err.device, err.seq) == ("bad_dtype", b"client-9", "bad-client", 123)
    reply_error(router, err.route, err)
    reply = get(client).envelope
    assert reply.error is not None and reply.error.code == "bad_dtype" and reply.seq == 123
    with pytest.raises(zmq.Again):
        recv(router, routed=True, flags=zmq.NOBLOCK)
    client.close()
    router.close()


def test_reply_error_without_route(ctx: zmq.Context) -> None:
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://wire-pair")
    b.connect("inproc://wire-pair")
    b.send(b"[]")
    assert a.poll(POLL_MS)
    with pytest.raises(WireError) as exc_info:
        recv(a)
    assert exc_info.value.route is None
    reply_error(a, None, exc_info.value)
    assert get(b).envelope.error.code == "bad_header"  # type: ignore[union-attr]
    a.close()
    b.close()


def test_reply_error_fits_a_small_header_cap(ctx: zmq.Context) -> None:
    limits = WireLimits(max_header_bytes=400)
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://wire-pair-small")
    b.connect("inproc://wire-pair-small")
    b.send(header(**{"k" * 300: 1}))  # the error message quotes the unknown key
    assert a.poll(POLL_MS)
    with pytest.raises(WireError) as exc_info:
        recv(a, limits=limits)
    assert exc_info.value.code == "bad_header" and len(exc_info.value.message) > 300
    reply_error(a, None, exc_info.value, limits=limits)
    error = get(b, limits).envelope.error
    assert error is not None and error.code == "bad_header" and 0 < len(error.message) <= 100
    a.close()
    b.close()


# ----------------------------------------------------------------------------- size caps


def test_total_size_cap_rejects_multi_frame_message(ctx: zmq.Context) -> None:
    limits = WireLimits(max_message_bytes=1 << 20)
    srv = EchoServer(ctx, limits)
    try:
        client = dealer(ctx, srv.endpoint)  # default (larger) limits: the sender lets it through
        parts = {"a": np.ones(600 << 10, np.uint8), "b": np.ones(600 << 10, np.uint8)}
        assert all(p.nbytes < limits.max_message_bytes for p in parts.values())  # each frame passes MAXMSGSIZE
        send(client, Envelope(Kind.INFER_REQUEST, "big", 5), parts)
        error = get(client).envelope
        assert error.kind is Kind.ERROR and error.error is not None
        assert error.error.code == "too_large" and (error.device, error.seq) == ("big", 5)
        send(client, Envelope(Kind.INFER_REQUEST, "big", 6), {"a": parts["a"]})  # still connected
        assert get(client).envelope.seq == 6
        client.close()
    finally:
        srv.close()


def test_sender_refuses_oversize_message(tcp_server: EchoServer, ctx: zmq.Context) -> None:
    limits = WireLimits(max_message_bytes=1 << 20)
    client = dealer(ctx, tcp_server.endpoint, limits)
    with pytest.raises(MessageTooLarge) as exc_info:
        send(client, Envelope(Kind.INFER_REQUEST, "d", 1), {"x": np.zeros(1 << 20, np.uint8)}, limits=limits)
    assert exc_info.value.code == "too_large"
    send(client, Envelope(Kind.INFER_REQUEST, "d", 2), {"x": np.zeros(1000, np.uint8)}, limits=limits)
    assert get(client, limits).envelope.seq == 2  # nothing of message 1 ever reached the server
    assert tcp_server.errors == [] and tcp_server.served == 1
    client.close()


def test_frame_over_maxmsgsize_drops_only_that_peer(ctx: zmq.Context) -> None:
    srv = EchoServer(ctx, WireLimits(max_message_bytes=1 << 20))
    try:
        rogue, good = dealer(ctx, srv.endpoint), dealer(ctx, srv.endpoint)
        send(rogue, Envelope(Kind.INFER_REQUEST, "rogue", 1), {"x": np.zeros(2 << 20, np.uint8)})
        send(good, Envelope(Kind.INFER_REQUEST, "good", 2), {"x": np.zeros(10, np.uint8)})
        assert get(good).envelope.seq == 2
        assert not rogue.poll(200)  # libzmq disconnected it: no reply is possible
        rogue.close(linger=0)
        good.close()
    finally:
        srv.close()


# ----------------------------------------------------------------------------- zero-copy stress


def _content(seq: int, n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int32) * np.int32(-1640531535) + np.int32(seq)


def test_back_to_back_zero_copy_sends_arrive_intact(tcp_server: EchoServer, ctx: zmq.Context) -> None:
    count, n = 200, 64 * 1024  # 256 KiB per tensor, far above zmq.COPY_THRESHOLD
    client = dealer(ctx, tcp_server.endpoint)
    for seq in range(count):
        array = _content(seq, n)
        send(client, Envelope(Kind.INFER_REQUEST, "stress", seq), {"x": array})
        del array  # only the in-flight zmq frame keeps it alive now
        np.full(n, -559038737, dtype=np.int32)  # churn the allocator: freed memory would be reused
    for seq in range(count):
        reply = get(client)
        assert reply.envelope.seq == seq
        got = reply.tensors["x"]
        assert got.shape == (n,)
        if not np.array_equal(got, _content(seq, n)):
            bad = int(np.flatnonzero(got != _content(seq, n))[0])
            raise AssertionError(f"message {seq} corrupted from element {bad}")
    assert tcp_server.served == count
    client.close()
