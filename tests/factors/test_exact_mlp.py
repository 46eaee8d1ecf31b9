"""Tutorial Test 1: K-FAC is exact for an MLP on a single datum (Dangel et al., 2025, §5.2.1).

For one datum ``{(x, y)}``, for every layer and both flattenings:
KFAC-type-II == GGN, KFAC-MC -> GGN as M -> ∞, KFAC-empirical == empirical Fisher.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxkfac

from .references import (
    assert_matrix_close,
    ef_block,
    exact_blocks,
    ggn_block,
    kfac_matrix,
    module_fn,
    reduced_loss,
    relative_error,
)

D_IN, D_HIDDEN, D_OUT = 5, 4, 3
ACTIVATIONS = [nn.Tanh, nn.Sigmoid, nn.ReLU]
LOSSES = [nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss]
REDUCTIONS = ["mean", "sum"]


def make_mlp(activation: type[nn.Module], bias: bool, depth: int = 3, seed: int = 6):
    """Seed 6: with the data of `make_data`, no ReLU layer is entirely dead."""
    torch.manual_seed(seed)
    dims = [D_IN] + (depth - 1) * [D_HIDDEN] + [D_OUT]
    layers = []
    for i in range(depth):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=bias), activation()]
    return nn.Sequential(*layers[:-1])  # no activation on the logits


def make_data(loss_cls: type[nn.Module], batch: int = 1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, D_IN, generator=generator)
    if loss_cls is nn.CrossEntropyLoss:
        y = torch.randint(0, D_OUT, (batch,), generator=generator)
    else:  # MSE regression targets / BCE probabilities
        y = torch.rand(batch, D_OUT, generator=generator)
    return x, y


def linear_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def weight_and_bias(model: nn.Module, name: str) -> tuple[str, str | None]:
    return f"{name}.weight", (f"{name}.bias" if model.get_submodule(name).bias is not None else None)


def factors_of(model, x, y, loss_func, **kwargs):
    kmod = fxkfac.compile(model, example_inputs=(x,))
    _, cap = kmod(x)
    return cap.factors(loss_func, y, **kwargs)


@pytest.mark.parametrize("loss_cls", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_criterion_reproduces_loss(loss_cls, reduction):
    """The reference split ``loss = R Σ_n c(f_n, y_n)`` matches the PyTorch loss."""
    x, y = make_data(loss_cls, batch=4)
    f = make_mlp(nn.Tanh, True)(x)
    loss_func = loss_cls(reduction=reduction)
    torch.testing.assert_close(reduced_loss(loss_func, f, y), loss_func(f, y))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda c: c.__name__)
def test_type2_equals_ggn(activation, loss_cls, reduction, bias):
    model = make_mlp(activation, bias)
    x, y = make_data(loss_cls)
    loss_func = loss_cls(reduction=reduction)
    factors = factors_of(model, x, y, loss_func, fisher_type="type-2")
    fn, params = module_fn(model)
    names = linear_layers(model)
    assert sorted(factors) == sorted(names)
    for name in names:
        weight, b = weight_and_bias(model, name)
        A, B = factors[name]
        d_in = model.get_submodule(name).in_features + bias
        d_out = model.get_submodule(name).out_features
        assert A.shape == (d_in, d_in) and B.shape == (d_out, d_out)
        assert A.dtype == B.dtype == torch.float64
        blocks = exact_blocks(fn, params, (x,), y, loss_func, weight, b)
        for order in ("rvec", "cvec"):
            ggn = blocks.ggn(order)
            assert_matrix_close(kfac_matrix(A, B, order), ggn, name=f"{name} {order}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda c: c.__name__)
def test_empirical_equals_ef(activation, loss_cls, reduction, bias):
    model = make_mlp(activation, bias)
    x, y = make_data(loss_cls)
    loss_func = loss_cls(reduction=reduction)
    factors = factors_of(model, x, y, loss_func, fisher_type="empirical")
    fn, params = module_fn(model)
    for name in linear_layers(model):
        weight, b = weight_and_bias(model, name)
        A, B = factors[name]
        blocks = exact_blocks(fn, params, (x,), y, loss_func, weight, b)
        for order in ("rvec", "cvec"):
            ef = blocks.ef(order)
            assert_matrix_close(kfac_matrix(A, B, order), ef, name=f"{name} {order}")


@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda c: c.__name__)
def test_mc_converges_to_ggn(activation, loss_cls):
    """KFAC-MC with M = 20 000 sampled labels lies within a few percent of the GGN.

    (Only ``reduction='mean'``: R enters MC like type-2, which covers both reductions.)
    """
    reduction = "mean"
    model = make_mlp(activation, True)
    x, y = make_data(loss_cls)
    loss_func = loss_cls(reduction=reduction)
    generator = torch.Generator().manual_seed(0)
    factors = factors_of(model, x, y, loss_func, fisher_type="mc", mc_samples=20_000, generator=generator)
    fn, params = module_fn(model)
    for name in linear_layers(model):
        weight, b = weight_and_bias(model, name)
        ggn = ggn_block(fn, params, (x,), y, loss_func, weight, b)
        error = relative_error(kfac_matrix(*factors[name]), ggn)
        assert error < 0.05, f"{name}: relative error {error:.3g} of KFAC-MC (M=20000)"


@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_mc_error_decreases_with_samples(loss_cls):
    """The MC error shrinks like 1/√M: averaged over seeds, 100× the samples, ≥ 4× smaller."""
    model = make_mlp(nn.Tanh, True)
    x, y = make_data(loss_cls)
    loss_func = loss_cls(reduction="mean")
    fn, params = module_fn(model)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    _, cap = kmod(x)
    ggns = {
        name: ggn_block(fn, params, (x,), y, loss_func, *weight_and_bias(model, name))
        for name in linear_layers(model)
    }
    errors = {}
    for samples in (50, 5_000):
        total = 0.0
        for seed in range(5):
            generator = torch.Generator().manual_seed(seed)
            factors = cap.factors(loss_func, y, fisher_type="mc", mc_samples=samples, generator=generator)
            total += sum(relative_error(kfac_matrix(*factors[n]), g) for n, g in ggns.items())
        errors[samples] = total / 5
    assert errors[5_000] < errors[50] / 4, errors


def test_mc_is_reproducible_with_generator():
    model = make_mlp(nn.Tanh, True)
    x, y = make_data(nn.CrossEntropyLoss)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    _, cap = kmod(x)
    loss_func = nn.CrossEntropyLoss()
    runs = [
        cap.factors(loss_func, y, fisher_type="mc", mc_samples=7, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=0)


@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_n_identical_data_points(loss_cls):
    """N identical data points behave like one (§5.2.1): type-2 and empirical stay exact."""
    model = make_mlp(nn.Sigmoid, True)
    x1, y1 = make_data(loss_cls)
    x, y = x1.repeat(3, 1), y1.repeat(3, *([1] * (y1.ndim - 1)))
    loss_func = loss_cls(reduction="mean")
    fn, params = module_fn(model)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    _, cap = kmod(x)
    for fisher_type, reference in (("type-2", ggn_block), ("empirical", ef_block)):
        factors = cap.factors(loss_func, y, fisher_type=fisher_type)
        for name in linear_layers(model):
            expected = reference(fn, params, (x,), y, loss_func, *weight_and_bias(model, name))
            assert_matrix_close(kfac_matrix(*factors[name]), expected, name=f"{fisher_type} {name}")


@pytest.mark.parametrize("frozen", ["0", "2"])
def test_frozen_layer_factors_are_exact_or_absent(frozen):
    """A layer with ``requires_grad=False`` parameters: if ``cap.factors`` returns its factors
    they must still be the curvature of its ``W̃`` (Test 1) — not a silent ``B = 0``.

    Freezing the first layer leaves its output without an autograd edge (nothing upstream
    requires grad); freezing a later layer does not.
    """
    model = make_mlp(nn.Tanh, True)
    model.get_submodule(frozen).requires_grad_(False)
    x, y = make_data(nn.CrossEntropyLoss)
    loss_func = nn.CrossEntropyLoss()
    factors = factors_of(model, x, y, loss_func, fisher_type="type-2")
    fn, params = module_fn(model)
    for name in linear_layers(model):
        if name not in factors:
            assert name == frozen
            continue
        ggn = ggn_block(fn, params, (x,), y, loss_func, *weight_and_bias(model, name))
        assert_matrix_close(kfac_matrix(*factors[name]), ggn, name=name)
