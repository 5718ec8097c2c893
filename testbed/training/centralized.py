"""Centralised (unsplit) training: the reference every split scheme is compared against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from testbed.models import BlockModel


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    max_train_samples: int | None = None  # None: the whole training set

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def train_centralized(
    model: BlockModel,
    x_train: np.ndarray,
    y_train: np.ndarray,
    config: TrainConfig,
    on_step: Callable[[int, int, float], None] | None = None,
) -> BlockModel:
    """Train in place with Adam, deterministically for a seed; `on_step(step, total, loss)` reports progress."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    n = len(x_train) if config.max_train_samples is None else min(len(x_train), config.max_train_samples)
    x = torch.from_numpy(np.ascontiguousarray(x_train[:n]))
    y = torch.from_numpy(np.ascontiguousarray(y_train[:n]))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    total = steps_per_epoch * config.epochs
    model.train()
    step = 0
    for _ in range(config.epochs):
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            step += 1
            if on_step is not None:
                on_step(step, total, loss.item())
    model.eval()
    return model


@torch.inference_mode()
def predict(model: BlockModel, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class predictions of the unsplit model (the reference the split pipeline must match)."""
    model.eval()
    out = [
        model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))).argmax(dim=1).numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
