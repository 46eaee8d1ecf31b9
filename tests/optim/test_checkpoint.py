"""``state_dict`` / ``load_state_dict``: a checkpoint mid-training continues identically.

Train ``N`` steps, save model and optimizer (``torch.save`` into a ``BytesIO``), train ``M``
more; a fresh model (other initial weights), compiled module and optimizer (other MC seed)
restored from the checkpoint and trained on the same ``M`` batches ends with bit-identical
parameters — MC sampling state, running factors, cached inverses, counters and momentum
included. The optimizer settings make every piece of state matter: ``factor_decay > 0``
(running factors), ``inverse_every=3`` (inverses computed before the checkpoint are reused
after it), momentum, MC sampling.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fxkfac

N_BEFORE, N_AFTER, BATCH = 4, 5, 16


class Net(nn.Module):
    def __init__(self, width: int = 6, norm: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(3, width)
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def batches(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(BATCH, 3, generator=generator), torch.randint(0, 3, (BATCH,), generator=generator))
        for _ in range(count)
    ]


def make(seed: int, options: dict, norm: bool = False, width: int = 6):
    torch.manual_seed(seed)
    model = Net(width, norm)
    kmod = fxkfac.compile(model, example_inputs=(torch.zeros(2, 3),))
    opt = fxkfac.KFAC(kmod, loss_func=nn.CrossEntropyLoss(), **options)
    return model, kmod, opt


def train(kmod, opt, data):
    loss_func = nn.CrossEntropyLoss()
    for x, y in data:
        out, cap = kmod(x)
        loss = loss_func(out, y)
        opt.zero_grad()
        loss.backward()
        stats = opt.step(cap, loss=loss.detach())
        assert stats["skipped"] is None


def checkpoint(model, opt) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    return buffer


BASE = {
    "lr": 0.1,
    "damping": 1e-2,
    "fisher_type": "mc",
    "factor_decay": 0.9,
    "inverse_every": 3,
}
SETTINGS = {
    "mc": {},
    "mc-momentum": {"momentum": 0.9, "weight_decay": 1e-3},
    "mc-eigh-adam": {"momentum": 0.5, "inverse": "eigh", "uncaptured_update": "adam"},
    "mc-adaptive": {"adaptive_damping": True, "inverse_every": 1},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_checkpoint_continues_identically(setting):
    options = {**BASE, **SETTINGS[setting]}
    norm = options.get("uncaptured_update") == "adam"
    first, second = batches(N_BEFORE, seed=1), batches(N_AFTER, seed=2)

    model, kmod, opt = make(0, {**options, "seed": 5}, norm)
    train(kmod, opt, first)
    saved = checkpoint(model, opt)
    train(kmod, opt, second)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}

    restored, kmod2, opt2 = make(99, {**options, "seed": 77}, norm)
    state = torch.load(saved)
    restored.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    assert opt2.preconditioner.steps == N_BEFORE
    train(kmod2, opt2, second)
    for name, p in restored.named_parameters():
        assert torch.equal(p, expected[name]), f"{name} differs after the restored continuation"


def test_restoring_without_the_optimizer_state_differs():
    """Control: the previous test can fail — a fresh optimizer (new factors, new MC stream)
    on the restored model does not reproduce the continuation."""
    options = {**BASE, "momentum": 0.9}
    first, second = batches(N_BEFORE, seed=1), batches(N_AFTER, seed=2)
    model, kmod, opt = make(0, {**options, "seed": 5}, False)
    train(kmod, opt, first)
    saved = checkpoint(model, opt)
    train(kmod, opt, second)

    restored, kmod2, opt2 = make(99, {**options, "seed": 5}, False)
    restored.load_state_dict(torch.load(saved)["model"])
    train(kmod2, opt2, second)
    assert not torch.equal(restored.fc1.weight, model.fc1.weight)


def test_generator_state_is_part_of_the_checkpoint():
    options = {**BASE, "seed": 5}
    _model, kmod, opt = make(0, options)
    train(kmod, opt, batches(2, seed=1))
    state = opt.state_dict()
    _, _, other = make(0, {**BASE, "seed": 6})
    other.load_state_dict(state)
    assert torch.equal(other.preconditioner.generator.get_state(), opt.preconditioner.generator.get_state())
    for name, factor in opt.preconditioner.factors.items():
        assert torch.equal(other.preconditioner.factors[name]["A"], factor["A"])
        assert torch.equal(other.preconditioner.factors[name]["B"], factor["B"])


def test_checkpoint_of_another_architecture_is_rejected():
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model, kmod, opt = make(0, BASE)
    train(kmod, opt, batches(2, seed=1))
    state = torch.load(checkpoint(model, opt))["optimizer"]
    other = Other()
    kother = fxkfac.compile(other, example_inputs=(torch.zeros(2, 3),))
    opt_other = fxkfac.KFAC(kother, loss_func=nn.CrossEntropyLoss(), **BASE)
    with pytest.raises(fxkfac.FxKfacError, match="different model"):
        opt_other.load_state_dict(state)


def test_checkpoint_of_a_wider_model_with_the_same_layer_names_is_rejected():
    """Same layer names, other widths: the factors (6×6 / 4×4 input factors) cannot belong
    to this model; loading must fail clearly instead of breaking a later step."""
    model, kmod, opt = make(0, BASE, width=6)
    train(kmod, opt, batches(2, seed=1))
    state = torch.load(checkpoint(model, opt))["optimizer"]
    _, _kmod_narrow, opt_narrow = make(0, BASE, width=4)
    with pytest.raises(fxkfac.FxKfacError):
        opt_narrow.load_state_dict(state)


def test_checkpoint_without_kfac_state_is_rejected():
    model, _kmod, opt = make(0, BASE)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(fxkfac.FxKfacError):
        opt.load_state_dict(sgd.state_dict())
