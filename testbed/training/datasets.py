"""Image classification datasets as plain numpy arrays (no torch needed to read them).

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (IDX files); where it is absent,
scikit-learn's bundled 8x8 digits, upscaled to 28x28, stand in, and `Dataset.name` says which was used.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testbed.errors import TestbedError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# Per-pixel statistics of the Fashion-MNIST training set, for normalisation.
_FASHION_MEAN, _FASHION_STD = 0.2860, 0.3530


class DatasetError(TestbedError):
    """A dataset file is missing or malformed."""


@dataclass(frozen=True)
class Dataset:
    """Normalised float32 images (N, 1, 28, 28) and int64 labels."""

    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), validating its header against its length."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{path} is not a valid gzip file: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_len != expected:
        raise DatasetError(f"{path}: IDX header says {expected} data bytes, file has {len(raw) - header_len}")
    return np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape).astype(dtype.newbyteorder("="))


def _normalise(images_u8: np.ndarray, mean: float, std: float) -> np.ndarray:
    x = images_u8.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return (x - np.float32(mean)) / np.float32(std)


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR) -> Dataset:
    def part(stem: str) -> np.ndarray:
        for candidate in (root / f"{stem}.gz", root / stem):
            if candidate.exists():
                return read_idx(candidate)
        raise DatasetError(f"{root / stem}[.gz] not found (install Debian's dataset-fashion-mnist)")

    x_train, y_train = part("train-images-idx3-ubyte"), part("train-labels-idx1-ubyte")
    x_test, y_test = part("t10k-images-idx3-ubyte"), part("t10k-labels-idx1-ubyte")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise DatasetError(f"{root}: image and label counts differ")
    return Dataset(
        name="fashion-mnist",
        source=str(root),
        x_train=_normalise(x_train, _FASHION_MEAN, _FASHION_STD),
        y_train=y_train.astype(np.int64),
        x_test=_normalise(x_test, _FASHION_MEAN, _FASHION_STD),
        y_test=y_test.astype(np.int64),
        classes=FASHION_MNIST_CLASSES,
    )


def load_digits_28(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), upscaled 3x and padded to 28x28."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetError(
            "neither Fashion-MNIST (Debian package dataset-fashion-mnist) nor scikit-learn is installed"
        ) from exc
    digits = load_digits()
    images = np.kron(digits.images, np.ones((3, 3))) * (255.0 / 16.0)  # 8x8 -> 24x24, 0..16 -> 0..255
    images = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    x = _normalise(images, 0.13, 0.31)
    return Dataset(
        name="digits",
        source="sklearn.datasets.load_digits (upscaled to 28x28)",
        x_train=x[train], y_train=labels[train], x_test=x[test], y_test=labels[test],
        classes=tuple(str(i) for i in range(10)),
    )


def load_dataset(name: str = "auto", fashion_root: Path | None = None) -> Dataset:
    """`auto`: Fashion-MNIST when its files are present, else the digits fallback."""
    root = fashion_root or Path(os.environ.get("TESTBED_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if name == "fashion-mnist":
        return load_fashion_mnist(root)
    if name == "digits":
        return load_digits_28()
    if name != "auto":
        raise DatasetError(f"unknown dataset {name!r}; choose auto, fashion-mnist or digits")
    if (root / "t10k-images-idx3-ubyte.gz").exists() or (root / "t10k-images-idx3-ubyte").exists():
        return load_fashion_mnist(root)
    return load_digits_28()
