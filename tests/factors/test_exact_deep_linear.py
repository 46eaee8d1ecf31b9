"""Tutorial Test 2: K-FAC is exact for a deep linear network with square loss (§5.2.2).

With no nonlinearity the output gradients ``g`` do not depend on the datum, so for any data
set KFAC-type-II == GGN and KFAC-MC -> GGN, but KFAC-empirical != empirical Fisher (the
residuals ``f_n − y_n`` depend on ``n``). With an independent sequence dimension ``S`` the
expand approximation stays exact (B normalized by ``N·S``). A layer whose outputs are averaged
over ``S`` before the rest of the linear network is exact under the reduce approximation.
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
    relative_error,
)

BATCH, SEQ = 8, 5
D_IN, D_HIDDEN, D_OUT = 4, 3, 2


def deep_linear(bias: bool, depth: int = 3, seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    dims = [D_IN] + (depth - 1) * [D_HIDDEN] + [D_OUT]
    return nn.Sequential(*[nn.Linear(dims[i], dims[i + 1], bias=bias) for i in range(depth)])


def data(seq: int | None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH,) if seq is None else (BATCH, seq)
    x = torch.rand(*shape, D_IN, generator=generator)
    y = torch.rand(*shape, D_OUT, generator=generator)
    return x, y


def params_of(model: nn.Module, name: str) -> tuple[str, str | None]:
    has_bias = model.get_submodule(name).bias is not None
    return f"{name}.weight", (f"{name}.bias" if has_bias else None)


def layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


SEQS = pytest.mark.parametrize("seq", [None, SEQ], ids=["no_seq", "seq"])
BIAS = pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
REDUCTION = pytest.mark.parametrize("reduction", ["mean", "sum"])


@REDUCTION
@BIAS
@SEQS
@pytest.mark.parametrize("depth", [1, 3])
def test_type2_equals_ggn(depth, seq, bias, reduction):
    model = deep_linear(bias, depth)
    x, y = data(seq)
    loss_func = nn.MSELoss(reduction=reduction)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(loss_func, y, fisher_type="type-2")
    fn, params = module_fn(model)
    assert sorted(factors) == sorted(layer_names(model))
    for name in layer_names(model):
        A, B = factors[name]
        blocks = exact_blocks(fn, params, (x,), y, loss_func, *params_of(model, name))
        for order in ("rvec", "cvec"):
            assert_matrix_close(kfac_matrix(A, B, order), blocks.ggn(order), name=f"{name} {order}")


@REDUCTION
@SEQS
def test_mc_converges_to_ggn(seq, reduction):
    model = deep_linear(True)
    x, y = data(seq)
    loss_func = nn.MSELoss(reduction=reduction)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    fn, params = module_fn(model)
    ggns = {
        name: ggn_block(fn, params, (x,), y, loss_func, *params_of(model, name))
        for name in layer_names(model)
    }
    errors = {}
    for samples in (10, 10_000):
        factors = cap.factors(
            loss_func,
            y,
            fisher_type="mc",
            mc_samples=samples,
            generator=torch.Generator().manual_seed(0),
        )
        errors[samples] = {n: relative_error(kfac_matrix(*factors[n]), g) for n, g in ggns.items()}
    for name in ggns:
        assert errors[10_000][name] < 0.03, (name, errors)
        assert errors[10_000][name] < errors[10][name] / 5, (name, errors)


@REDUCTION
@BIAS
@SEQS
def test_empirical_differs_from_ef(seq, bias, reduction):
    """KFAC-empirical != EF for N > 1 (the tutorial's negative statement), checked to be large."""
    model = deep_linear(bias)
    x, y = data(seq)
    loss_func = nn.MSELoss(reduction=reduction)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(loss_func, y, fisher_type="empirical")
    fn, params = module_fn(model)
    for name in layer_names(model):
        ef = ef_block(fn, params, (x,), y, loss_func, *params_of(model, name))
        error = relative_error(kfac_matrix(*factors[name]), ef)
        assert error > 0.1, f"{name}: KFAC-empirical unexpectedly close to the EF ({error:.3g})"


@REDUCTION
@SEQS
def test_empirical_single_datum_equals_ef(seq, reduction):
    """Sanity check of the negative test: with N = 1 (and no sequence) the EF is exact again."""
    model = deep_linear(True)
    x, y = data(seq)
    x, y = x[:1], y[:1]
    if seq is not None:  # one position, too: then nothing is shared
        x, y = x[:, :1], y[:, :1]
    loss_func = nn.MSELoss(reduction=reduction)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(loss_func, y, fisher_type="empirical")
    fn, params = module_fn(model)
    for name in layer_names(model):
        ef = ef_block(fn, params, (x,), y, loss_func, *params_of(model, name))
        assert_matrix_close(kfac_matrix(*factors[name]), ef, name=name)


class MeanOverSequence(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def reduce_model(bias: bool, seed: int = 2) -> nn.Sequential:
    """``[N, S, D_in]`` -> Linear -> mean over S -> Linear -> Linear -> ``[N, D_out]``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(D_IN, D_HIDDEN, bias=bias),
        MeanOverSequence(),
        nn.Linear(D_HIDDEN, D_HIDDEN, bias=bias),
        nn.Linear(D_HIDDEN, D_OUT, bias=bias),
    )


@REDUCTION
@BIAS
def test_reduce_type2_equals_ggn(bias, reduction):
    model = reduce_model(bias)
    x, _ = data(SEQ)
    y = torch.rand(BATCH, D_OUT, generator=torch.Generator().manual_seed(5))
    loss_func = nn.MSELoss(reduction=reduction)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(loss_func, y, fisher_type="type-2", kfac_approx="reduce")
    fn, params = module_fn(model)
    for name in ("0", "2", "3"):
        A, B = factors[name]
        blocks = exact_blocks(fn, params, (x,), y, loss_func, *params_of(model, name))
        for order in ("rvec", "cvec"):
            assert_matrix_close(kfac_matrix(A, B, order), blocks.ggn(order), name=f"{name} {order}")

    # the case discriminates: expand is not exact for the layer before the mean
    expand = cap.factors(loss_func, y, fisher_type="type-2", kfac_approx="expand")
    ggn = ggn_block(fn, params, (x,), y, loss_func, *params_of(model, "0"))
    assert relative_error(kfac_matrix(*expand["0"]), ggn) > 0.05
    # ... while the layers after it see no shared axis: both approximations agree
    for name in ("2", "3"):
        for mine, theirs in zip(expand[name], factors[name], strict=True):
            assert_matrix_close(mine, theirs, name=name)


@REDUCTION
def test_reduce_mc_converges_to_ggn(reduction):
    model = reduce_model(True)
    x, _ = data(SEQ)
    y = torch.rand(BATCH, D_OUT, generator=torch.Generator().manual_seed(5))
    loss_func = nn.MSELoss(reduction=reduction)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(
        loss_func,
        y,
        fisher_type="mc",
        mc_samples=10_000,
        kfac_approx="reduce",
        generator=torch.Generator().manual_seed(0),
    )
    fn, params = module_fn(model)
    ggn = ggn_block(fn, params, (x,), y, loss_func, *params_of(model, "0"))
    assert relative_error(kfac_matrix(*factors["0"]), ggn) < 0.03


def test_sequence_expand_equals_flattened_batch():
    """Expand treats sequence positions like data: (N, S, D) gives the factors of (N·S, D)
    up to the reduction factor (mean divides by N·S·D_out in both) and B's normalization."""
    model = deep_linear(True)
    x, y = data(SEQ)
    loss_func = nn.MSELoss(reduction="sum")
    kmod = fxkfac.compile(model, example_inputs=(x,))
    _, cap = kmod(x)
    seq_factors = cap.factors(loss_func, y)
    _, cap_flat = kmod(x.flatten(0, 1))
    flat_factors = cap_flat.factors(loss_func, y.flatten(0, 1))
    for name in seq_factors:
        for mine, theirs in zip(seq_factors[name], flat_factors[name], strict=True):
            assert_matrix_close(mine, theirs, name=name)
