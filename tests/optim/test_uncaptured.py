"""Parameters K-FAC does not precondition (LayerNorm, a bare scale) take a first-order step.

``uncaptured_update='sgd'`` must be exactly SGD on them (lr, momentum, weight decay of their
parameter group), ``'adam'`` exactly ``torch.optim.Adam``; the captured layers keep taking
K-FAC steps.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxkfac

UNCAPTURED = ["norm.weight", "norm.bias", "scale"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(3, 6)
        self.norm = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x)))) * self.scale


def batches(count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 3, generator=generator), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(count)
    ]


def setup(uncaptured_update: str, uncaptured_group: dict, captured_lr: float = 0.2, **options):
    model = Net()
    kmod = fxkfac.compile(model, example_inputs=(torch.zeros(2, 3),))
    assert sorted(kmod.uncaptured) == sorted(UNCAPTURED)
    named = dict(model.named_parameters())
    groups = [
        {"params": [p for n, p in named.items() if n not in UNCAPTURED], "lr": captured_lr},
        {"params": [named[n] for n in UNCAPTURED], **uncaptured_group},
    ]
    opt = fxkfac.KFAC(
        kmod,
        loss_func=nn.CrossEntropyLoss(),
        params=groups,
        damping=1e-2,
        uncaptured_update=uncaptured_update,
        **options,
    )
    return model, kmod, opt


def backward(kmod, opt, x, y):
    out, cap = kmod(x)
    loss = nn.CrossEntropyLoss()(out, y)
    opt.zero_grad()
    loss.backward()
    return cap


def test_sgd_step_is_exact():
    lr = 0.05
    model, kmod, opt = setup("sgd", {"lr": lr})
    named = dict(model.named_parameters())
    for x, y in batches(3):
        cap = backward(kmod, opt, x, y)
        before = {n: p.detach().clone() for n, p in named.items()}
        grads = {n: p.grad.clone() for n, p in named.items()}
        opt.step(cap)
        for name in UNCAPTURED:
            assert grads[name].abs().max() > 0, name
            assert torch.equal(named[name], before[name] - lr * grads[name]), name
        # the captured layers took a K-FAC step, not this SGD step
        for name in ("fc1.weight", "fc2.weight"):
            assert not torch.equal(named[name], before[name])
            assert not torch.allclose(named[name], before[name] - 0.2 * grads[name], rtol=1e-3)


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.9, 0.0), (0.9, 1e-2), (0.0, 1e-1)])
def test_sgd_matches_torch_sgd(momentum, weight_decay):
    lr = 0.05
    group = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    model, kmod, opt = setup("sgd", group)
    named = dict(model.named_parameters())
    shadows = {n: named[n].detach().clone().requires_grad_() for n in UNCAPTURED}
    sgd = torch.optim.SGD(list(shadows.values()), **group)
    start = {n: s.detach().clone() for n, s in shadows.items()}
    for x, y in batches(4):
        cap = backward(kmod, opt, x, y)
        for n, s in shadows.items():
            s.grad = named[n].grad.clone()
        opt.step(cap)
        sgd.step()
        for n, s in shadows.items():
            torch.testing.assert_close(named[n].detach(), s.detach(), rtol=1e-13, atol=1e-15, msg=n)
    for n, s in shadows.items():
        assert not torch.allclose(s, start[n]), n


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_matches_torch_adam(weight_decay):
    group = {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": weight_decay}
    model, kmod, opt = setup("adam", group)
    named = dict(model.named_parameters())
    shadows = {n: named[n].detach().clone().requires_grad_() for n in UNCAPTURED}
    adam = torch.optim.Adam(list(shadows.values()), **group)
    start = {n: s.detach().clone() for n, s in shadows.items()}
    sgd_like = {n: s.detach().clone() for n, s in shadows.items()}
    for x, y in batches(5):
        cap = backward(kmod, opt, x, y)
        for n, s in shadows.items():
            s.grad = named[n].grad.clone()
            sgd_like[n] -= 0.01 * s.grad
        opt.step(cap)
        adam.step()
        for n, s in shadows.items():
            torch.testing.assert_close(named[n].detach(), s.detach(), rtol=1e-12, atol=1e-14, msg=n)
    for n, s in shadows.items():
        assert not torch.allclose(s, start[n]), n
        assert not torch.allclose(s, sgd_like[n], rtol=1e-3), n  # Adam, not SGD


def test_uncaptured_parameters_train():
    """End to end: with 'adam' the loss of a fixed batch falls and every parameter moves."""
    model, kmod, opt = setup("adam", {"lr": 0.05}, captured_lr=0.1)
    named = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in named.items()}
    (x, y), *_ = batches(1, seed=4)
    loss_func = nn.CrossEntropyLoss()
    losses = []
    for _ in range(10):
        out, cap = kmod(x)
        loss = loss_func(out, y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step(cap)
    assert losses[-1] < 0.5 * losses[0], losses
    for n, p in named.items():
        assert not torch.allclose(p, start[n], atol=1e-4), n
