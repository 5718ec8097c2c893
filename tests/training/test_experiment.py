from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from testbed.training.experiment import (
    ExperimentError,
    batch_bounds,
    batch_order,
    device_steps,
    load_experiment,
    parse_experiment,
    plan_round,
    steps_per_epoch,
)

REPO = Path(__file__).resolve().parents[2]
PSL = {"scheme": "psl", "devices": 4, "split": [3, 7]}


def problems(doc: object) -> str:
    with pytest.raises(ExperimentError) as info:
        parse_experiment(doc, source="x.yaml")
    return str(info.value)


TRAINING_EXPERIMENTS = sorted(p for pattern in ("psl*.yaml", "sfl*.yaml", "sl*.yaml", "centralized*.yaml")
                              for p in (REPO / "experiments").glob(pattern))  # run-*.yaml: the controller's


@pytest.mark.parametrize("path", TRAINING_EXPERIMENTS, ids=lambda p: p.name)
def test_example_experiments_are_valid(path: Path) -> None:
    spec = load_experiment(path)
    assert spec.name == path.stem
    assert spec.data.dataset == "fashion-mnist" and spec.data.train_samples is None
    if spec.scheme != "centralized":
        assert spec.devices == 4 and spec.splits == ((3, 7),) * 4


def test_defaults_round_trip_and_identity() -> None:
    spec = parse_experiment(PSL)
    assert spec.training.optimizer == "adam" and spec.training.batch_size == 64 and spec.num_blocks == 10
    assert spec.device_names == ("dev1", "dev2", "dev3", "dev4")
    assert parse_experiment(spec.to_dict()) == spec
    central = parse_experiment({"scheme": "centralized"})
    assert parse_experiment(central.to_dict()) == central and central.splits == ()
    # The identity (checked on --resume) ignores the name and the runtime, not the training settings.
    renamed = parse_experiment({**PSL, "name": "other", "runtime": {"timeout_s": 5, "edge_threads": 2}})
    assert renamed.identity_hash() == spec.identity_hash()
    assert parse_experiment({**PSL, "training": {"seed": 1}}).identity_hash() != spec.identity_hash()
    # Keys added later change the identity only when set, so checkpoints written before them still resume.
    same = parse_experiment({**PSL, "training": {"batch_sizes": "equal", "fedavg_optimizer": False}})
    assert same.identity_hash() == spec.identity_hash()
    assert parse_experiment({**PSL, "training": {"batch_sizes": "by_shard"}}).identity_hash() != spec.identity_hash()
    assert spec.identity_hash() == "8be9435b001a9e0eb40a7b79313d3885313a4b8fffbb5c7cb12435b81d70e322"  # as before
    per_device = parse_experiment({**PSL, "split": [[3, 7], [2, 7], [3, 8], [1, 9]]})
    assert per_device.splits == ((3, 7), (2, 7), (3, 8), (1, 9))


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({**PSL, "trainig": {}}, "trainig: unknown key (did you mean 'training'?)"),
        ({**PSL, "training": {"learning_rate": 0.1}}, "training.learning_rate: unknown key"),
        ({**PSL, "training": {"lr": "fast"}}, "training.lr: expected a finite number, got a string 'fast'"),
        ({**PSL, "training": {"lr": 0}}, "training.lr: must be > 0.0"),
        ({**PSL, "training": {"batch_size": 2.5}}, "training.batch_size: expected an integer, got a number 2.5"),
        ({**PSL, "training": {"epochs": True}}, "training.epochs: expected an integer, got a boolean"),
        ({**PSL, "training": {"optimizer": "lion"}}, "training.optimizer: expected one of adam, sgd, got 'lion'"),
        ({**PSL, "training": {"momentum": 0.9}}, "training.momentum: only applies to optimizer: sgd"),
        ({**PSL, "devices": 0}, "devices: must be between 1 and 64, got 0"),
        ({**PSL, "split": [0, 7]}, "split: impossible split [0, 7] for a model of L=10 blocks: need 1 <= a < b <= 9"),
        ({**PSL, "split": [5, 5]}, "impossible split [5, 5]"),
        ({**PSL, "split": [3, 10]}, "impossible split [3, 10]"),
        ({**PSL, "split": [[3, 7], [3, 7]]}, "split: 2 splits given for 4 devices"),
        ({**PSL, "split": [[3, 7], [3, 7], [3, 7], [9, 2]]}, "split[3]: impossible split [9, 2]"),
        ({**PSL, "split": "3:7"}, "split: expected [a, b]"),
        ({"scheme": "psl"}, "split: required for split schemes"),
        ({**PSL, "scheme": "sfl", "split": [[3, 7], [3, 7], [3, 7], [2, 7]]}, "sfl needs one split for all devices"),
        ({**PSL, "scheme": "sl", "training": {"fedavg_every": 5}}, "fedavg_every: only applies to psl"),
        ({**PSL, "scheme": "sl", "training": {"batch_sizes": "by_shard"}},
         "training.batch_sizes: only applies to the parallel schemes psl and sfl, not sl"),
        ({**PSL, "training": {"batch_sizes": "proportional"}}, "training.batch_sizes: expected one of equal, by_shard"),
        ({**PSL, "training": {"batch_sizes": "by_shard", "mode": "async"}}, "by_shard needs the synchronous mode"),
        ({**PSL, "training": {"fedavg_optimizer": True}},
         "fedavg_optimizer: only applies to psl with fedavg_every > 0"),
        ({**PSL, "training": {"fedavg_every": 1, "fedavg_optimizer": "yes"}},
         "training.fedavg_optimizer: expected true or false"),
        ({**PSL, "scheme": "sfl", "training": {"mode": "async"}}, "training.mode: only psl has an asynchronous"),
        ({"scheme": "centralized", "split": [3, 7]}, "centralized training has no split"),
        ({**PSL, "data": {"partition": "dirichlet"}}, "data.alpha: required for the dirichlet partition"),
        ({**PSL, "data": {"alpha": 0.5}}, "data.alpha: only applies to the dirichlet partition"),
        ({**PSL, "data": {"dataset": "cifar10"}}, "data.dataset: expected one of fashion-mnist, digits, auto"),
        ({**PSL, "model": {"name": "vgg"}}, "unknown model 'vgg'; known models: cnn, resnet18"),
        ({**PSL, "model": {"config": {"depth": 3}}}, "does not accept config key(s) depth"),
        ({**PSL, "runtime": {"export_onnx": "yes"}}, "runtime.export_onnx: expected true or false"),
        ({**PSL, "name": "a b"}, "name: expected a short name"),
        ({"devices": 2}, "scheme: required: one of psl, sfl, sl, centralized"),
        ({**PSL, "scheme": "fl"}, "scheme: expected one of psl, sfl, sl, centralized, got 'fl'"),
    ],
)
def test_invalid_experiments_say_what_and_where(doc: dict, expected: str) -> None:
    message = problems(doc)
    assert message.startswith("x.yaml is not a valid experiment:")
    assert expected in message


def test_every_problem_is_listed_at_once() -> None:
    message = problems({**PSL, "devices": "four", "training": {"lr": -1, "seed": "x"}, "colour": 1})
    lines = message.splitlines()[1:]
    assert len(lines) == 4, message
    assert any(line.strip().startswith("colour: unknown key") for line in lines)


def test_yaml_level_errors(tmp_path: Path) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("scheme: psl\nscheme: sl\n")
    with pytest.raises(ExperimentError, match="duplicate key 'scheme'"):
        load_experiment(dup)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ExperimentError, match="is empty"):
        load_experiment(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("scheme: [psl\n")
    with pytest.raises(ExperimentError, match="not valid YAML"):
        load_experiment(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- psl\n")
    with pytest.raises(ExperimentError, match="must be a YAML mapping"):
        load_experiment(listing)
    with pytest.raises(ExperimentError, match="cannot read experiment file"):
        load_experiment(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------
# The schedule


def walk(scheme: str, sizes: list[int], batch: int, rounds: int, k: int, epochs: int = 2,
         steps: list[int] | None = None):
    """Every (epoch, device, step, seq) the plan runs, and the segments."""
    own = steps
    steps, segments = [], []
    for r in range(rounds * epochs):
        plan = plan_round(scheme, sizes, batch, rounds, k, r, own)
        assert plan.round == r and plan.epoch == r // rounds
        for seg in plan.segments:
            segments.append(seg)
            for part in seg.parts:
                for s in range(part.first, part.end):
                    steps.append((seg.epoch, part.device, s, part.seq0 + s - part.first))
    return steps, segments


@settings(max_examples=60, deadline=None)
@given(
    scheme=st.sampled_from(["psl", "sfl", "sl"]),
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=6),
    batch=st.integers(1, 64),
    rounds=st.integers(1, 5),
    k=st.integers(0, 7),
    by_shard=st.booleans(),
)
def test_every_device_visits_each_of_its_batches_once_per_epoch(scheme, sizes, batch, rounds, k, by_shard) -> None:
    if scheme != "psl":
        k = 0
    # own step counts: ceil(n_i / batch), or (by_shard) arbitrary ones
    own = [1 + (n * 7 + batch) % 40 for n in sizes] if by_shard else [-(-n // batch) for n in sizes]
    total = steps_per_epoch(scheme, sizes, batch, own if by_shard else None)
    if total < rounds:
        with pytest.raises(ExperimentError, match="rounds_per_epoch"):
            plan_round(scheme, sizes, batch, rounds, k, 0, own if by_shard else None)
        return
    steps, segments = walk(scheme, sizes, batch, rounds, k, steps=own if by_shard else None)
    for epoch in range(2):
        for d in range(len(sizes)):
            mine = [s for e, dev, s, _ in steps if e == epoch and dev == d]
            assert mine == list(range(own[d]))  # in order, each batch once
    seqs_by_device = {}
    for e, d, _, q in steps:
        seqs_by_device.setdefault(d, []).append(q)
        assert e * total <= q < (e + 1) * total
    for qs in seqs_by_device.values():
        assert qs == sorted(set(qs))  # strictly increasing per device
    if scheme == "sl":
        assert all(len(seg.parts) == 1 for seg in segments)
        assert sorted({q for *_, q in steps}) == list(range(2 * total))  # one device per seq
    else:  # lockstep: devices active at a step share its seq
        for e, _, s, q in steps:
            assert q == e * total + s
    if k:
        for seg in segments:
            end = max(p.seq0 + p.end - p.first for p in seg.parts)
            assert seg.fedavg_after == (end % k == 0)
            start = min(p.seq0 for p in seg.parts)
            assert all(q % k for q in range(start + 1, end)), "no FedAvg boundary inside a segment"


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 30000), min_size=1, max_size=8), batch=st.integers(1, 64),
       epoch=st.integers(0, 3))
def test_by_shard_cuts_every_shard_into_the_steps_of_a_centralized_epoch(sizes, batch, epoch) -> None:
    S = -(-sum(sizes) // (batch * len(sizes)))
    if min(sizes) < S:
        with pytest.raises(ExperimentError, match="cannot fill the"):
            device_steps("by_shard", sizes, batch)
        return
    assert device_steps("by_shard", sizes, batch) == [S] * len(sizes)
    for n in sizes:
        bounds = [batch_bounds("by_shard", n, batch, S, s) for s in range(S)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n  # every sample once, in order
        assert all(hi == nxt for (_, hi), (nxt, _) in itertools.pairwise(bounds))
        lens = [hi - lo for lo, hi in bounds]
        assert min(lens) >= 1 and max(lens) - min(lens) <= 1  # nearly equal batches
    # every step's union of batches is about the global batch
    for s in range(S):
        total = sum(hi - lo for lo, hi in (batch_bounds("by_shard", n, batch, S, s) for n in sizes))
        assert abs(total - sum(sizes) / S) <= len(sizes)
    assert device_steps("equal", sizes, batch) == [-(-n // batch) for n in sizes]


def test_by_shard_batches_end_the_epoch_together() -> None:
    """The Dirichlet(0.5) shards of Fashion-MNIST in experiments/psl-noniid.yaml: equal batches of 16 leave the
    largest shard training alone for 807 of 1588 steps; by_shard walks every shard in the 938 steps of a
    centralized epoch with batch 64 (batches of 11 to 28)."""
    sizes = [12496, 10240, 25396, 11868]
    assert steps_per_epoch("psl", sizes, 16) == 1588 and -(-12496 // 16) == 781
    steps = device_steps("by_shard", sizes, 16)
    assert steps == [938] * 4 and steps_per_epoch("psl", sizes, 16, steps) == 938
    lens = [{hi - lo for lo, hi in (batch_bounds("by_shard", n, 16, 938, s) for s in range(938))} for n in sizes]
    assert lens == [{13, 14}, {10, 11}, {27, 28}, {12, 13}]
    walked, _ = walk("psl", sizes, 16, 4, 1, epochs=1, steps=steps)
    for d in range(len(sizes)):
        assert [s for _, dev, s, _ in walked if dev == d] == list(range(938))


def test_plan_examples() -> None:
    # 2 devices of 100 and 40 samples, batch 32: 4 and 2 batches; an epoch of 4 steps in 2 rounds.
    plan = plan_round("psl", [100, 40], 32, 2, 0, 1)
    assert plan.epoch == 0 and plan.epoch_progress == 1.0
    (seg,) = plan.segments
    assert [(p.device, p.first, p.end) for p in seg.parts] == [(0, 2, 4)]  # device 1 has no batches left
    plan = plan_round("psl", [100, 100], 32, 1, 3, 1)  # epoch 1, K=3: global steps 4..8, cut at 6
    assert [(p.first, p.end, s.fedavg_after) for s in plan.segments for p in s.parts[:1]] == [(0, 2, True),
                                                                                             (2, 4, False)]
    plan = plan_round("sl", [100, 40], 32, 2, 0, 0)  # sequence: dev0 x4, dev1 x2; round 0 = first 3
    assert [(p.device, p.first, p.end, p.seq0) for s in plan.segments for p in s.parts] == [(0, 0, 3, 0)]
    plan = plan_round("sl", [100, 40], 32, 2, 0, 1)
    assert [(p.device, p.first, p.end, p.seq0) for s in plan.segments for p in s.parts] == [(0, 3, 4, 3),
                                                                                           (1, 0, 2, 4)]
    assert steps_per_epoch("centralized", [100, 40], 32) == 5


def test_batch_order_is_a_seeded_permutation() -> None:
    a = batch_order(0, 1, 0, 50)
    assert sorted(a.tolist()) == list(range(50))
    assert a.tolist() == batch_order(0, 1, 0, 50).tolist()
    assert a.tolist() != batch_order(0, 2, 0, 50).tolist() != batch_order(0, 1, 1, 50).tolist()
    assert np.array_equal(batch_order(3, 0, 2, 10), batch_order(3, 0, 2, 10))


# ---------------------------------------------------------------------------------------------
# The command's validation happens before anything starts


def test_cli_check_and_errors(tmp_path: Path) -> None:
    import typer

    from testbed.cli.errors import friendly_errors
    from testbed.cli.train import train

    app = typer.Typer()
    app.command()(friendly_errors(train))
    runner = CliRunner()
    ok = runner.invoke(app, [str(REPO / "experiments" / "psl-noniid.yaml"), "--check"])
    assert ok.exit_code == 0, ok.output
    assert "psl · cnn on fashion-mnist · 4 devices, dirichlet α=0.5, split 3:7" in ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme: psl\ndevices: 2\nsplit: [3, 12]\ntraining: {batchsize: 8}\n")
    result = runner.invoke(app, [str(bad), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "split: impossible split [3, 12]" in result.output
    assert "training.batchsize: unknown key (did you mean 'batch_size'?)" in result.output
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_cli_trains_writes_outputs_and_refuses_to_overwrite(tmp_path: Path) -> None:
    import typer

    from testbed.cli.errors import friendly_errors
    from testbed.cli.train import train

    app = typer.Typer()
    app.command()(friendly_errors(train))
    exp = tmp_path / "central.yaml"
    exp.write_text("scheme: centralized\ndata: {train_samples: 128, test_samples: 50}\n"
                   "training: {batch_size: 32, rounds_per_epoch: 2}\nruntime: {eval_batch_size: 50}\n")
    run_dir = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, [str(exp), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "final test accuracy" in result.output
    for name in ("rounds.csv", "devices.csv", "rounds.json", "results.json", "checkpoint.safetensors",
                 "accuracy.png", "time_breakdown.png", "export/models.json"):
        assert (run_dir / name).exists(), name
    assert len((run_dir / "rounds.csv").read_text().splitlines()) == 3
    again = runner.invoke(app, [str(exp), "--run-dir", str(run_dir)])
    assert again.exit_code == 2 and "already holds a checkpoint; pass --resume" in again.output
    resumed = runner.invoke(app, [str(exp), "--run-dir", str(run_dir), "--resume"])
    assert resumed.exit_code == 0, resumed.output
