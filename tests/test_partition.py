"""Partitions, partition ids, ONNX heads/tails and the artifact cache.

The central property: for every valid split (a, b) of every zoo model, ONNX head
(onnxruntime) -> torch body -> ONNX tail (onnxruntime) computes what the full torch
model computes, at any batch size.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from testbed.errors import PartitionError, TestbedError, WeightsError
from testbed.models import BlockModel, build_model, model_names, state_hash
from testbed.partition import (
    ArtifactCache,
    Partition,
    PartitionId,
    activation_shape,
    activation_shapes,
    check_split,
    export_head,
    export_tail,
    split,
    valid_splits,
)

REPO = Path(__file__).resolve().parents[1]
ZOO = model_names()
TOLERANCE = 1e-4  # max|diff| / max|ref|
HASH = "0123456789abcdef" * 4


def _num_blocks(name: str) -> int:
    with torch.device("meta"):  # architecture only: no weights, no compute
        return build_model(name).num_blocks


NUM_BLOCKS = {name: _num_blocks(name) for name in ZOO}
CASES = [(name, a, b) for name in ZOO for a, b in valid_splits(NUM_BLOCKS[name])]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared machine, multi-threaded kernels waiting on a
    descheduled sibling thread ran 10-40x slower than one thread in our measurements."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _single_threaded() -> Iterator[None]:
    with _one_thread():
        yield


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _randomise(model: BlockModel, seed: int) -> BlockModel:
    """Random weights with a fixed seed; BatchNorm gets random affine params and non-trivial
    running statistics (a few train-mode forwards), so eval-mode BN is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            model.train()
            for _ in range(3):
                model(torch.randn(8, *model.input_shape, generator=gen) * 1.5 + 0.2)
    return model.eval()


@dataclass
class Deployed:
    """One zoo model with random weights, its artifact cache and onnxruntime sessions."""

    model: BlockModel
    weights_hash: str
    cache: ArtifactCache
    sessions: dict[tuple[str, int], ort.InferenceSession] = field(default_factory=dict)
    references: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def session(self, kind: str, point: int) -> ort.InferenceSession:
        key = (kind, point)
        if key not in self.sessions:
            get = self.cache.head if kind == "head" else self.cache.tail
            self.sessions[key] = _session(get(self.model, self.weights_hash, point))
        return self.sessions[key]

    def inputs(self, batch: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.standard_normal((batch, *self.model.input_shape), dtype=np.float32)

    def reference(self, batch: int, seed: int) -> np.ndarray:
        key = (batch, seed)
        if key not in self.references:
            with torch.inference_mode():
                self.references[key] = self.model(torch.from_numpy(self.inputs(batch, seed))).numpy()
        return self.references[key]


@pytest.fixture(scope="session")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Deployed]:
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    with _one_thread():
        for i, name in enumerate(ZOO):
            torch.manual_seed(1234 + i)
            model = _randomise(build_model(name), seed=99 + i)
            out[name] = Deployed(model, state_hash(model), ArtifactCache(root))
    return out


@pytest.fixture(scope="module")
def cnn() -> BlockModel:
    torch.manual_seed(0)
    return build_model("cnn").eval()


# ---------------------------------------------------------------------------------------------
# The property


@pytest.mark.parametrize(("name", "a", "b"), CASES, ids=[f"{n}-{a}-{b}" for n, a, b in CASES])
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
@example(batch=1, seed=0)
@example(batch=3, seed=1)
@example(batch=7, seed=2)
def test_onnx_head_torch_body_onnx_tail_equals_the_full_model(
    deployed: dict[str, Deployed], name: str, a: int, b: int, batch: int, seed: int
):
    d = deployed[name]
    model = d.model
    x = d.inputs(batch, seed)

    a1 = d.session("head", a).run(["a1"], {"x": x})[0]
    assert a1.shape == (batch, *activation_shape(model, a))
    with torch.inference_mode():
        a2 = split(model, a, b).body(torch.from_numpy(a1)).numpy()
    assert a2.shape == (batch, *activation_shape(model, b))
    logits = d.session("tail", b).run(["logits"], {"a2": np.ascontiguousarray(a2)})[0]
    assert logits.shape == (batch, model.num_classes)

    ref = d.reference(batch, seed)
    scale = float(np.abs(ref).max())
    assert np.isfinite(logits).all() and scale > 0
    error = float(np.abs(logits - ref).max()) / scale
    assert error <= TOLERANCE, f"{name} split ({a}, {b}), batch {batch}: relative error {error:.2e}"


def test_the_batchnorm_model_has_non_trivial_running_stats(deployed: dict[str, Deployed]):
    bns = [m for m in deployed["resnet18"].model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_every_head_and_tail_was_exported_once(deployed: dict[str, Deployed]):
    for d in deployed.values():
        for a in range(1, d.model.num_blocks):
            d.session("head", a)
            d.session("tail", a)
    exports = sum(d.cache.exports for d in deployed.values())
    assert exports == sum(2 * (NUM_BLOCKS[n] - 1) for n in ZOO)


# ---------------------------------------------------------------------------------------------
# Split validation


def test_valid_splits_enumerates_the_triangle():
    assert valid_splits(1) == []
    assert valid_splits(2) == [(1, 1)]
    assert valid_splits(4) == [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]
    for name, L in NUM_BLOCKS.items():
        splits = valid_splits(L)
        assert len(splits) == L * (L - 1) // 2, name
        assert all(1 <= a <= b <= L - 1 for a, b in splits)


@pytest.mark.parametrize("bad", [(0, 3), (1, 10), (0, 10), (5, 4), (-1, 2), (2, 11), (1.0, 2), (True, 2)])
def test_check_split_rejects_with_the_valid_range(cnn: BlockModel, bad: tuple[object, object]):
    assert cnn.num_blocks == 10
    with pytest.raises(PartitionError, match=r"1 <= a <= b <= 9") as info:
        check_split(cnn, *bad)  # type: ignore[arg-type]
    assert "'cnn'" in str(info.value) and "L=10" in str(info.value)
    assert isinstance(info.value, TestbedError)
    with pytest.raises(PartitionError, match=r"1 <= a <= b <= 9"):
        check_split(10, *bad)  # type: ignore[arg-type]
    with pytest.raises(PartitionError, match=r"1 <= a <= b <= 9"):
        split(cnn, *bad)  # type: ignore[arg-type]


def test_check_split_accepts_every_valid_split(cnn: BlockModel):
    for a, b in valid_splits(cnn.num_blocks):
        check_split(cnn, a, b)
        check_split(cnn.num_blocks, np.int64(a), np.int64(b))  # type: ignore[arg-type]
    with pytest.raises(PartitionError, match="at least 2 blocks"):
        check_split(1, 1, 1)


def test_split_shares_the_models_modules(cnn: BlockModel):
    part = split(cnn, 3, 7)
    assert isinstance(part, Partition) and (part.a, part.b) == (3, 7)
    assert list(part.head) + list(part.body) + list(part.tail) == list(cnn.blocks)
    for mine, theirs in zip(list(part.head) + list(part.body) + list(part.tail), cnn.blocks, strict=True):
        assert mine is theirs
    model_params = {id(p) for p in cnn.parameters()}
    part_params = [p for seq in (part.head, part.body, part.tail) for p in seq.parameters()]
    assert {id(p) for p in part_params} == model_params
    assert len(part_params) == len(model_params)
    x = torch.randn(2, *cnn.input_shape)
    with torch.inference_mode():
        assert torch.equal(part.tail(part.body(part.head(x))), cnn(x))


def test_training_the_body_trains_the_model(cnn: BlockModel):
    model = build_model("cnn")
    model.load_state_dict(cnn.state_dict())
    part = split(model, 2, 8)
    before = model.blocks[4][0].weight.detach().clone()
    optimiser = torch.optim.SGD(part.body.parameters(), lr=0.1)
    with torch.no_grad():
        a1 = part.head(torch.randn(4, *model.input_shape))
    part.body(a1).square().mean().backward()
    optimiser.step()
    assert not torch.equal(model.blocks[4][0].weight, before)


def test_equal_split_points_give_an_empty_body(cnn: BlockModel):
    part = split(cnn, 4, 4)
    assert len(part.body) == 0 and list(part.body.parameters()) == []
    x = torch.randn(3, *activation_shape(cnn, 4))
    assert part.body(x) is x
    assert len(part.head) == 4 and len(part.tail) == cnn.num_blocks - 4


# ---------------------------------------------------------------------------------------------
# Partition ids


def test_partition_id_string_form():
    pid = PartitionId(HASH, 2, 5)
    assert str(pid) == "0123456789abcdef:2:5"
    assert pid.short_hash == "0123456789abcdef"
    assert PartitionId.parse(str(pid)) == PartitionId(HASH[:16], 2, 5)
    assert PartitionId.parse(f"{HASH}:2:5") == pid  # the full hash parses too
    assert PartitionId.parse("0123456789ABCDEF:1:1") == PartitionId("0123456789abcdef", 1, 1)


@given(
    digest=st.text("0123456789abcdef", min_size=64, max_size=64),
    a=st.integers(1, 10_000),
    extra=st.integers(0, 10_000),
    full=st.booleans(),
)
def test_partition_id_round_trip(digest: str, a: int, extra: int, full: bool):
    pid = PartitionId(digest if full else digest[:16], a, a + extra)
    parsed = PartitionId.parse(str(pid))
    assert str(parsed) == str(pid)
    assert (parsed.a, parsed.b, parsed.weights_hash) == (pid.a, pid.b, digest[:16])
    assert parsed == PartitionId.parse(str(parsed))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0123456789abcdef",
        "0123456789abcdef:3",
        "0123456789abcdef:1:2:3",
        "0123456789abcdef:3:2",
        "0123456789abcdef:0:2",
        "0123456789abcdef:-1:2",
        "0123456789abcdef:a:b",
        "0123456789abcdef:1.5:2",
        "0123456789abcdef:1:２",
        "0123456789abcde:1:2",
        "0123456789abcdef0:1:2",
        "0123456789abcdeg:1:2",
        ":1:2",
        "cnn:1:2",
        "0123456789abcdef\n:1:2",
        "0123456789abcdef:1\n:2",
    ],
)
def test_bad_partition_ids_are_rejected(text: str):
    with pytest.raises(PartitionError, match="invalid partition id") as info:
        PartitionId.parse(text)
    assert repr(text) in str(info.value)


def test_partition_id_validates_its_fields():
    for bad in ("xyz", HASH[:16] + "\n", HASH[:20], 12345):
        with pytest.raises(PartitionError, match="16 or 64 hex digits"):
            PartitionId(bad, 1, 2)  # type: ignore[arg-type]
    with pytest.raises(PartitionError, match="1 <= a <= b"):
        PartitionId(HASH, 3, 2)
    with pytest.raises(PartitionError, match="1 <= a <= b"):
        PartitionId(HASH, 0, 2)
    with pytest.raises(PartitionError):
        PartitionId.parse(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Activation shapes


@pytest.mark.parametrize("name", ZOO)
def test_activation_shapes_match_a_real_forward(deployed: dict[str, Deployed], name: str):
    model = deployed[name].model
    shapes = activation_shapes(model)
    assert len(shapes) == model.num_blocks + 1
    assert shapes[0] == model.input_shape and shapes[-1] == (model.num_classes,)
    x = torch.randn(2, *model.input_shape)
    with torch.inference_mode():
        for point in range(model.num_blocks + 1):
            assert activation_shape(model, point) == shapes[point] == tuple(model.run(x, 0, point).shape[1:])
    for bad in (-1, model.num_blocks + 1, 1.5):
        with pytest.raises(PartitionError, match=rf"0 <= split point <= {model.num_blocks}"):
            activation_shape(model, bad)  # type: ignore[arg-type]


def test_activation_shape_has_no_side_effects():
    torch.manual_seed(0)
    model = build_model("cnn", batch_norm=True, image_size=20).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert activation_shape(model, 3) == (32, 10, 10)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_activation_shape_of_a_model_outside_the_registry():
    model = BlockModel("custom", {}, [nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)], (4,), 3)
    assert activation_shapes(model) == ((4,), (6,), (6,), (3,))


# ---------------------------------------------------------------------------------------------
# Export


def _check_onnx(path: Path, in_name: str, out_name: str) -> onnx.ModelProto:
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    assert [i.name for i in proto.graph.input] == [in_name]
    assert [o.name for o in proto.graph.output] == [out_name]
    for value in (proto.graph.input[0], proto.graph.output[0]):
        batch_dim = value.type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.HasField("dim_value"), "dynamic batch axis"
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer), "single file"
    assert min(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    return proto


def test_export_head_and_tail(cnn: BlockModel, tmp_path: Path):
    head = export_head(cnn, 4, tmp_path / "h" / "head.onnx")
    tail = export_tail(cnn, 6, tmp_path / "t.onnx")
    assert head == tmp_path / "h" / "head.onnx"
    _check_onnx(head, "x", "a1")
    proto = _check_onnx(tail, "a2", "logits")
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["testbed.model"] == "cnn" and meta["testbed.part"] == "tail" and meta["testbed.split"] == "6"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["head.onnx", "t.onnx"]
    x = np.random.default_rng(0).standard_normal((5, *cnn.input_shape), dtype=np.float32)
    a1 = _session(head).run(None, {"x": x})[0]
    with torch.inference_mode():
        ref_a1 = cnn.run(torch.from_numpy(x), 0, 4).numpy()
        a2 = cnn.run(torch.from_numpy(a1), 4, 6).numpy()
        ref = cnn(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(a1, ref_a1, rtol=1e-4, atol=1e-5)
    logits = _session(tail).run(None, {"a2": a2})[0]
    assert np.abs(logits - ref).max() <= TOLERANCE * np.abs(ref).max()


def test_export_leaves_a_training_model_untouched(tmp_path: Path):
    torch.manual_seed(0)
    model = build_model("cnn", batch_norm=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    export_head(model, 5, tmp_path / "h.onnx")
    export_tail(model, 5, tmp_path / "t.onnx")
    after_export = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after_export, torch.rand(3)), "export must not consume the global RNG"
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # ... and the export used eval-mode BatchNorm (running stats), whatever the model's mode.
    x = np.random.default_rng(1).standard_normal((3, *model.input_shape), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        ref = model.run(torch.from_numpy(x), 0, 5).numpy()
    out = _session(tmp_path / "h.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("point", [0, 10, -1])
def test_export_rejects_invalid_points(cnn: BlockModel, tmp_path: Path, point: int):
    with pytest.raises(PartitionError, match="1 <= head split point a <= 9"):
        export_head(cnn, point, tmp_path / "h.onnx")
    with pytest.raises(PartitionError, match="1 <= tail split point b <= 9"):
        export_tail(cnn, point, tmp_path / "t.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unknown_exporter_is_rejected(cnn: BlockModel, tmp_path: Path):
    with pytest.raises(PartitionError, match="choose one of torchscript, dynamo"):
        export_head(cnn, 2, tmp_path / "h.onnx", exporter="magic")


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_results(deployed: dict[str, Deployed], tmp_path: Path):
    model = deployed["resnet18"].model
    head = export_head(model, 3, tmp_path / "h.onnx", exporter="dynamo")
    tail = export_tail(model, 9, tmp_path / "t.onnx", exporter="dynamo")
    _check_onnx(head, "x", "a1")
    proto = _check_onnx(tail, "a2", "logits")
    assert {p.key: p.value for p in proto.metadata_props}["testbed.exporter"] == "dynamo"
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, *model.input_shape), dtype=np.float32)
        a1 = _session(head).run(None, {"x": x})[0]
        with torch.inference_mode():
            a2 = model.run(torch.from_numpy(a1), 3, 9).numpy()
            ref = model(torch.from_numpy(x)).numpy()
        logits = _session(tail).run(None, {"a2": a2})[0]
        assert np.abs(logits - ref).max() <= TOLERANCE * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------
# Artifact cache


def test_cache_exports_once_and_returns_the_same_path(cnn: BlockModel, tmp_path: Path):
    digest = state_hash(cnn)
    cache = ArtifactCache(tmp_path)
    head = cache.head(cnn, digest, 3)
    assert cache.exports == 1
    mtime = head.stat().st_mtime_ns
    assert cache.head(cnn, digest, 3) == head
    assert cache.head(cnn, digest[:16], 3) == head  # the prefix names the same artifact
    assert cache.exports == 1 and head.stat().st_mtime_ns == mtime
    # A partition reuses the head for its a, and exports only the missing tail.
    h, t = cache.partition(cnn, digest, 3, 8)
    assert h == head and cache.exports == 2
    assert cache.partition(cnn, digest, 3, 8) == (h, t)
    # The tail for b is shared by every partition with that b.
    h2, t2 = cache.partition(cnn, digest, 1, 8)
    assert t2 == t and h2 != h and cache.exports == 3
    assert cache.tail(cnn, digest, 8) == t and cache.exports == 3
    # A fresh cache over the same directory finds the files.
    again = ArtifactCache(tmp_path)
    assert again.partition(cnn, digest, 3, 8) == (h, t) and again.exports == 0
    for path, names in ((h, ("x", "a1")), (h2, ("x", "a1")), (t, ("a2", "logits"))):
        proto = _check_onnx(path, *names)
        assert {p.key: p.value for p in proto.metadata_props}["testbed.weights_hash"] == digest
    assert digest[:16] in str(h) and all(p.parent == h.parent for p in (h2, t))
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_cache_refuses_a_hash_that_is_not_the_models(cnn: BlockModel, tmp_path: Path):
    cache = ArtifactCache(tmp_path)
    with pytest.raises(WeightsError, match="pass the hash returned by save_weights"):
        cache.head(cnn, HASH, 2)
    with pytest.raises(WeightsError):
        cache.partition(cnn, HASH[:16], 2, 3)
    assert cache.exports == 0 and not list(tmp_path.rglob("*.onnx"))


def test_cache_validates_its_arguments(cnn: BlockModel, tmp_path: Path):
    cache = ArtifactCache(tmp_path)
    digest = state_hash(cnn)
    with pytest.raises(PartitionError, match="16 or 64 hex digits"):
        cache.head(cnn, "not-a-hash", 2)
    with pytest.raises(PartitionError, match="1 <= a <= b <= 9"):
        cache.partition(cnn, digest, 5, 2)
    with pytest.raises(PartitionError, match="head split point a <= 9"):
        cache.head(cnn, digest, 10)
    with pytest.raises(PartitionError, match="tail split point b <= 9"):
        cache.tail(cnn, digest, 0)
    assert cache.exports == 0


_RACE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from testbed.models import build_model
    from testbed.partition import ArtifactCache
    torch.manual_seed(0)
    model = build_model("cnn").eval()
    cache = ArtifactCache(Path(sys.argv[1]))
    paths = [cache.head(model, sys.argv[2], a) for a in range(1, model.num_blocks)]
    print(cache.exports, *paths)
    """
)


@pytest.mark.slow
def test_two_processes_racing_on_the_cache(cnn: BlockModel, tmp_path: Path):
    digest = state_hash(cnn)  # the same seeded weights the racers build
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, str(tmp_path), digest],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env, text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    listed = [out.split()[1:] for out, _ in outputs]
    assert listed[0] == listed[1]
    assert sum(int(out.split()[0]) for out, _ in outputs) >= cnn.num_blocks - 1
    for path in map(Path, listed[0]):
        _check_onnx(path, "x", "a1")
    assert not [p for p in tmp_path.rglob("*") if p.suffix != ".onnx" and p.is_file()], "no temp files left"
    cache = ArtifactCache(tmp_path)
    assert [str(cache.head(cnn, digest, a)) for a in range(1, cnn.num_blocks)] == listed[0]
    assert cache.exports == 0
