"""Benchmark the wire protocol against raw pyzmq and against length-prefixed pickle over TCP.

Not a test. Three transports move one float32 tensor over loopback TCP (127.0.0.1, ephemeral
ports) to a server in a separate (spawned) process, so the GIL does not serialize the two ends:

* ``wire``: :func:`testbed.wire.send`/:func:`testbed.wire.recv`, DEALER -> ROUTER; the server
  validates every message and, in echo mode, replies with the same (zero-copy) tensor.
* ``raw_zmq``: one zero-copy pyzmq frame with no header and no validation, the ceiling.
* ``pickle_tcp``: a 4-byte length prefix plus ``pickle.dumps`` over a plain TCP socket, which is
  what most published split-learning testbeds do.

Throughput is one-way streaming (bytes/s until the receiver acknowledges the last message);
latency is the echo round trip. Cases are interleaved over ``--repeats`` rounds because the
machine is shared; the table reports the median throughput and the median/p95 of all round trips.

    python bench/wire_bench.py --sizes 64K,1M,16M --seconds 1 --json runs/wire_bench.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os

# pickle is used ONLY here, for the pickle-over-TCP baseline; each server unpickles only data
# produced by its own parent process on loopback. The wire itself never uses pickle.
import pickle
import platform
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import zmq

from testbed.wire import Envelope, Kind, WireLimits, configure_socket, recv, send

METHODS = ("wire", "raw_zmq", "pickle_tcp")
LIMITS = WireLimits(max_message_bytes=1 << 30)
POLL_MS = 60_000  # no wait in this benchmark may last longer than this
STOP = "stop"
EXIT = "exit"
_LEN = struct.Struct("!I")
_PICKLE_CONTROL = 0xFFFFFFFF  # length prefix value announcing a control message


def parse_size(text: str) -> int:
    """'64K' -> 65536, '1M' -> 1048576, '123' -> 123."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human(size: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}iB"
    return f"{size} B"


# Queued messages per pipe, both directions. Bounds receiver memory (32 x 16 MiB) while leaving
# plenty in flight; set before bind/connect because libzmq applies it when a pipe is created.
HWM = 32


# ----------------------------------------------------------------------------- servers


def _zmq_server(method: str, conn: Connection) -> None:
    ctx = zmq.Context()
    socks = {}
    for mode in ("stream", "echo"):
        sock = ctx.socket(zmq.ROUTER)
        configure_socket(sock, LIMITS, linger_ms=2000)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.setsockopt(zmq.SNDHWM, HWM)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        socks[mode] = (sock, port)
    conn.send({mode: port for mode, (_, port) in socks.items()})
    poller = zmq.Poller()
    for sock, _ in socks.values():
        poller.register(sock, zmq.POLLIN)
    counts = {"messages": 0, "bytes": 0}
    running = True
    while running:
        for sock, _ in poller.poll():
            mode = "stream" if sock is socks["stream"][0] else "echo"
            if method == "wire":
                route, msg = recv(sock, limits=LIMITS, routed=True)
                env = msg.envelope
                if env.kind is Kind.PING:
                    running = env.partition != EXIT
                    times = {"count": counts["messages"], "nbytes": counts["bytes"]}
                    send(sock, Envelope(Kind.PONG, "server", env.seq, times_ns=times), route=route)
                    counts = {"messages": 0, "bytes": 0}
                elif mode == "echo":
                    send(sock, Envelope(Kind.INFER_REPLY, "server", env.seq), msg.tensors, route=route)
                else:
                    counts["messages"] += 1
                    counts["bytes"] += sum(a.nbytes for a in msg.tensors.values())
            else:
                route_frame, payload = sock.recv_multipart(copy=False)
                if len(payload) == 0 or (len(payload) == len(EXIT) and payload.bytes == EXIT.encode()):
                    running = len(payload) == 0
                    reply = struct.pack("!QQ", counts["messages"], counts["bytes"])
                    sock.send_multipart([route_frame, reply])
                    counts = {"messages": 0, "bytes": 0}
                elif mode == "echo":
                    sock.send_multipart([route_frame, payload], copy=False)
                else:
                    counts["messages"] += 1
                    counts["bytes"] += len(payload)
    for sock, _ in socks.values():
        sock.close(linger=2000)
    ctx.term()


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed")
        got += k
    return buf


def _pickle_server(conn: Connection) -> None:
    listeners = {}
    for mode in ("stream", "echo"):
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        listeners[mode] = lst
    conn.send({mode: lst.getsockname()[1] for mode, lst in listeners.items()})
    # The client opens the stream connection first, then the echo one; each lives for the whole run.
    peers = {mode: listeners[mode].accept()[0] for mode in ("stream", "echo")}
    for peer in peers.values():
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer.settimeout(POLL_MS / 1000)
    import selectors

    sel = selectors.DefaultSelector()
    for mode, peer in peers.items():
        sel.register(peer, selectors.EVENT_READ, mode)
    messages = nbytes = 0
    running = True
    while running:
        for key, _ in sel.select():
            mode, peer = key.data, key.fileobj
            assert isinstance(peer, socket.socket)
            (n,) = _LEN.unpack(_recv_exact(peer, 4))
            if n == _PICKLE_CONTROL:
                running = _recv_exact(peer, 1) != b"x"
                peer.sendall(struct.pack("!QQ", messages, nbytes))
                messages = nbytes = 0
                continue
            array = pickle.loads(_recv_exact(peer, n))  # noqa: S301  (our own data, see import)
            if mode == "echo":
                data = pickle.dumps(array)
                peer.sendall(_LEN.pack(len(data)))
                peer.sendall(data)
            else:
                messages += 1
                nbytes += array.nbytes
    for peer in peers.values():
        peer.close()


def server_main(method: str, conn: Connection) -> None:
    """Entry point of the spawned server process."""
    if method == "pickle_tcp":
        _pickle_server(conn)
    else:
        _zmq_server(method, conn)


# ----------------------------------------------------------------------------- clients


class Client:
    """One transport's client end: a streaming connection and an echo connection."""

    def __init__(self, method: str, ports: dict[str, int], ctx: zmq.Context) -> None:
        self.method = method
        self.socks: dict[str, Any] = {}
        for mode in ("stream", "echo"):
            if method == "pickle_tcp":
                sock = socket.create_connection(("127.0.0.1", ports[mode]), timeout=POLL_MS / 1000)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = ctx.socket(zmq.DEALER)
                configure_socket(sock, LIMITS, linger_ms=2000)
                sock.setsockopt(zmq.RCVHWM, HWM)
                sock.setsockopt(zmq.SNDHWM, HWM)
                sock.connect(f"tcp://127.0.0.1:{ports[mode]}")
            self.socks[mode] = sock

    def _wait(self, sock: zmq.Socket) -> None:
        if not sock.poll(POLL_MS, zmq.POLLIN):
            raise TimeoutError(f"{self.method}: no reply within {POLL_MS} ms")

    def send_one(self, mode: str, array: np.ndarray, seq: int) -> None:
        sock = self.socks[mode]
        if self.method == "wire":
            send(sock, Envelope(Kind.INFER_REQUEST, "bench", seq), {"x": array}, limits=LIMITS)
        elif self.method == "raw_zmq":
            sock.send(array, copy=False)
        else:
            data = pickle.dumps(array)
            sock.sendall(_LEN.pack(len(data)))
            sock.sendall(data)

    def recv_one(self, mode: str) -> np.ndarray:
        sock = self.socks[mode]
        if self.method == "wire":
            self._wait(sock)
            _, msg = recv(sock, limits=LIMITS)
            return msg.tensors["x"]
        if self.method == "raw_zmq":
            self._wait(sock)
            frame = sock.recv(copy=False)
            return np.frombuffer(frame, dtype=np.float32)
        (n,) = _LEN.unpack(_recv_exact(sock, 4))
        return pickle.loads(_recv_exact(sock, n))  # noqa: S301  (our own data, see import)

    def control(self, mode: str, *, exit_: bool = False) -> tuple[int, int]:
        """Ask the server for (messages, bytes) received since the last control message."""
        sock = self.socks[mode]
        if self.method == "wire":
            send(sock, Envelope(Kind.PING, "bench", 0, EXIT if exit_ else STOP))
            self._wait(sock)
            _, msg = recv(sock, limits=LIMITS)
            return msg.envelope.times_ns["count"], msg.envelope.times_ns["nbytes"]
        if self.method == "raw_zmq":
            sock.send(EXIT.encode() if exit_ else b"")
            self._wait(sock)
            count, nbytes = struct.unpack("!QQ", sock.recv())
            return count, nbytes
        sock.sendall(_LEN.pack(_PICKLE_CONTROL) + (b"x" if exit_ else b"s"))
        count, nbytes = struct.unpack("!QQ", _recv_exact(sock, 16))
        return count, nbytes

    def close(self) -> None:
        for sock in self.socks.values():
            if isinstance(sock, socket.socket):
                sock.close()
            else:
                sock.close(linger=2000)


def measure_throughput(client: Client, array: np.ndarray, seconds: float) -> float:
    """One-way streaming rate in bytes/s; bounded by time and by a message count."""
    max_messages = max(3, int(seconds * 20e9 / array.nbytes))  # nothing here beats 20 GB/s
    start = time.perf_counter()
    deadline = start + seconds
    sent = 0
    while sent < max_messages and (sent < 3 or time.perf_counter() < deadline):
        client.send_one("stream", array, sent)
        sent += 1
    count, nbytes = client.control("stream")
    elapsed = time.perf_counter() - start
    if count != sent or nbytes != sent * array.nbytes:
        raise RuntimeError(f"{client.method}: sent {sent} messages, server counted {count} ({nbytes} bytes)")
    return sent * array.nbytes / elapsed


def measure_latency(client: Client, array: np.ndarray, seconds: float) -> list[float]:
    """Echo round-trip times in seconds; bounded by time and by a sample count."""
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(samples) < 100_000 and (len(samples) < 5 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        client.send_one("echo", array, len(samples))
        reply = client.recv_one("echo")
        samples.append(time.perf_counter() - t0)
        if len(samples) == 1 and not np.array_equal(reply.reshape(-1), array.reshape(-1)):
            raise RuntimeError(f"{client.method}: echo corrupted the tensor")
    return samples


# ----------------------------------------------------------------------------- driver


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "numpy": np.__version__,
    }


def run(sizes: list[int], seconds: float, repeats: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    zctx = zmq.Context()
    servers: list[mp.process.BaseProcess] = []
    clients: dict[str, Client] = {}
    try:
        for method in METHODS:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=server_main, args=(method, child), daemon=True)
            proc.start()
            servers.append(proc)
            if not parent.poll(60):
                raise TimeoutError(f"{method} server did not start")
            clients[method] = Client(method, parent.recv(), zctx)
        rates: dict[tuple[str, int], list[float]] = {}
        rtts: dict[tuple[str, int], list[float]] = {}
        rng = np.random.default_rng(0)
        arrays = {size: rng.standard_normal(size // 4, dtype=np.float32) for size in sizes}
        for rep in range(repeats):
            for size in sizes:
                for method in METHODS:
                    client, array = clients[method], arrays[size]
                    rate = measure_throughput(client, array, seconds)
                    samples = measure_latency(client, array, seconds / 2)
                    rates.setdefault((method, size), []).append(rate)
                    rtts.setdefault((method, size), []).extend(samples)
                    log(
                        f"round {rep + 1}/{repeats} {human(size):>8} {method:<10} "
                        f"{rate / 1e9:6.2f} GB/s  rtt median {statistics.median(samples) * 1e3:.3f} ms"
                    )
        for client in clients.values():
            client.control("stream", exit_=True)
            client.close()
    finally:
        for proc in servers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        zctx.term()
    results = []
    for size in sizes:
        for method in METHODS:
            samples = sorted(rtts[(method, size)])
            results.append(
                {
                    "method": method,
                    "size_bytes": size,
                    "throughput_gbps_runs": [r / 1e9 for r in rates[(method, size)]],
                    "throughput_gbps": statistics.median(rates[(method, size)]) / 1e9,
                    "rtt_median_ms": statistics.median(samples) * 1e3,
                    "rtt_p95_ms": samples[min(len(samples) - 1, int(0.95 * len(samples)))] * 1e3,
                    "rtt_samples": len(samples),
                }
            )
    return results


def table(results: list[dict[str, Any]]) -> str:
    raw = {r["size_bytes"]: r["throughput_gbps"] for r in results if r["method"] == "raw_zmq"}
    lines = [
        "| size | transport | throughput (GB/s) | % of raw zmq | RTT median (ms) | RTT p95 (ms) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        share = 100 * r["throughput_gbps"] / raw[r["size_bytes"]]
        lines.append(
            f"| {human(r['size_bytes'])} | {r['method']} | {r['throughput_gbps']:.2f} | {share:.0f}% "
            f"| {r['rtt_median_ms']:.3f} | {r['rtt_p95_ms']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64K,1M,16M", help="comma-separated tensor sizes, e.g. 64K,1M,16M")
    parser.add_argument("--seconds", type=float, default=1.0, help="streaming time per case and round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if any(s < 4 or s % 4 for s in sizes):
        parser.error("sizes must be positive multiples of 4 bytes (float32)")
    info = machine_info()
    print(" ".join(f"{k}={v}" for k, v in info.items()), file=sys.stderr)
    results = run(sizes, args.seconds, args.repeats, lambda line: print(line, file=sys.stderr, flush=True))
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": info, "args": vars(args), "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
