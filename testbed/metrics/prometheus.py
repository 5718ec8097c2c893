"""A local Prometheus server for one run, and the two HTTP API calls the testbed needs.

Thin shell around the `prometheus` binary (Debian's package): a config file and a TSDB directory
under a `tb-` temporary directory, loopback only, a bounded start wait, stopped by its pid.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.lifecycle import die_with_parent


class PrometheusError(TestbedError):
    """Prometheus is missing, did not start, or answered a query with an error."""


def _child_setup() -> None:
    die_with_parent(sig=signal.SIGTERM)  # a crashed test or run must not leave Prometheus behind


@dataclass
class LocalPrometheus:
    """`with LocalPrometheus(config_yaml, port) as prom: prom.query_range(...)`."""

    config_yaml: str
    port: int
    binary: str = "prometheus"
    start_timeout_s: float = 30.0
    workdir: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _tmp: Path | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalPrometheus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        exe = shutil.which(self.binary)
        if exe is None:
            raise PrometheusError(f"{self.binary} not found: install Debian's prometheus package")
        self._tmp = Path(tempfile.mkdtemp(prefix="tb-prom-", dir=self.workdir))
        config = self._tmp / "tb-prometheus.yml"
        config.write_text(self.config_yaml)
        log = open(self._tmp / "tb-prometheus.log", "wb")  # noqa: SIM115 (the child owns it)
        try:
            self.proc = subprocess.Popen(
                [exe, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{self.port}",
                 f"--storage.tsdb.path={self._tmp / 'tb-tsdb'}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_child_setup,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise PrometheusError(f"prometheus was not ready within {self.start_timeout_s:.0f} s")

    def log_tail(self, lines: int = 20) -> str:
        if self._tmp is None:
            return ""
        try:
            text = (self._tmp / "tb-prometheus.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def api(self, path: str, params: dict[str, str]) -> Any:
        """GET /api/v1/<path>; returns `data` or raises PrometheusError with Prometheus's own message."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise PrometheusError(f"prometheus API {path}: {exc}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"prometheus API {path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        return self.api("query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                        "step": f"{step_s:g}"})["result"]

    def targets_up(self) -> dict[str, bool]:
        """scrape URL -> whether its last scrape succeeded."""
        data = self.api("targets", {"state": "active"})
        return {t["scrapeUrl"]: t["health"] == "up" for t in data["activeTargets"]}


def finite_values(result: Sequence[dict[str, Any]]) -> int:
    """How many finite (not NaN/Inf) samples a query_range result holds."""
    return sum(1 for series in result for _, v in series.get("values", []) if math.isfinite(float(v)))
