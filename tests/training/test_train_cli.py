"""`testbed train --json`: the run's summary as JSON on stdout and nothing else (no progress display)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from testbed.cli.errors import friendly_errors
from testbed.cli.train import train

REPO = Path(__file__).resolve().parents[2]
CENTRAL = ("scheme: centralized\ndata: {train_samples: 128, test_samples: 50}\n"
           "training: {batch_size: 32, rounds_per_epoch: 2}\nruntime: {eval_batch_size: 50, export_onnx: false}\n")


def app() -> typer.Typer:
    a = typer.Typer()
    a.command()(friendly_errors(train))
    return a


def test_json_summary_of_a_run(tmp_path: Path) -> None:
    exp = tmp_path / "central.yaml"
    exp.write_text(CENTRAL)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app(), [str(exp), "--run-dir", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the whole of stdout: no table, no progress bar
    results = json.loads((run_dir / "results.json").read_text())
    assert summary["name"] == "central" and summary["scheme"] == "centralized" and summary["rounds"] == 2
    assert summary["final_test_acc"] == results["final"]["test_acc"] and 0.0 <= summary["final_test_acc"] <= 1.0
    assert summary["test_acc_by_round"] == [r["test_acc"] for r in results["history"]]
    assert summary["metrics_url"] is None
    assert summary["outputs"]["rounds.csv"] == str(run_dir / "rounds.csv")
    assert set(summary["outputs"]) >= {"rounds.csv", "rounds.json", "devices.csv", "results.json",
                                       "checkpoint.safetensors", "export/models.json"}
    assert "final test accuracy" not in result.output and "rounds" not in result.stderr


def test_json_check_and_errors(tmp_path: Path) -> None:
    ok = CliRunner().invoke(app(), [str(REPO / "experiments" / "psl-iid.yaml"), "--check", "--json"])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert doc["valid"] is True and doc["spec"]["scheme"] == "psl" and doc["spec"]["split"] == [[3, 7]] * 4
    exp = tmp_path / "central.yaml"
    exp.write_text(CENTRAL)
    bad = CliRunner().invoke(app(), [str(exp), "--run-dir", str(tmp_path / "run"), "--json",
                                     "--metrics-hold-s", "5"])
    assert bad.exit_code == 2 and "--metrics-hold-s needs --metrics-port" in bad.output
    assert not (tmp_path / "run").exists()
