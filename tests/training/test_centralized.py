from __future__ import annotations

import numpy as np
import torch

from testbed.models import build_model
from testbed.models.weights import state_hash
from testbed.training.centralized import TrainConfig, predict, train_centralized


def toy_data(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Two classes told apart by the brightness of the left half of the image."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, n).astype(np.int64)
    x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32) * 0.1
    x[:, :, :, :14] += (2 * y - 1)[:, None, None, None].astype(np.float32)
    return x, y


def test_training_is_deterministic_for_a_seed_and_learns() -> None:
    torch.set_num_threads(1)
    x, y = toy_data()
    config = TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=7)
    hashes = []
    for _ in range(2):
        torch.manual_seed(0)
        model = train_centralized(build_model("cnn"), x, y, config)
        hashes.append(state_hash(model))
    assert hashes[0] == hashes[1]
    assert (predict(model, x) == y).mean() > 0.95
    assert not model.training


def test_progress_reports_every_step() -> None:
    x, y = toy_data(64)
    steps: list[tuple[int, int]] = []
    train_centralized(build_model("cnn"), x, y, TrainConfig(epochs=1, batch_size=16),
                      on_step=lambda step, total, loss: steps.append((step, total)))
    assert steps == [(i, 4) for i in range(1, 5)]
