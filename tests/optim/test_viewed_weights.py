"""A weight stored in another shape and viewed before its op (``F.linear(x, W.view(6, 4))``).

The factors refer to the viewed ``[D_out, D_in]`` weight; the optimizer's gradient matrix is
read through the view and its step written back in the stored shape. A model whose first
layer stores its weight flat must take exactly the step of its ``nn.Linear`` twin.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import fxkfac
from fxkfac.precond.matrices import from_matrix, to_matrix

from .helpers import train_step


class FlatLinear(nn.Module):
    """``nn.Linear`` with its weight stored as a vector ``[D_out · D_in]``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.shape = tuple(linear.weight.shape)
        self.weight = nn.Parameter(linear.weight.detach().reshape(-1).clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.weight.view(self.shape), self.bias)


def twins(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    flat = copy.deepcopy(model)
    flat[0] = FlatLinear(model[0])
    return model, flat


def test_layout_round_trip_of_a_viewed_weight():
    _, flat = twins()
    x = torch.randn(5, 4, dtype=torch.float64)
    layer = fxkfac.compile(flat, example_inputs=(x,)).layer("0")
    assert (layer.weight_shape, layer.stored_shape) == ((6, 4), (24,))
    matrix = to_matrix(layer, flat[0].weight, flat[0].bias)
    assert matrix.shape == (1, 6, 5)
    torch.testing.assert_close(matrix[0, :, :4], flat[0].weight.view(6, 4), rtol=0, atol=0)
    weight, bias = from_matrix(layer, matrix)
    assert weight.shape == (24,) and torch.equal(weight, flat[0].weight) and torch.equal(bias, flat[0].bias)


def test_kfac_steps_of_a_viewed_weight_equal_its_linear_twin():
    model, flat = twins()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=generator)
    loss_func = nn.CrossEntropyLoss()
    options = {"lr": 0.3, "damping": 1e-3, "inverse_every": 1, "regulator": None}
    runs = []
    for net in (model, flat):
        kmod = fxkfac.compile(net, example_inputs=(x,))
        assert kmod.uncaptured == {}
        runs.append((kmod, fxkfac.KFAC(kmod, loss_func=loss_func, **options)))
    for _ in range(3):
        for kmod, opt in runs:
            train_step(kmod, opt, loss_func, x, y)
    torch.testing.assert_close(flat[0].weight.view(6, 4), model[0].weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat[0].bias, model[0].bias, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat[2].weight, model[2].weight, rtol=1e-10, atol=1e-12)
    assert not torch.equal(model[0].bias, twins()[0][0].bias)  # the step moved the layer
