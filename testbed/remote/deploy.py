"""Partitions (ONNX heads and tails, or any file) onto a host by SFTP, each checked by sha256 on the host.

A file is uploaded under a temporary name, hashed there with `sha256sum`, and renamed into place only if the
hash is the one expected (the local file's, or the one a manifest gave): a truncated or corrupted upload never
replaces a good file.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.remote.errors import DeployError

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")


@dataclass(frozen=True)
class Deployed:
    name: str
    remote_path: str
    sha256: str
    bytes: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remote_hashes(conn: Any, paths: Sequence[str]) -> dict[str, str | None]:
    """sha256 of each remote path (None when missing), by one `sha256sum` on the host."""
    if not paths:
        return {}
    script = "for f in " + " ".join(shlex.quote(p) for p in paths) + \
        '; do if [ -f "$f" ]; then sha256sum "$f"; else echo "- $f"; fi; done'
    out = conn.run(["sh", "-c", script], timeout_s=300).stdout
    found: dict[str, str | None] = {p: None for p in paths}
    for line in out.splitlines():
        digest, _, path = line.partition("  ") if "  " in line else line.partition(" ")
        if path in found and re.fullmatch(r"[0-9a-f]{64}", digest):
            found[path] = digest
    return found


def deploy_files(conn: Any, files: Sequence[Path], remote_dir: str,
                 expected: Mapping[str, str] | None = None) -> list[Deployed]:
    """Upload `files` into `remote_dir` (created); `expected` maps a file name to the sha256 it must have."""
    local = []
    for path in files:
        if not _NAME_RE.match(path.name):
            raise DeployError(f"file name {path.name!r} is not allowed (letters, digits, . _ -)")
        if not path.is_file():
            raise DeployError(f"{path} is not a file")
        want = (expected or {}).get(path.name) or sha256_file(path)
        local.append((path, want.lower()))
    conn.run(["mkdir", "-p", remote_dir])
    sftp = conn.sftp()
    done = []
    try:
        for path, want in local:
            final = posixpath.join(remote_dir, path.name)
            part = posixpath.join(remote_dir, f".{path.name}.part")
            try:
                sftp.put(str(path), part)
            except (OSError, EOFError) as exc:
                raise DeployError(f"{conn.host.name}: upload of {path.name} to {part} failed: {exc}") from None
            got = remote_hashes(conn, [part])[part]
            if got != want:
                conn.run(["rm", "-f", part], check=False)
                raise DeployError(f"{conn.host.name}: {path.name} arrived with sha256 {got}, expected {want}: "
                                  f"the upload was corrupted (or the local file changed); nothing was replaced")
            sftp.posix_rename(part, final)
            done.append(Deployed(path.name, final, want, path.stat().st_size))
    finally:
        sftp.close()
    return done


def verify(conn: Any, remote_dir: str, expected: Mapping[str, str]) -> dict[str, str]:
    """Check deployed files against their sha256: name -> "ok", "missing" or "mismatch"."""
    paths = {name: posixpath.join(remote_dir, name) for name in expected}
    hashes = remote_hashes(conn, list(paths.values()))
    out = {}
    for name, want in expected.items():
        got = hashes[paths[name]]
        out[name] = "missing" if got is None else ("ok" if got == want.lower() else "mismatch")
    return out
