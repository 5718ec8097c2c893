"""Deployable partitions (head and tail ONNX bytes) and edge bodies (a weights file), content-hashed and
versioned, checked on receipt.

The controller builds a :class:`Deployment` and turns it into a ``deploy`` command (:func:`to_command`); the
device agent checks both hashes (:func:`verify`) before it writes anything, then stores the files under its
work directory (:func:`store`), named by partition and hash so that a half-written or foreign file is never
taken for a deployed one. An edge body is the same idea with one artifact: the weights file's bytes
(:func:`body_command`, :func:`verify_body`, :func:`store_body`). Torch-free (the device agent imports it).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from testbed.controller.protocol import DEPLOY, DEPLOY_BODY, Command, CommandError

_SAFE_RE = re.compile(r"[^A-Za-z0-9_.\-]")


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Artifact:
    """One ONNX file's bytes with their hash."""

    data: bytes
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> Artifact:
        return cls(bytes(data), sha256_hex(data))


@dataclass(frozen=True)
class Deployment:
    """A partition to deploy on one device: which split, which version, and its head and tail."""

    partition: str
    version: int
    head: Artifact
    tail: Artifact

    @classmethod
    def of(cls, partition: str, head: bytes, tail: bytes, version: int = 1) -> Deployment:
        return cls(partition, version, Artifact.of(head), Artifact.of(tail))


def to_command(dep: Deployment, activate: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(meta, tensors)`` of the deploy command for ``dep``."""
    args = {"partition": dep.partition, "version": dep.version, "head_sha256": dep.head.sha256,
            "tail_sha256": dep.tail.sha256, "activate": activate}
    tensors = {"head": np.frombuffer(dep.head.data, np.uint8), "tail": np.frombuffer(dep.tail.data, np.uint8)}
    return {"command": DEPLOY, "args": args}, tensors


def verify(command: Command) -> Deployment:
    """The deployment a received deploy command carries, if both hashes match; else CommandError(hash_mismatch)."""
    parts = {}
    for part in ("head", "tail"):
        data = np.ascontiguousarray(command.tensors[part]).tobytes()
        expected = command.args[f"{part}_sha256"]
        actual = sha256_hex(data)
        if actual != expected:
            raise CommandError("hash_mismatch", f"deploy {command.args['partition']}: {part} has sha256 "
                                                f"{actual[:16]}..., the controller announced {expected[:16]}...")
        parts[part] = Artifact(data, actual)
    return Deployment(command.args["partition"], command.args["version"], parts["head"], parts["tail"])


def store(dep: Deployment, work_dir: Path) -> tuple[Path, Path]:
    """Write head and tail atomically under ``work_dir``; returns their paths (existing identical files are kept)."""
    folder = work_dir / "partitions" / _SAFE_RE.sub("_", dep.partition)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, art in (("head", dep.head), ("tail", dep.tail)):
        path = folder / f"{part}-{art.sha256[:16]}.onnx"
        if not (path.exists() and sha256_hex(path.read_bytes()) == art.sha256):
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(art.data)
            os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def body_command(weights: bytes, version: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(meta, tensors)`` of the deploy_body command carrying a weights file's bytes."""
    args = {"weights_sha256": sha256_hex(weights), "version": version}
    return {"command": DEPLOY_BODY, "args": args}, {"weights": np.frombuffer(bytes(weights), np.uint8)}


def verify_body(command: Command) -> Artifact:
    """The weights a received deploy_body command carries, if their hash matches; else CommandError(hash_mismatch)."""
    data = np.ascontiguousarray(command.tensors["weights"]).tobytes()
    expected, actual = command.args["weights_sha256"], sha256_hex(data)
    if actual != expected:
        raise CommandError("hash_mismatch", f"deploy_body: the weights ({len(data)} bytes) have sha256 "
                                            f"{actual[:16]}..., the controller announced {expected[:16]}...; "
                                            "the body in service is kept")
    return Artifact(data, actual)


def store_body(weights: Artifact, work_dir: Path) -> Path:
    """Write a verified weights file atomically as ``work_dir/body/weights-<hash16>.safetensors``."""
    folder = work_dir / "body"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"weights-{weights.sha256[:16]}.safetensors"
    if not (path.exists() and sha256_hex(path.read_bytes()) == weights.sha256):
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(weights.data)
        os.replace(tmp, path)
    return path
