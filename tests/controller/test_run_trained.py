"""The model `testbed train` produced is served by the inference path: `testbed run` with the exported weights
deploys ONNX heads/tails to real device agents and the body to a real edge, and classifies with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from testbed.training.experiment import parse_experiment
from testbed.training.schemes import run_experiment as train

from .test_run import PROFILES, run_cli, write_spec


@pytest.mark.slow
def test_trained_partitions_are_served_by_testbed_run(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = parse_experiment({
            "name": "tiny", "scheme": "psl", "devices": 2, "split": [2, 8],
            "data": {"train_samples": 1024, "test_samples": 64},
            "training": {"batch_size": 32, "epochs": 1, "rounds_per_epoch": 2, "fedavg_every": 1},
            "runtime": {"export_onnx": False, "eval_batch_size": 64}})
        results = train(spec, tmp_path / "train")
    finally:
        torch.set_num_threads(threads)
    exported = results["exported"]["dev1"]
    weights, digest = Path(exported["weights"]), exported["weights_hash"]
    assert weights.exists()
    out = tmp_path / "out"
    run_spec = write_spec(tmp_path / "serve.yaml", name="serve-trained", weights=str(weights),
                          placement="loopback", edge={"device": "cpu"},
                          devices=[{"id": "dev1", "data": "shard", "split": [2, 8]},
                                   {"id": "dev2", "data": "shard", "split": [3, 7]}],
                          planner={**PROFILES, "resplit": False},
                          workload={"batch_size": 8, "requests": 20, "dataset": "auto"}, metrics=False,
                          output=str(out))
    proc = run_cli("run", str(run_spec), "--json", "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["failed"] == 0 and summary["requests"] == 40
    assert summary["devices"]["dev1"]["by_partition"] == {f"{digest[:16]}:2:8": 20}
    assert summary["devices"]["dev2"]["by_partition"] == {f"{digest[:16]}:3:7": 20}
    # One epoch on 1024 images: far above chance (10%) on the devices' own test shards, through head.onnx ->
    # body on the edge -> tail.onnx.
    for dev in ("dev1", "dev2"):
        assert summary["accuracy"][dev] > 0.4, summary["accuracy"]
