"""Weights files: round trips, the state hash, and rejection of tampered, foreign or garbage files."""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from testbed.errors import TestbedError, WeightsError
from testbed.models import BlockModel, build_model, load_weights, read_weights_info, save_weights, state_hash


@pytest.fixture(scope="module", autouse=True)
def _single_threaded() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cnn() -> BlockModel:
    torch.manual_seed(0)
    return build_model("cnn").eval()


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _rewrite(path: Path, tensors=None, metadata=None) -> None:
    """Rewrite a safetensors file with other tensors and/or metadata (what a tamperer would do)."""
    save_file(
        load_file(str(path)) if tensors is None else tensors,
        str(path),
        metadata=_metadata(path) if metadata is None else metadata,
    )


def test_round_trip_keeps_outputs_and_hash(cnn: BlockModel, tmp_path: Path):
    path = tmp_path / "w" / "cnn.safetensors"  # the parent directory is created
    digest = save_weights(cnn, path)
    assert digest == state_hash(cnn)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert [p.name for p in path.parent.iterdir()] == ["cnn.safetensors"], "no temporary files left"

    cnn.train()  # load_weights must return eval() regardless of how the model was saved
    loaded, loaded_hash = load_weights(path)
    cnn.eval()
    assert loaded_hash == digest == state_hash(loaded)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert loaded.name == cnn.name and loaded.config == cnn.config
    x = torch.randn(5, *cnn.input_shape)
    with torch.inference_mode():
        assert torch.equal(loaded(x), cnn(x))
    # Saving the loaded model again gives the same hash.
    assert save_weights(loaded, tmp_path / "again.safetensors") == digest


def test_round_trip_with_batchnorm_buffers(tmp_path: Path):
    torch.manual_seed(0)
    model = build_model("resnet18", width=8)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *model.input_shape))  # move the running stats off their defaults
    model.eval()
    digest = save_weights(model, tmp_path / "r.safetensors")
    loaded, loaded_hash = load_weights(tmp_path / "r.safetensors")
    assert loaded_hash == digest
    assert loaded.config == {"in_channels": 3, "image_size": 32, "num_classes": 10, "width": 8}
    x = torch.randn(3, *model.input_shape)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_read_weights_info(cnn: BlockModel, tmp_path: Path):
    path = tmp_path / "cnn.safetensors"
    digest = save_weights(cnn, path)
    assert read_weights_info(path) == {"name": "cnn", "config": cnn.config, "hash": digest}


def test_hash_is_deterministic_and_ignores_metadata(cnn: BlockModel, tmp_path: Path):
    assert state_hash(cnn) == state_hash(copy.deepcopy(cnn)) == state_hash(cnn.state_dict())
    path = tmp_path / "cnn.safetensors"
    digest = save_weights(cnn, path)
    # The same tensors under different metadata (and a different file layout) hash the same ...
    meta = _metadata(path)
    _rewrite(path, metadata={**meta, "note": "re-saved by someone else", "z": "1"})
    assert state_hash(load_file(str(path))) == digest
    model, loaded_hash = load_weights(path)  # ... and still load, since the recorded hash matches
    assert loaded_hash == digest
    # The hash does not depend on the model's mode.
    model.train()
    assert state_hash(model) == digest


def test_hash_changes_when_one_weight_changes(cnn: BlockModel):
    before = state_hash(cnn)
    with torch.no_grad():
        cnn.blocks[3][0].weight[0, 0, 0, 0] += 1e-6
    after = state_hash(cnn)
    assert after != before
    with torch.no_grad():
        cnn.blocks[3][0].weight[0, 0, 0, 0] -= 1e-6
    assert state_hash(cnn) in {before, after}  # float rounding may not return exactly


def test_hash_covers_buffers_and_dtype():
    torch.manual_seed(0)
    model = build_model("cnn", batch_norm=True)
    before = state_hash(model)
    model.blocks[0][1].running_mean[0] = 0.5  # a buffer, not a parameter
    assert state_hash(model) != before
    state = model.state_dict()
    doubled = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    assert state_hash(doubled) != state_hash(state)


def test_tampered_tensor_bytes_are_rejected(cnn: BlockModel, tmp_path: Path):
    path = tmp_path / "cnn.safetensors"
    save_weights(cnn, path)
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    raw[8 + header_len + 1000] ^= 0x01  # flip one bit of one weight
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="corrupt or was modified"):
        load_weights(path)


def test_tampered_tensors_with_original_metadata_are_rejected(cnn: BlockModel, tmp_path: Path):
    path = tmp_path / "cnn.safetensors"
    save_weights(cnn, path)
    tensors = load_file(str(path))
    tensors["blocks.9.bias"] = tensors["blocks.9.bias"] + 1.0  # e.g. someone fine-tuned the file
    _rewrite(path, tensors=tensors)
    with pytest.raises(WeightsError, match=r"hash to [0-9a-f]{16}.*records"):
        load_weights(path)


def test_edited_recorded_hash_is_rejected(cnn: BlockModel, tmp_path: Path):
    path = tmp_path / "cnn.safetensors"
    save_weights(cnn, path)
    _rewrite(path, metadata={**_metadata(path), "testbed.state_hash": "0" * 64})
    with pytest.raises(WeightsError, match="corrupt or was modified"):
        load_weights(path)


def test_tensors_that_do_not_fit_the_recorded_model_are_rejected(cnn: BlockModel, tmp_path: Path):
    path = tmp_path / "cnn.safetensors"
    save_weights(cnn, path)
    meta = _metadata(path)
    _rewrite(path, metadata={**meta, "testbed.config": json.dumps({**cnn.config, "num_classes": 7})})
    with pytest.raises(WeightsError, match="do not fit model 'cnn'"):
        load_weights(path)
    _rewrite(path, metadata={**meta, "testbed.model": "nope"})
    with pytest.raises(WeightsError, match="unknown model 'nope'"):
        load_weights(path)


def test_garbage_file_is_rejected_clearly(tmp_path: Path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a weights file at all\n" * 10)
    with pytest.raises(WeightsError, match="not a readable safetensors weights file") as info:
        load_weights(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, TestbedError)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        read_weights_info(path)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_weights(empty)


def test_truncated_file_is_rejected(cnn: BlockModel, tmp_path: Path):
    path = tmp_path / "cnn.safetensors"
    save_weights(cnn, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError):
        load_weights(path)


def test_missing_file_and_directory(tmp_path: Path):
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="not a file"):
        load_weights(tmp_path)


def test_foreign_safetensors_file_is_rejected(tmp_path: Path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(WeightsError, match="lacks the testbed metadata"):
        load_weights(path)


def test_save_overwrites_atomically(cnn: BlockModel, tmp_path: Path):
    path = tmp_path / "cnn.safetensors"
    first = save_weights(cnn, path)
    with torch.no_grad():
        cnn.blocks[0][0].bias.add_(0.25)
    second = save_weights(cnn, path)
    assert second != first
    assert read_weights_info(path)["hash"] == second
    assert load_weights(path)[1] == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.safetensors"]


def test_save_needs_a_block_model(tmp_path: Path):
    with pytest.raises(WeightsError, match="BlockModel"):
        save_weights(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")  # type: ignore[arg-type]
