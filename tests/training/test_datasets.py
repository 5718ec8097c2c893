from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from testbed.training.datasets import FASHION_MNIST_DIR, DatasetError, load_dataset, load_digits_28, read_idx


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    raw = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    got = read_idx(write_idx(tmp_path / "img", images, compress))
    np.testing.assert_array_equal(got, images)
    ints = np.arange(7, dtype=">i4")
    assert read_idx(write_idx(tmp_path / "ints", ints)).tolist() == list(range(7))


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "img", np.zeros((3, 4, 4), dtype=np.uint8))
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="header says 48 data bytes, file has 43"):
        read_idx(truncated)
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(foreign)
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "missing")


def test_digits_fallback_has_the_fashion_mnist_layout() -> None:
    ds = load_digits_28()
    assert ds.name == "digits"
    assert ds.x_train.shape[1:] == (1, 28, 28) and ds.x_train.dtype == np.float32
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert set(np.unique(ds.y_test)) <= set(range(10))


def test_auto_falls_back_to_digits_without_fashion_mnist(tmp_path: Path) -> None:
    assert load_dataset("auto", fashion_root=tmp_path).name == "digits"
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", fashion_root=tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package() -> None:
    ds = load_dataset("auto")
    assert ds.name == "fashion-mnist"
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert abs(float(ds.x_train.mean())) < 0.01 and abs(float(ds.x_train.std()) - 1.0) < 0.01
