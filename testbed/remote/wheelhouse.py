"""The wheelhouse the Ansible roles install from: the project's wheel and its dependencies, built on the controller.

Hosts install with `pip install --no-index --find-links` from their copy, so a lab without internet works. For
hosts of another CPU (a Pi's aarch64 from an x86 controller) the dependencies are downloaded as binary wheels for
that platform and Python version; the project's own wheel is pure Python.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from testbed.remote.errors import RemoteError

EXTRAS = ("agent", "edge")


def wheelhouse_commands(repo: Path, out: Path, extra: str = "agent", platform: str | None = None,
                        python_version: str | None = None, python: str = sys.executable) -> list[list[str]]:
    """The pip commands (pure)."""
    if extra not in EXTRAS:
        raise RemoteError(f"--extra must be one of {', '.join(EXTRAS)}, not {extra!r}")
    pip = [python, "-m", "pip"]
    if platform is None and python_version is None:
        return [[*pip, "wheel", "--wheel-dir", str(out), f"{repo}[{extra}]"]]
    target = ["--only-binary=:all:"]
    if platform:
        target += ["--platform", platform]
    if python_version:
        target += ["--python-version", python_version]
    return [[*pip, "wheel", "--no-deps", "--wheel-dir", str(out), str(repo)],
            [*pip, "download", *target, "--dest", str(out), "--find-links", str(out),
             f"edge-split-testbed[{extra}]"]]


def build_wheelhouse(repo: Path, out: Path, extra: str = "agent", platform: str | None = None,
                     python_version: str | None = None, timeout_s: float = 1800) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("edge_split_testbed-*.whl"):
        old.unlink()  # the project's wheel keeps its version between builds: never keep a stale one
    for argv in wheelhouse_commands(repo, out, extra, platform, python_version):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise RemoteError(f"building the wheelhouse failed ({' '.join(argv[2:4])}): "
                              f"{(result.stderr or result.stdout).strip()[-800:]}")
    return sorted(out.glob("*.whl"))
