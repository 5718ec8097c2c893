"""Split training over the wire with real processes on loopback (small data subsets, one torch thread)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from testbed.partition import activation_shapes
from testbed.training.datasets import FASHION_MNIST_DIR
from testbed.training.experiment import ExperimentSpec, parse_experiment
from testbed.training.schemes import CHECKPOINT, RunFailed, run_experiment

SMALL = {
    "data": {"train_samples": 384, "test_samples": 64},
    "training": {"batch_size": 32, "epochs": 1, "rounds_per_epoch": 3},
    "runtime": {"export_onnx": False, "eval_batch_size": 64},
}


def experiment(**overrides: Any) -> ExperimentSpec:
    doc: dict[str, Any] = {k: dict(v) for k, v in SMALL.items()}
    for key, value in overrides.items():
        if isinstance(value, dict):
            doc.setdefault(key, {}).update(value)
        else:
            doc[key] = value
    return parse_experiment(doc)


def checkpoint(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / CHECKPOINT))


def assert_same_states(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rename: dict[str, str] | None = None):
    rename = rename or {}
    def strip(k: str) -> str:
        party, name = k.split("#", 1)
        return f"{rename.get(party, party)}#{name}"
    a = {strip(k): v for k, v in a.items()}
    b = {strip(k): v for k, v in b.items()}
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The control protocol's pieces, without processes


def test_meta_and_state_round_trip() -> None:
    from testbed.training.errors import ProtocolError
    from testbed.training.state import Party
    from testbed.wire.messages import MetaError, pack_meta, unpack_meta

    meta = {"op": "load", "parts": {"dev1": [0, 4]}, "x": 1.5}
    assert unpack_meta({"meta": pack_meta(meta)}) == meta
    with pytest.raises(MetaError, match="JSON object"):
        unpack_meta({"meta": np.frombuffer(b"[1, 2]", np.uint8)})
    with pytest.raises(MetaError, match="uint8"):
        unpack_meta({"meta": np.zeros(3, np.float32)})
    spec = experiment(scheme="psl", devices=2, split=[3, 7], training={"optimizer": "sgd", "momentum": 0.9})
    a = Party(spec, ["main"], [0, 1, 2, 7, 8, 9])
    model, opt = a.models["main"], a.optimizers["main"]
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    state = a.dump(optimizer=True)
    assert {k.split("/")[2].split(".")[1] for k in state} == {"0", "1", "7", "8", "9"}  # block 2 has no state
    assert any(k.endswith("/momentum_buffer") for k in state)
    b = Party(spec, ["main"], [0, 1, 2, 7, 8, 9])
    b.load(state)
    assert_same_states({f"p#{k}": v for k, v in b.dump(optimizer=True).items()},
                       {f"p#{k}": v for k, v in state.items()})
    with pytest.raises(ProtocolError, match="missing"):
        b.load({k: v for k, v in state.items() if "blocks.0." not in k})
    with pytest.raises(ProtocolError, match="shape"):
        b.load({**state, "w/main/blocks.0.0.bias": np.zeros(3, np.float32)})


def test_fedavg_weights_by_samples_and_is_deterministic() -> None:
    from testbed.training.state import fedavg

    s1 = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}
    s2 = {"w": np.array([3.0, 6.0], np.float32), "n": np.array(5, np.int64)}
    avg = fedavg([s1, s2], [1.0, 3.0])
    np.testing.assert_array_equal(avg["w"], np.array([2.5, 5.0], np.float32))
    assert avg["w"].dtype == np.float32 and avg["n"] == 5  # counters take the maximum
    assert fedavg([s1, s2], [1.0, 3.0])["w"].tobytes() == avg["w"].tobytes()


def test_edge_admission_and_a_forward_that_overtakes_its_round_start() -> None:
    """The edge serves a forward that arrived before the round_start scheduling it, and refuses malformed,
    unscheduled or foreign messages with an error reply (and goes on)."""
    import threading

    import zmq

    from agents.train_edge import EdgeTrainer
    from testbed.wire.envelope import Kind
    from testbed.wire.messages import DATA_LIMITS, recv_message, send_message

    spec = experiment(scheme="psl", devices=2, split=[3, 7])
    ctx = zmq.Context()
    edge = EdgeTrainer(spec, "edge", ctx, threading.Event(), None)
    dev = ctx.socket(zmq.DEALER)
    try:
        edge.handle_control(Kind.SYNC, {"op": "load", "run": "0123456789abcdef"}, edge.party.dump())
        dev.connect(edge.endpoint)

        def exchange(kind: Kind, seq: int, tensors: dict, partition: str = "0123456789abcdef:3:7",
                     device: str = "dev1"):
            send_message(dev, kind, device, seq, tensors=tensors, partition=partition, limits=DATA_LIMITS)
            assert edge.data.poll(5000)
            edge._data_message()
            if not dev.poll(200):
                return None
            return recv_message(dev, limits=DATA_LIMITS)[1:3]

        a1 = np.zeros((4, 32, 14, 14), np.float32)
        assert exchange(Kind.TRAIN_FORWARD, 0, {"a1": a1}) is None  # parked: no round_start yet
        env, _ = exchange(Kind.TRAIN_FORWARD, 0, {"a1": a1})
        assert env.kind is Kind.ERROR and "second forward" in env.error.message
        assert edge.handle_control(Kind.ROUND_START, {"parts": {"dev1": [0, 1], "dev2": [0, 1]}}, {}) is None
        edge.replay_parked()
        assert not dev.poll(200)  # psl sync: waits for dev2's forward of the same step
        bad = [
            ({"a1": np.zeros((4, 16, 14, 14), np.float32)}, "0123456789abcdef:3:7", "dev2", "bad_shape"),
            ({"a1": a1.astype(np.float64)}, "0123456789abcdef:3:7", "dev2", "bad_shape"),
            ({"x": a1}, "0123456789abcdef:3:7", "dev2", "bad_tensors"),
            ({"a1": a1}, "fedcba9876543210:3:7", "dev2", "bad_partition"),
            ({"a1": a1}, "0123456789abcdef:3:7", "dev9", "bad_seq"),  # unknown device: never scheduled
        ]
        for tensors, partition, device, code in bad:
            send_message(dev, Kind.TRAIN_FORWARD, device, 0, tensors=tensors, partition=partition, limits=DATA_LIMITS)
            assert edge.data.poll(5000)
            edge._data_message()
            assert dev.poll(5000)
            env, _ = recv_message(dev, limits=DATA_LIMITS)[1:3]
            assert env.kind is Kind.ERROR and env.error.code in (code, "not_scheduled"), (code, env.error)
        send_message(dev, Kind.TRAIN_FORWARD, "dev2", 0, tensors={"a1": a1}, partition="0123456789abcdef:3:7",
                     limits=DATA_LIMITS)
        assert edge.data.poll(5000)
        edge._data_message()
        replies = [recv_message(dev, limits=DATA_LIMITS)[1:3] for _ in range(2) if dev.poll(5000)]
        assert [(e.kind, t["a2"].shape) for e, t in replies] == [(Kind.TRAIN_FORWARD_REPLY, (4, 64, 7, 7))] * 2
        assert edge.metrics["max_batch"] == 8  # both devices' activations in one body batch
    finally:
        dev.close(linger=0)
        edge.data.close(linger=0)
        ctx.term()


@dataclass(frozen=True)
class Run:
    spec: ExperimentSpec
    run_dir: Path
    results: dict[str, Any]
    record: Path | None = None


@pytest.fixture(scope="module")
def psl1(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """PSL with one device: 192 samples, batches of 48, 4 steps in 3 rounds."""
    torch.set_num_threads(1)
    spec = experiment(scheme="psl", devices=1, split=[3, 7], data={"train_samples": 192},
                      training={"batch_size": 48, "lr": 0.003})
    run_dir = tmp_path_factory.mktemp("psl1")
    return Run(spec, run_dir, run_experiment(spec, run_dir))


@pytest.mark.slow
def test_psl_with_one_device_is_exactly_centralized_training(psl1: Run, tmp_path: Path) -> None:
    """The U-shaped step (head -> a1 up -> body -> a2 down -> tail + loss -> g2 up -> body backward -> g1 down
    -> head backward) computes the same gradients as backpropagation through the whole model: after the
    same steps on the same batches, every weight and every Adam moment is bit-for-bit equal."""
    doc = psl1.spec.to_dict()
    del doc["split"], doc["devices"]
    central = parse_experiment({**doc, "scheme": "centralized"})
    ref = run_experiment(central, tmp_path / "central")
    assert [r["steps"] for r in psl1.results["history"]] == [r["steps"] for r in ref["history"]] == [1, 1, 2]
    # the device holds blocks 0-2 and 7-9, the edge 3-6: together the whole model and its optimizer
    psl_state = {f"central#{k.split('#', 1)[1]}": v for k, v in checkpoint(psl1.run_dir).items()}
    assert_same_states(psl_state, checkpoint(tmp_path / "central"))
    assert [r["test_acc"] for r in psl1.results["history"]] == [r["test_acc"] for r in ref["history"]]
    assert [r["train_loss"] for r in psl1.results["history"]] == pytest.approx(
        [r["train_loss"] for r in ref["history"]], rel=1e-6)


# Three devices: dev1 and dev2 share a split (their activations are batched through the body together),
# dev3 keeps block 3 on the device (its own group at the edge).
PSL3 = {"scheme": "psl", "devices": 3, "split": [[3, 7], [3, 7], [4, 7]], "training": {"fedavg_every": 2}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """PSL, 3 devices (128 samples each, 4 steps of 32), FedAvg every 2 steps, 3 rounds; the edge records
    every message it receives."""
    torch.set_num_threads(1)
    spec = experiment(**PSL3, runtime={"export_onnx": True})
    run_dir = tmp_path_factory.mktemp("psl3")
    record = run_dir / "edge-record.jsonl"
    results = run_experiment(spec, run_dir, edge_record=record)
    return Run(spec, run_dir, results, record)


@pytest.mark.slow
def test_psl_run_writes_results_and_servable_models(reference: Run) -> None:
    res, run_dir = reference.results, reference.run_dir
    assert res["rounds"] == 3 and [r["round"] for r in res["history"]] == [1, 2, 3]
    for name in ("rounds.csv", "devices.csv", "rounds.json", "results.json", "accuracy.png", "time_breakdown.png"):
        assert (run_dir / name).stat().st_size > 0, name
    rows = (run_dir / "devices.csv").read_text().splitlines()
    assert rows[0].startswith("round,device,split,samples,steps,loss,acc,bytes_up,bytes_down")
    assert len(rows) == 1 + 3 * 3
    # 4 steps of 32 samples per device: a1 (32x14x14 floats) up and g1 down; a2 and g2 (64x7x7) the other way
    totals = res["devices"]["dev1"]
    act = 4 * 32 * (32 * 14 * 14 + 64 * 7 * 7) * 4
    assert act < totals["bytes_up"] < act * 1.01 and act < totals["bytes_down"] < act * 1.01
    assert totals["samples"] == 128
    assert set(totals["times"]) >= {"head_fwd", "up_a1", "body_fwd", "tail", "body_bwd", "head_bwd"}
    edge = res["history"][0]["edge"]
    assert edge["max_batch"] == 64 and edge["batches"] == 2  # dev1+dev2 as one batch, dev3 (another split) apart
    exported = res["exported"]
    # FedAvg after the last step: dev1 and dev2 (same split) hold the same model; dev3 its own block 3
    assert exported["dev1"]["weights_hash"] == exported["dev2"]["weights_hash"] != exported["dev3"]["weights_hash"]
    # the inference path can serve the exported partitions: head.onnx -> body (torch) -> tail.onnx
    import onnxruntime as ort

    from testbed.models.weights import load_weights

    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
    for name in ("dev1", "dev3"):
        model, digest = load_weights(Path(exported[name]["weights"]))
        a, b = reference.spec.splits[int(name[-1]) - 1]
        assert digest == exported[name]["weights_hash"] and exported[name]["partition"].endswith(f":{a}:{b}")
        head = ort.InferenceSession(exported[name]["head"], providers=["CPUExecutionProvider"])
        tail = ort.InferenceSession(exported[name]["tail"], providers=["CPUExecutionProvider"])
        with torch.no_grad():
            a2 = model.run(torch.from_numpy(head.run(None, {"x": x})[0]), a, b).numpy()
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(tail.run(None, {"a2": a2})[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_privacy_the_edge_sees_only_activations_and_gradients(reference: Run) -> None:
    """Every message the edge received: from devices only a1 (forward) and dL/da2 (backward), float32, of the
    cut layers' shapes; from the controller only control metadata and the body's initial weights. No frame
    contains a batch of labels or a raw image, and the edge process never opened a dataset or data file."""
    from testbed.models import build_model
    from testbed.training.experiment import batch_order

    spec, run_dir = reference.spec, reference.run_dir
    assert reference.record is not None
    lines = [json.loads(line) for line in reference.record.read_text().splitlines()]
    footer = lines.pop()
    blob = (reference.record.parent / (reference.record.name + ".bin")).read_bytes()
    shapes = activation_shapes(build_model("cnn"))
    splits = dict(zip(spec.device_names, spec.splits, strict=True))
    body = range(min(a for a, _ in spec.splits), max(b for _, b in spec.splits))
    kinds: dict[str, int] = {}
    for msg in lines:
        kinds[msg["kind"]] = kinds.get(msg["kind"], 0) + 1
        if msg["socket"] == "data":
            a, b = splits[msg["device"]]
            (tensor,) = msg["tensors"]
            expected = {"train_forward": ("a1", shapes[a]), "train_backward": ("g2", shapes[b])}[msg["kind"]]
            assert tensor["name"] == expected[0] and tensor["dtype"] == "float32"
            assert 1 <= tensor["shape"][0] <= spec.training.batch_size
            assert tuple(tensor["shape"][1:]) == tuple(expected[1])
        else:
            assert msg["kind"] in ("sync", "round_start") and msg["device"] == "controller"
            for tensor in msg["tensors"]:
                if tensor["name"] == "meta":
                    assert tensor["dtype"] == "uint8"
                    continue
                kind, copy, key = tensor["name"].split("/", 2)  # the initial weights of the body blocks only
                assert kind == "w" and copy == "main" and int(key.split(".")[1]) in body, tensor["name"]
    assert kinds["train_forward"] == kinds["train_backward"] == 3 * 4  # 3 devices x 4 steps
    # the bytes: no batch of labels (in the order a device draws them; as int64 or uint8), no raw image
    B = spec.training.batch_size
    for i, name in enumerate(spec.device_names):
        with np.load(run_dir / "data" / f"{name}.npz") as shard:
            x, y = shard["x"], shard["y"]
        order = batch_order(spec.training.seed, i, 0, len(y))
        for s in range(0, len(y), B):
            labels = y[order[s : s + B]]
            assert labels.tobytes() not in blob and labels.astype(np.uint8).tobytes() not in blob
        for image in x[:: max(1, len(x) // 16)]:
            assert image.tobytes() not in blob
            assert image[0, 10].tobytes() not in blob  # not even one row of 28 pixels
    assert footer["opened"], "the audit hook saw the edge open files (its own modules at least)"
    data_dirs = (str(FASHION_MNIST_DIR), os.environ.get("TESTBED_FASHION_MNIST_DIR") or str(FASHION_MNIST_DIR),
                 str(run_dir / "data"))
    assert not [p for p in footer["opened"] if p.startswith(data_dirs) or p.endswith((".npz", "ubyte.gz"))]
    assert "testbed.training.datasets" not in footer["modules"]


def psl_reference(spec: ExperimentSpec, run_dir: Path) -> dict[str, np.ndarray]:
    """Synchronous U-shaped PSL written out in one process, as plainly as possible: per step, every active
    device's head on its batch (equal, or by_shard: proportional to its shard); the body once per group of
    devices with the same split (their activations concatenated in device order); each device's tail and
    loss; the body backward; the body's gradient the mean over the samples of the devices that used each
    block (each device's loss weighted by its batch); one body update; each device's head backward and
    update; FedAvg of the device-side models (and with fedavg_optimizer of their optimizer state) every K
    steps. Returns the final states named as in the run's checkpoint."""
    import copy

    from testbed.models import build_model
    from testbed.training.experiment import batch_bounds, batch_order, device_steps, steps_per_epoch
    from testbed.training.state import device_blocks, edge_blocks, fedavg, in_blocks, make_optimizer

    t = spec.training
    torch.manual_seed(t.seed)
    init = build_model(spec.model.name, **spec.model.kwargs())
    L = init.num_blocks
    shards = []
    for name in spec.device_names:
        with np.load(run_dir / "data" / f"{name}.npz") as f:
            shards.append((torch.from_numpy(f["x"]), torch.from_numpy(f["y"])))
    devs = [copy.deepcopy(init).train() for _ in shards]
    body = copy.deepcopy(init).train()
    dev_params = [[(n, p) for n, p in m.named_parameters() if in_blocks(n, frozenset(device_blocks(spec, i)))]
                  for i, m in enumerate(devs)]
    dev_opts = [make_optimizer([p for _, p in named], t) for named in dev_params]
    edge_keep = frozenset(edge_blocks(spec))
    edge_opt = make_optimizer([p for n, p in body.named_parameters() if in_blocks(n, edge_keep)], t)
    sizes = [len(y) for _, y in shards]
    own = device_steps(t.batch_sizes, sizes, t.batch_size)
    S = steps_per_epoch("psl", sizes, t.batch_size, own)
    loss_fn = torch.nn.CrossEntropyLoss()

    def device_state(i: int, optimizer: bool = False) -> dict[str, np.ndarray]:
        keep = frozenset(device_blocks(spec, i))
        out = {f"w/main/{k}": v.numpy().copy() for k, v in devs[i].state_dict().items() if in_blocks(k, keep)}
        if optimizer:
            for name, param in dev_params[i]:
                for field_name, value in dev_opts[i].state.get(param, {}).items():
                    out[f"o/main/{name}/{field_name}"] = value.numpy().copy()
        return out

    for e in range(t.epochs):
        orders = [torch.from_numpy(batch_order(t.seed, i, e, n)) for i, n in enumerate(sizes)]
        for s in range(S):
            active = [i for i in range(len(sizes)) if s < own[i]]
            bounds = {i: batch_bounds(t.batch_sizes, sizes[i], t.batch_size, own[i], s) for i in active}
            batches = {i: orders[i][lo:hi] for i, (lo, hi) in bounds.items()}
            mean_b = sum(len(batches[i]) for i in active) / len(active)
            scale = {i: len(batches[i]) / mean_b for i in active}
            a1 = {i: devs[i].run(shards[i][0][batches[i]], 0, spec.splits[i][0]) for i in active}
            groups: dict[tuple[int, int], list[int]] = {}
            for i in active:
                groups.setdefault(spec.splits[i], []).append(i)
            outs, g2 = [], {}
            for (a, b), members in groups.items():
                h = torch.cat([a1[i].detach() for i in members]).requires_grad_(True)
                out = body.run(h, a, b)
                lens = [len(batches[i]) for i in members]
                for i, piece in zip(members, out.detach().split(lens), strict=True):
                    a2 = piece.clone().requires_grad_(True)
                    loss_fn(devs[i].run(a2, b, L), shards[i][1][batches[i]]).backward()
                    g2[i] = a2.grad
                outs.append((h, out, members, lens))
            edge_opt.zero_grad(set_to_none=True)
            g1 = {}
            users: dict[int, float] = {}
            for h, out, members, lens in outs:
                out.backward(torch.cat([g2[i] if scale[i] == 1.0 else g2[i] * scale[i] for i in members]))
                for i, piece in zip(members, h.grad.split(lens), strict=True):
                    g1[i] = piece if scale[i] == 1.0 else piece / scale[i]
                a, b = spec.splits[members[0]]
                for k in range(a, b):
                    users[k] = users.get(k, 0.0) + sum(scale[i] for i in members)
            for k, total in users.items():
                for p in body.blocks[k].parameters():
                    if total != 1.0 and p.grad is not None:
                        p.grad.div_(total)
            edge_opt.step()
            for i in active:
                a1[i].backward(g1[i])
                dev_opts[i].step()
                dev_opts[i].zero_grad(set_to_none=True)
            if t.fedavg_every and (e * S + s + 1) % t.fedavg_every == 0:
                states = [device_state(i, t.fedavg_optimizer) for i in range(len(devs))]
                for i in range(len(devs)):
                    by_name = dict(dev_params[i])
                    if t.fedavg_optimizer:
                        dev_opts[i].state.clear()
                    for key in states[i]:
                        holders = [j for j in range(len(devs)) if key in states[j]]
                        avg = fedavg([{key: states[j][key]} for j in holders], [float(sizes[j]) for j in holders])
                        kind, _, name = key.split("/", 2)
                        if kind == "w":
                            with torch.no_grad():
                                devs[i].state_dict()[name].copy_(torch.from_numpy(avg[key]))
                        else:
                            pname, field_name = name.rsplit("/", 1)
                            dev_opts[i].state[by_name[pname]][field_name] = torch.from_numpy(avg[key].copy())
    out = {}
    for i, name in enumerate(spec.device_names):
        out.update({f"{name}#{k}": v for k, v in device_state(i).items()})
    out.update({f"edge#w/main/{k}": v.numpy().copy() for k, v in body.state_dict().items() if in_blocks(k, edge_keep)})
    return out


def weights_only(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if "#w/" in k}


@pytest.mark.slow
def test_psl_over_the_wire_equals_the_plain_implementation(reference: Run) -> None:
    """Three processes and an edge compute bit-for-bit what psl_reference does in one process: batching of
    same-split devices, a group per split, per-block gradient averaging, FedAvg of blocks held by some devices."""
    assert_same_states(weights_only(checkpoint(reference.run_dir)), psl_reference(reference.spec, reference.run_dir))


@pytest.mark.slow
def test_psl_by_shard_batches_and_optimizer_averaging_equal_the_plain_implementation(tmp_path: Path) -> None:
    """Unequal (Dirichlet) shards, each cut into the same number of steps (batches in proportion to the
    shards), the body's gradient weighted by each device's batch, device-side weights and Adam state averaged
    every 2 steps: the wire computes bit for bit what psl_reference does."""
    spec = experiment(scheme="psl", devices=3, split=[[3, 7], [3, 7], [4, 7]],
                      data={"partition": "dirichlet", "alpha": 1.0, "min_samples": 40},
                      training={"batch_size": 16, "batch_sizes": "by_shard", "fedavg_every": 2,
                                "fedavg_optimizer": True, "epochs": 2, "rounds_per_epoch": 2})
    res = run_experiment(spec, tmp_path / "run")
    sizes, batches = res["shard_sizes"], res["batch_sizes"]
    assert len(set(sizes)) == 3 and len(set(batches)) == 3
    S = -(-sum(sizes) // 48)  # the steps of a centralized epoch with the global batch of 3 x 16
    assert res["device_steps"] == [S] * 3
    for r in res["history"]:  # every device takes every step: the largest shard never trains alone
        assert len({d["steps"] for d in r["devices"]}) == 1 and sum(d["steps"] for d in r["devices"]) > 0
    assert sum(d["samples"] for r in res["history"] for d in r["devices"]) == 2 * sum(sizes)
    assert res["history"][0]["edge"]["max_batch"] in (batches[0] + batches[1], batches[0] + batches[1] - 1,
                                                      batches[0] + batches[1] - 2)  # dev1 + dev2 batched
    state = checkpoint(tmp_path / "run")
    assert_same_states(weights_only(state), psl_reference(spec, tmp_path / "run"))
    # optimizer state averaged too: the devices sharing a split hold the same Adam moments after the last step
    for key in [k for k in state if k.startswith("dev1#o/")]:
        np.testing.assert_array_equal(state[key], state[key.replace("dev1#", "dev2#")])


@pytest.mark.slow
def test_resume_after_sigkill_of_a_device_then_of_the_edge(psl1: Run, tmp_path: Path) -> None:
    """Kill the device mid-round 2, resume; kill the edge mid-round 3, resume: the result is bit-for-bit the
    uninterrupted run's, no round is lost but the one in progress, and no process is left behind."""
    spec, run_dir = psl1.spec, tmp_path / "run"
    killed: list[int] = []

    def kill(victim: str, at_round: int):
        def on_event(kind: str, **info: Any) -> None:
            if kind == "round_started" and info["round"] == at_round:
                os.kill(info["pids"][victim], signal.SIGKILL)
                killed.append(info["pids"][victim])
        return on_event

    with pytest.raises(RunFailed, match=r"dev1 exited unexpectedly \(killed by signal SIGKILL\)") as info:
        run_experiment(spec, run_dir, on_event=kill("dev1", 2))
    assert "stopped after round 1 of 3" in str(info.value) and "--resume" in str(info.value)
    assert [r["round"] for r in json.loads((run_dir / "rounds.json").read_text())] == [1]
    with pytest.raises(RunFailed, match="already holds a checkpoint"):
        run_experiment(spec, run_dir)
    with pytest.raises(RunFailed, match=r"(?s)edge exited unexpectedly .*stopped after round 2 of 3"):
        run_experiment(spec, run_dir, resume=True, on_event=kill("edge", 3))
    resumed = run_experiment(spec, run_dir, resume=True)
    assert [r["round"] for r in resumed["history"]] == [1, 2, 3]
    assert_same_states(checkpoint(run_dir), checkpoint(psl1.run_dir))
    assert [r["test_acc"] for r in resumed["history"]] == [r["test_acc"] for r in psl1.results["history"]]
    pids = json.loads((run_dir / "pids.json").read_text()).values()
    for pid in [*killed, *pids]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    changed = parse_experiment({**spec.to_dict(), "training": {**spec.to_dict()["training"], "lr": 0.01}})
    with pytest.raises(RunFailed, match="belongs to a different experiment"):
        run_experiment(changed, run_dir, resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["sfl", "sl", "psl-async"])
def test_sfl_sl_and_async_psl(scheme: str, tmp_path: Path) -> None:
    training = {"mode": "async"} if scheme == "psl-async" else {}
    spec = experiment(scheme=scheme.split("-")[0], devices=2, split=[3, 7], training=training)
    res = run_experiment(spec, tmp_path / scheme)
    state = checkpoint(tmp_path / scheme)
    history = res["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    if scheme == "sfl":
        # one body copy per device, averaged every round, as are the device-side models
        for key in [k for k in state if k.startswith("edge#w/dev1/")]:
            np.testing.assert_array_equal(state[key], state[key.replace("w/dev1/", "w/dev2/")])
        for key in [k for k in state if k.startswith("dev1#w/")]:
            np.testing.assert_array_equal(state[key], state[key.replace("dev1#", "dev2#")])
        assert history[0]["edge"]["max_batch"] == 32  # served one device at a time
    elif scheme == "psl-async":
        # each device served as its message arrives; the body recomputed at the backward, one update per device
        assert history[0]["edge"]["max_batch"] == 32 and history[0]["edge"]["batches"] == 2 * 2
    else:
        # one device at a time: dev1 trains on its 6 batches, then dev2 continues from dev1's model
        steps = [[d["steps"] for d in r["devices"]] for r in history]
        assert steps == [[4, 0], [2, 2], [0, 4]]
        assert history[1]["devices"][1]["control_bytes_down"] > 0  # the relay
        assert list(res["final"]["test_acc_by_model"]) == ["dev2"]
