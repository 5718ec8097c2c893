"""The link profiler against a real edge process on loopback (and a stand-in edge that echoes PING payloads)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import zmq
from typer.testing import CliRunner

from testbed.cli.errors import friendly_errors
from testbed.cli.profile import profile as profile_command
from testbed.profiling.links import burst_bytes, empty_body_echo, fit_rate_bps, fit_tail_line, measure_link
from testbed.profiling.records import ProfileError
from testbed.profiling.store import load_link_measurement
from testbed.wire import channel
from testbed.wire.envelope import Envelope, Kind

SIZES = (64 * 1024, 1024 * 1024, 4 * 1024 * 1024)
HOST = {"hostname": "testhost"}


def test_fit_rate() -> None:
    # 1 ms fixed + 8 bits per byte at 1 Mbit/s.
    sizes = [0, 1000, 5000, 20000]
    assert fit_rate_bps(sizes, [1e-3 + s * 8 / 1e6 for s in sizes]) == pytest.approx(1e6)
    assert fit_rate_bps([0, 10], [1.0, 1.0]) == float("inf")
    with pytest.raises(ProfileError):
        fit_rate_bps([5], [1.0])


def test_token_bucket_burst_and_rate_from_the_largest_sizes() -> None:
    """A shaped link passes a message's first `burst` bytes at no cost: t(n) = t0 + max(0, n - burst) * 8 / rate.
    The line through the two largest sizes gives the rate; its intercept below t0 the burst."""
    t0, rate, burst = 6.8e-3, 214e6, 36_000

    def t(n: int) -> float:
        return t0 + max(0, n - burst) * 8 / rate

    sizes = [16_384, 131_072, 524_288]
    line = fit_tail_line(sizes, [t(n) for n in sizes])
    assert line is not None and 8 / line[0] == pytest.approx(rate)
    assert burst_bytes(t0, line, ceiling=131_072) == pytest.approx(burst, abs=1)
    # A least-squares line through the empty message and every size (the rate before) overstates the rate.
    assert fit_rate_bps([0, *sizes], [t0, *(t(n) for n in sizes)]) > rate * 1.02
    # No bucket: no burst; a burst never exceeds the second largest size; noise (a falling slope) gives no line.
    plain = [t0 + n * 8 / rate for n in sizes]
    assert burst_bytes(t0, fit_tail_line(sizes, plain), ceiling=131_072) == 0
    assert burst_bytes(1.0, (1e-9, 0.0), ceiling=1000) == 1000
    assert fit_tail_line(sizes, [3.0, 2.0, 1.0]) is None and fit_tail_line([4096], [1.0]) is None


def test_uplink_and_round_trip_against_the_edge(edge_server) -> None:
    link = measure_link(edge_server.endpoint, sizes=SIZES, count=6, warmup=1, host=HOST)
    # The edge echoes a PING's "echo" tensor in its PONG, so the downlink is measured too.
    assert link.downlink_method == "ping-echo" and link.echo_rtt is not None
    assert link.downlink_bps is not None and 1e8 < link.downlink_bps < 1e13, link.notes
    assert 0 < link.rtt.median < 0.1 and link.delay_s == link.rtt.median / 2
    assert link.sizes == SIZES and [s.n for s in link.uplink_rtt] == [6, 6, 6]
    assert link.uplink_rtt[-1].median > link.rtt.median
    # Loopback: well above 100 Mbit/s, well below 10 Tbit/s.
    assert 1e8 < link.uplink_bps < 1e13
    assert edge_server.proc.poll() is None


def test_downlink_through_an_empty_body(edge_server, cnn_weights) -> None:
    echo = empty_body_echo(cnn_weights.model, cnn_weights.weights_hash)
    assert echo.partition.endswith(":2:2") and echo.sample_shape == (32, 28, 28)
    link = measure_link(edge_server.endpoint, sizes=SIZES, count=8, warmup=1, echo=echo, host=HOST,
                        probe_ping_echo=False)
    assert link.downlink_method == "empty-body" and link.echo_rtt is not None
    assert all(s % echo.sample_bytes == 0 for s in link.sizes)
    assert link.downlink_bps is not None and 1e8 < link.downlink_bps < 1e13, link.notes


def test_edge_request_handling_against_the_edge(edge_server, cnn_weights) -> None:
    """With a PING echo and the weights, each round also times an empty-body request of one sample and a PING
    echo of the same bytes; the edge's request handling is the excess of the first over the second."""
    echo = empty_body_echo(cnn_weights.model, cnn_weights.weights_hash)
    link = measure_link(edge_server.endpoint, sizes=SIZES[:2], count=6, warmup=1, echo=echo, host=HOST)
    assert link.downlink_method == "ping-echo" and link.sizes == SIZES[:2]  # rate sizes as asked
    assert link.request_bytes == echo.sample_bytes
    assert link.request_rtt is not None and link.request_echo_rtt is not None
    assert link.request_rtt.n == link.request_echo_rtt.n == 6
    # Taken on the edge's own clock (the edge stamps both replies): the time inside the edge, no link in it.
    assert link.request_residence is not None and link.request_echo_residence is not None
    assert link.request_residence.n == link.request_echo_residence.n == 6
    assert link.edge_request_s == pytest.approx(
        max(0.0, link.request_residence.median - link.request_echo_residence.median))
    # The request waits for the compute thread and the PONG does not: its residence is the longer, and both are
    # within the whole round trips that contain them.
    assert link.request_residence.median > link.request_echo_residence.median
    assert link.request_residence.median < link.request_rtt.median
    assert link.request_echo_residence.median < link.request_echo_rtt.median
    # Without the weights, no request can be sent: not measured, and the note says why.
    plain = measure_link(edge_server.endpoint, sizes=SIZES[:2], count=3, warmup=0, host=HOST)
    assert plain.edge_request_s is None and plain.request_rtt is None and "--weights" in plain.notes
    assert edge_server.proc.poll() is None


def test_wrong_weights_are_reported(edge_server, cnn_weights) -> None:
    echo = empty_body_echo(cnn_weights.model, "0" * 64)
    with pytest.raises(ProfileError, match="unknown_weights"):
        measure_link(edge_server.endpoint, sizes=SIZES[:2], count=3, warmup=0, echo=echo, host=HOST,
                     probe_ping_echo=False)


def test_time_budget_is_kept(edge_server) -> None:
    with pytest.raises(ProfileError, match="time budget"):
        measure_link(edge_server.endpoint, sizes=SIZES[:2], count=50, warmup=0, budget_s=1e-6, host=HOST)


def test_no_edge_times_out_quickly() -> None:
    with pytest.raises(ProfileError, match="no reply"):
        measure_link("tcp://127.0.0.1:9", count=3, timeout_s=0.2, host=HOST)
    with pytest.raises(ProfileError, match="cannot connect"):
        measure_link("nonsense://x", count=3, timeout_s=0.2, host=HOST)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"count": 0}, "count"),
    ({"sizes": []}, "sizes"),
    ({"sizes": [0, 10]}, "sizes"),
    ({"sizes": ["1MiB"]}, "sizes"),
    ({"sizes": [2**40]}, "message cap"),
    ({"timeout_s": 0}, "timeout_s"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        measure_link("tcp://127.0.0.1:9", host=HOST, **kwargs)


@pytest.fixture
def echoing_edge() -> Iterator[str]:
    """A stand-in for the edge with the proposed change: a PONG carries a PING's ``echo`` tensor back."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not sock.poll(50):
                continue
            route, msg = channel.recv(sock, routed=True)
            echo = {k: v for k, v in msg.tensors.items() if k == "echo"}
            reply = Envelope(Kind.PONG, msg.envelope.device, msg.envelope.seq)
            channel.send(sock, reply, echo, route=route)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        stop.set()
        thread.join(5)
        sock.close(linger=0)
        ctx.term()
    assert not thread.is_alive()


def test_downlink_through_ping_echo(echoing_edge: str) -> None:
    link = measure_link(echoing_edge, sizes=SIZES, count=8, warmup=1, host=HOST)
    assert link.downlink_method == "ping-echo" and link.sizes == SIZES and link.echo_rtt is not None
    assert link.echo_rtt[-1].median > link.uplink_rtt[0].median
    # The stand-in serves from a thread of this process (it shares the GIL with the profiler), so on a loaded
    # machine the 1.3 ms an echo adds at 4 MiB can drown in noise; the profiler then says so rather than guess.
    if link.downlink_bps is None:
        assert "noise" in link.notes
    else:
        assert link.downlink_bps > 1e8


def test_cli_measures_the_link(edge_server, cnn_weights, tmp_path: Path) -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("profile")(friendly_errors(profile_command))
    app.command("other")(lambda: None)
    out = tmp_path / "link.yaml"
    result = CliRunner().invoke(app, [
        "profile", "--no-blocks", "--edge", edge_server.endpoint, "--weights", str(cnn_weights.path),
        "--link-size", "64KiB", "--link-size", "4MiB", "--link-count", "6", "--link-out", str(out),
    ], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "uplink" in result.output and "ping-echo" in result.output and str(out) in result.output
    assert "edge request handling" in result.output
    link = load_link_measurement(out)
    assert link.endpoint == edge_server.endpoint and link.uplink_bps > 0 and len(link.sizes) == 2
    # --weights and an edge that echoes PINGs: the edge's request handling is measured too, and stored.
    assert link.edge_request_s is not None and link.request_rtt is not None
