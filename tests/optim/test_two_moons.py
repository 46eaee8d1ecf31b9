"""Seed 000's two-moons task: its K-FAC reached 0.59 validation accuracy, SGD/Adam 0.99.

Everything as in the seed: its NumPy generator (``np.random.seed(42)`` then
``make_two_moons(n_samples=400, noise=0.12)``, reproduced with ``RandomState(42)`` and the
same calls, so the data are the notebook's), an 80/20 train/validation split, MLP 2-32-2
with ReLU and the seed's initialization (weights ``0.1 · N(0, 1)``, zero biases),
cross-entropy, batch 64 with ``n // 64 = 5`` steps per epoch, 5 epochs (25 steps).

K-FAC settings: lr 0.3, damping 1e-2, MC Fisher, inverses every step, factor decay 0.95.
(With these, 10 initialization seeds out of 10 reached 1.0 in both float32 and float64;
the seed's own knobs lr 0.5 / damping 1e-2 / inverses every 5 steps reached ≥ 0.975 on 9 of 10.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxkfac

BATCH, EPOCHS = 64, 5


def make_two_moons(rng: np.random.RandomState, n_samples: int = 200, noise: float = 0.15):
    """Seed 000's generator, drawing from ``rng`` instead of the global NumPy state."""
    n = n_samples // 2
    theta = np.linspace(0, np.pi, n)
    x1 = np.stack([np.cos(theta), np.sin(theta)], axis=1) + noise * rng.randn(n, 2)
    x2 = np.stack([1 - np.cos(theta), -np.sin(theta) - 0.5], axis=1) + noise * rng.randn(n, 2)
    X = np.vstack([x1, x2])
    y = np.hstack([np.zeros(n, dtype=int), np.ones(n, dtype=int)])
    idx = rng.permutation(len(y))
    return X[idx], y[idx]


def two_moons(dtype: torch.dtype):
    X, y = make_two_moons(np.random.RandomState(42), n_samples=400, noise=0.12)
    X, y = torch.tensor(X, dtype=dtype), torch.tensor(y)
    split = int(0.8 * X.shape[0])
    return (X[:split], y[:split]), (X[split:], y[split:])


def seed_mlp(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2)).to(dtype)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.normal_(0.0, 0.1)
            layer.bias.zero_()
    return model


def accuracy(model: nn.Module, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_kfac_solves_two_moons(dtype):
    (X_train, y_train), (X_val, y_val) = two_moons(dtype)
    assert X_train.shape == (320, 2) and X_val.shape == (80, 2)
    model = seed_mlp(dtype)
    loss_func = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(model, example_inputs=(X_train[:2],))
    opt = fxkfac.KFAC(
        kmod,
        loss_func=loss_func,
        lr=0.3,
        damping=1e-2,
        regulator=None,
        fisher_type="mc",
        inverse_every=1,
        factor_decay=0.95,
        seed=0,
    )
    generator = torch.Generator().manual_seed(0)
    steps_per_epoch = X_train.shape[0] // BATCH
    losses = []
    for _ in range(EPOCHS):
        perm = torch.randperm(X_train.shape[0], generator=generator)
        for b in range(steps_per_epoch):
            idx = perm[b * BATCH : (b + 1) * BATCH]
            out, cap = kmod(X_train[idx])
            loss = loss_func(out, y_train[idx])
            opt.zero_grad()
            loss.backward()
            stats = opt.step(cap)
            assert stats["skipped"] is None
            losses.append(loss.item())
    assert len(losses) == 25
    val_acc = accuracy(model, X_val, y_val)
    print(f"two moons {dtype}: validation accuracy {val_acc:.4f}, last loss {losses[-1]:.4g}")
    assert val_acc >= 0.98, f"validation accuracy {val_acc:.4f} (losses {losses})"
