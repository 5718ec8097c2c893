"""The delay line's pure core: what one direction of a link does to each packet (one-way delay, jitter, loss, a
bounded queue) and the control protocol that changes it — arrival times in, release times and drops out, no I/O
and no clock of its own. The process around it (TUN devices, select(2), the control socket) is
:mod:`testbed.net.delayline`; :func:`schedule` replays the same decisions offline. See docs/delayline.md.
"""

from __future__ import annotations

import heapq
import math
import random
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "DEFAULT_LIMIT_BYTES",
    "DEFAULT_LIMIT_PACKETS",
    "DIRECTIONS",
    "MAX_DELAY_US",
    "PPM",
    "ControlHandler",
    "Direction",
    "Impairment",
    "schedule",
]

MAX_DELAY_US = 60_000_000  # one minute
PPM = 1_000_000
DEFAULT_LIMIT_PACKETS = 10_000
DEFAULT_LIMIT_BYTES = 64 * 2**20
DIRECTIONS = ("uplink", "downlink")


# --------------------------------------------------------------------------------------------------------------
# Pure core
# --------------------------------------------------------------------------------------------------------------


def _as_int(key: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key} must be finite, got {value!r}")
        value = round(value)
    if not lo <= value <= hi:
        raise ValueError(f"{key} must be in [{lo}, {hi}], got {value}")
    return int(value)


@dataclass(frozen=True)
class Impairment:
    """What one direction of a link does to each packet: one-way delay, jitter (uniform ±jitter_us), random loss."""

    delay_us: int = 0
    jitter_us: int = 0
    loss_ppm: int = 0

    def __post_init__(self) -> None:
        for key, hi in (("delay_us", MAX_DELAY_US), ("jitter_us", MAX_DELAY_US), ("loss_ppm", PPM)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
                raise ValueError(f"{key} must be an integer in [0, {hi}], got {value!r}")

    @classmethod
    def from_dict(cls, data: object, base: Impairment | None = None) -> Impairment:
        """Parse {"delay_us", "jitter_us", "loss_ppm"}; keys left out keep their value in `base` (default 0)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an impairment is a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"delay_us", "jitter_us", "loss_ppm"}
        if unknown:
            raise ValueError(f"unknown impairment keys {sorted(unknown)} (known: delay_us, jitter_us, loss_ppm)")
        merged = asdict(base or cls())
        limits = {"delay_us": MAX_DELAY_US, "jitter_us": MAX_DELAY_US, "loss_ppm": PPM}
        for key, value in data.items():
            merged[key] = _as_int(key, value, 0, limits[key])
        return cls(**merged)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Direction:
    """One direction of the delay line: decides each packet's fate and holds it until its release time.

    Pure: the caller passes the clock (`arrival_ns`, `now_ns`, any monotonic nanoseconds). Loss is drawn first,
    then the queue limit, then the release time. Two seeded RNG streams per direction (loss, jitter), so turning
    jitter on does not change which packets are lost. `impairment` may be replaced at any time; it applies to
    packets arriving afterwards, queued packets keep their release times (and, in order-keeping mode, packets
    arriving later never overtake them).
    """

    def __init__(
        self,
        name: str,
        impairment: Impairment,
        seed: int = 0,
        *,
        reorder: bool = False,
        limit_packets: int = DEFAULT_LIMIT_PACKETS,
        limit_bytes: int = DEFAULT_LIMIT_BYTES,
    ) -> None:
        if limit_packets < 1 or limit_bytes < 1:
            raise ValueError("queue limits must be positive")
        self.name = name
        self.impairment = impairment
        self.reorder = reorder
        self.limit_packets = limit_packets
        self.limit_bytes = limit_bytes
        # str seeds are hashed with SHA-512 by `random`: reproducible across runs and interpreters.
        self._loss_rng = random.Random(f"{seed}:{name}:loss")
        self._jitter_rng = random.Random(f"{seed}:{name}:jitter")
        self._fifo: deque[tuple[int, bytes, int]] = deque()
        self._heap: list[tuple[int, int, bytes, int]] = []
        self._seq = 0
        self._last_release_ns = -(2**62)
        self.packets_in = 0
        self.bytes_in = 0
        self.packets_out = 0
        self.bytes_out = 0
        self.drops_loss = 0
        self.drops_queue = 0
        self.drops_write = 0
        self.queue_bytes = 0
        self.queue_peak_packets = 0
        self.late_ns_total = 0  # Σ (time of pop_due − release time): how late the shell released packets
        self.late_ns_max = 0

    # -- deciding --------------------------------------------------------------------------------------------
    def admit(self, arrival_ns: int, size: int) -> int | None:
        """Count a packet of `size` bytes arriving at `arrival_ns`; return its release time, or None if dropped."""
        imp = self.impairment  # one snapshot per packet: a concurrent change applies to whole packets
        self.packets_in += 1
        self.bytes_in += size
        if imp.loss_ppm and self._loss_rng.randrange(PPM) < imp.loss_ppm:
            self.drops_loss += 1
            return None
        if self.queue_packets >= self.limit_packets or self.queue_bytes + size > self.limit_bytes:
            self.drops_queue += 1
            return None
        delay_ns = imp.delay_us * 1000
        if imp.jitter_us:
            delay_ns += round((2.0 * self._jitter_rng.random() - 1.0) * imp.jitter_us * 1000)
        release = arrival_ns + max(delay_ns, 0)
        if not self.reorder:
            release = max(release, self._last_release_ns)
            self._last_release_ns = release
        return release

    # -- holding ---------------------------------------------------------------------------------------------
    def push(self, arrival_ns: int, packet: bytes, size: int | None = None) -> int | None:
        """Admit `packet` and queue it; return its release time or None if dropped. `size`: bytes to count."""
        n = len(packet) if size is None else size
        release = self.admit(arrival_ns, n)
        if release is None:
            return None
        if self.reorder:
            self._seq += 1
            heapq.heappush(self._heap, (release, self._seq, packet, n))
        else:
            self._fifo.append((release, packet, n))
        self.queue_bytes += n
        self.queue_peak_packets = max(self.queue_peak_packets, self.queue_packets)
        return release

    @property
    def queue_packets(self) -> int:
        return len(self._heap) if self.reorder else len(self._fifo)

    def next_release_ns(self) -> int | None:
        if self.reorder:
            return self._heap[0][0] if self._heap else None
        return self._fifo[0][0] if self._fifo else None

    def pop_due(self, now_ns: int) -> list[tuple[bytes, int]]:
        """Remove and return (packet, size) for every packet whose release time is ≤ now_ns, in release order."""
        out: list[tuple[bytes, int]] = []
        late_max = self.late_ns_max
        if self.reorder:
            heap = self._heap
            while heap and heap[0][0] <= now_ns:
                release, _, packet, n = heapq.heappop(heap)
                out.append((packet, n))
                self.queue_bytes -= n
                self.late_ns_total += now_ns - release
                late_max = max(late_max, now_ns - release)
        else:
            fifo = self._fifo
            while fifo and fifo[0][0] <= now_ns:
                release, packet, n = fifo.popleft()
                out.append((packet, n))
                self.queue_bytes -= n
                self.late_ns_total += now_ns - release
                late_max = max(late_max, now_ns - release)
        self.late_ns_max = late_max
        return out

    def sent(self, size: int) -> None:
        self.packets_out += 1
        self.bytes_out += size

    def write_failed(self) -> None:
        self.drops_write += 1

    def stats(self) -> dict[str, int | float]:
        released = self.packets_out + self.drops_write
        return {
            "packets_in": self.packets_in,
            "bytes_in": self.bytes_in,
            "packets_out": self.packets_out,
            "bytes_out": self.bytes_out,
            "drops_loss": self.drops_loss,
            "drops_queue": self.drops_queue,
            "drops_write": self.drops_write,
            "queue_packets": self.queue_packets,
            "queue_bytes": self.queue_bytes,
            "queue_peak_packets": self.queue_peak_packets,
            "release_late_us_mean": round(self.late_ns_total / released / 1000, 1) if released else 0.0,
            "release_late_us_max": round(self.late_ns_max / 1000, 1),
        }


def schedule(
    arrivals_ns: Sequence[int],
    impairment: Impairment,
    seed: int = 0,
    *,
    sizes: Sequence[int] | None = None,
    reorder: bool = False,
    limit_packets: int = DEFAULT_LIMIT_PACKETS,
    limit_bytes: int = DEFAULT_LIMIT_BYTES,
    name: str = "uplink",
) -> list[int | None]:
    """Release time (ns) of each packet, None where dropped. Packets leave the queue at their release times.

    The same function of (arrivals, impairment, seed, name) as the running delay line, so a replay is exact.
    """
    d = Direction(name, impairment, seed, reorder=reorder, limit_packets=limit_packets, limit_bytes=limit_bytes)
    out: list[int | None] = []
    for i, t in enumerate(arrivals_ns):
        d.pop_due(t)  # packets due by now have left the queue (what the live loop does before it reads)
        out.append(d.push(t, b"", 1500 if sizes is None else sizes[i]))
    return out


class ControlHandler:
    """The control protocol, without the socket: one JSON request object in, one reply object out.

    Requests:
      {"cmd": "set", "uplink": {...}, "downlink": {...}}  change impairments; either direction may be left out,
          and keys left out keep their value ("cmd" may be omitted when "uplink" or "downlink" is present).
      {"cmd": "get"}    current impairments.
      {"cmd": "stats"}  counters and queue per direction.
    Replies: {"ok": true, ...} or {"ok": false, "error": "..."}.
    """

    def __init__(self, uplink: Direction, downlink: Direction, clock: Any = time.monotonic) -> None:
        self.directions = {"uplink": uplink, "downlink": downlink}
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()

    def impairments(self) -> dict[str, dict[str, int]]:
        return {k: d.impairment.to_dict() for k, d in self.directions.items()}

    def handle(self, request: object) -> dict[str, Any]:
        try:
            return {"ok": True, **self._handle(request)}
        except (ValueError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}

    def _handle(self, request: object) -> dict[str, Any]:
        if not isinstance(request, Mapping):
            raise ValueError("a request is a JSON object")
        cmd = request.get("cmd")
        if cmd is None and any(k in request for k in DIRECTIONS):
            cmd = "set"
        if cmd == "stats":
            self._only(request, {"cmd"})
            out: dict[str, Any] = {k: {**d.stats(), **d.impairment.to_dict()} for k, d in self.directions.items()}
            out["uptime_s"] = round(self._clock() - self._started, 3)
            return out
        if cmd == "get":
            self._only(request, {"cmd"})
            return self.impairments()
        if cmd == "set":
            self._only(request, {"cmd", *DIRECTIONS})
            with self._lock:  # validate both directions before changing either
                new = {
                    k: Impairment.from_dict(request[k], self.directions[k].impairment)
                    for k in DIRECTIONS
                    if k in request
                }
                for k, imp in new.items():
                    self.directions[k].impairment = imp
            return self.impairments()
        raise ValueError(f"unknown cmd {cmd!r} (set, get, stats)")

    @staticmethod
    def _only(request: Mapping[str, object], allowed: set[str]) -> None:
        unknown = set(request) - allowed
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
