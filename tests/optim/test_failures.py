"""Failure handling: non-finite gradients, misuse of the loop, enormous factors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxkfac

from .helpers import assert_same, compiled_copy, snapshot


class Net(nn.Module):
    def __init__(self, d_in: int = 3, width: int = 6, d_out: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(d_in, width)
        self.norm = nn.LayerNorm(width)
        self.fc2 = nn.Linear(width, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def batches(count: int, seed: int = 0, d_in: int = 3, classes: int = 3, size: int = 16):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, d_in, generator=generator),
            torch.randint(0, classes, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def make(**options):
    model = Net()
    kmod = fxkfac.compile(model, example_inputs=(torch.zeros(2, 3),))
    kwargs = {"lr": 0.1, "damping": 1e-2, "momentum": 0.9, "factor_decay": 0.9, "inverse_every": 1, **options}
    opt = fxkfac.KFAC(kmod, loss_func=nn.CrossEntropyLoss(), **kwargs)
    return model, kmod, opt


def step(kmod, opt, x, y, corrupt=None):
    out, cap = kmod(x)
    loss = nn.CrossEntropyLoss()(out, y)
    opt.zero_grad()
    loss.backward()
    if corrupt is not None:
        corrupt()
    return opt.step(cap, loss=loss.detach())


# ---------------------------------------------------------------------------------------------
# non-finite gradients


def nan_at(param, value=float("nan")):
    def corrupt():
        param.grad.view(-1)[0] = value

    return corrupt


CORRUPTIONS = {
    "weight-nan": lambda m: nan_at(m.fc1.weight),
    "bias-inf": lambda m: nan_at(m.fc2.bias, float("inf")),
    "uncaptured-nan": lambda m: nan_at(m.norm.weight),
}


@pytest.mark.parametrize("uncaptured_update", ["sgd", "adam"])
@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_non_finite_gradient_skips_the_step(corruption, fisher_type, uncaptured_update):
    model, kmod, opt = make(fisher_type=fisher_type, uncaptured_update=uncaptured_update)
    data = batches(6)
    for x, y in data[:2]:
        assert step(kmod, opt, x, y)["skipped"] is None
    before = snapshot(model, opt)
    x, y = data[2]
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        stats = step(kmod, opt, x, y, corrupt=CORRUPTIONS[corruption](model))
    assert stats["skipped"]
    assert_same(before, snapshot(model, opt))
    # training goes on, finite, and really moves again
    for x, y in data[3:]:
        stats = step(kmod, opt, x, y)
        assert stats["skipped"] is None
    assert opt.preconditioner.steps == before["steps"] + 3
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p, before["params"][name]), name
    for factors in opt.preconditioner.factors.values():
        assert torch.isfinite(factors["A"]).all() and torch.isfinite(factors["B"]).all()


@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
def test_non_finite_input_skips_the_step(fisher_type):
    """A NaN datum makes the prediction, the loss and every gradient NaN: ``loss.backward()``
    must still complete (the K-FAC backward runs inside it) and the step be skipped."""
    model, kmod, opt = make(fisher_type=fisher_type)
    data = batches(4)
    step(kmod, opt, *data[0])
    before = snapshot(model, opt)
    x, y = data[1]
    x = x.clone()
    x[3, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        stats = step(kmod, opt, x, y)
    assert stats["skipped"]
    assert_same(before, snapshot(model, opt))
    for x, y in data[2:]:
        assert step(kmod, opt, x, y)["skipped"] is None
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# misuse of the loop


@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
def test_step_without_backward_raises(fisher_type):
    model, kmod, opt = make(fisher_type=fisher_type)
    (x, y), (x2, _) = batches(2)
    before = snapshot(model, opt)
    _, cap = kmod(x)
    opt.zero_grad()
    with pytest.raises(fxkfac.CaptureError, match="backward"):
        opt.step(cap)
    assert_same(before, snapshot(model, opt))
    # also with stale gradients of a previous iteration still in .grad
    step(kmod, opt, x, y)
    _, cap = kmod(x2)
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(fxkfac.CaptureError, match="backward"):
        opt.step(cap)


@pytest.mark.parametrize("same_model", [True, False], ids=["same-model-compiled-twice", "other-model"])
def test_capture_from_another_compiled_module_raises(same_model):
    model, kmod, opt = make(fisher_type="mc")
    (x, y), *_ = batches(1)
    if same_model:
        kother = fxkfac.compile(model, example_inputs=(x,))
    else:
        _, kother = compiled_copy(model, x)
    step(kmod, opt, x, y)
    before = snapshot(model, opt)
    out, cap = kmod(x)
    loss = nn.CrossEntropyLoss()(out, y)
    opt.zero_grad()
    loss.backward()
    _, other_cap = kother(x)
    with pytest.raises(fxkfac.CaptureError, match="another compiled module"):
        opt.step(other_cap)
    assert_same(before, snapshot(model, opt))
    with pytest.raises(fxkfac.CaptureError):
        opt.step(object())
    assert opt.step(cap)["skipped"] is None  # the right capture still works


# ---------------------------------------------------------------------------------------------
# enormous factors: diagonal with a warning


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("inverse", ["cholesky", "eigh"])
def test_large_factors_are_diagonal_and_train(inverse):
    model = Wide()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=generator)
    y = (x @ torch.randn(8, 3, generator=generator)).argmax(1)  # a learnable labelling
    loss_func = nn.CrossEntropyLoss()
    _, kref = compiled_copy(model, x)
    dense = kref(x)[1].factors(loss_func, y, fisher_type="type-2")
    kmod = fxkfac.compile(model, example_inputs=(x,))
    with pytest.warns(UserWarning, match="max_factor_dim") as record:
        opt = fxkfac.KFAC(
            kmod,
            loss_func=loss_func,
            lr=0.2,
            damping=1e-2,
            max_factor_dim=10,
            fisher_type="type-2",
            factor_decay=0.0,
            inverse=inverse,
            inverse_every=1,
        )
    messages = " ".join(str(w.message) for w in record)
    assert "fc1" in messages and "fc2" in messages
    losses = []
    for i in range(15):
        out, cap = kmod(x)
        loss = loss_func(out, y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        stats = opt.step(cap)
        assert stats["skipped"] is None
        if i == 0:
            factors = opt.preconditioner.factors
            # fc1: A is 9×9 (kept dense), B is 16 (diagonal); fc2: A is 17 (diagonal), B 3×3
            assert factors["fc1"]["A"].shape == (1, 9, 9) and factors["fc1"]["B"].shape == (1, 16)
            assert factors["fc2"]["A"].shape == (1, 17) and factors["fc2"]["B"].shape == (1, 3, 3)
            torch.testing.assert_close(factors["fc1"]["A"][0], dense["fc1"][0])
            torch.testing.assert_close(factors["fc1"]["B"][0], dense["fc1"][1].diagonal())
            torch.testing.assert_close(factors["fc2"]["A"][0], dense["fc2"][0].diagonal())
            torch.testing.assert_close(factors["fc2"]["B"][0], dense["fc2"][1])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.3 * losses[0], losses
