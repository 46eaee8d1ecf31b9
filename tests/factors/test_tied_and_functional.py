"""Tied weights, functional models and transposed (``x @ W``) weights.

* Tied weights: every use of a weight adds weight-sharing positions. When the uses feed
  separate loss terms of a linear network (outputs stacked along a position axis, MSE),
  KFAC-expand type-2 equals the GGN of the shared weight, which sums both uses'
  contributions; when the uses are averaged before a linear head, KFAC-reduce is exact.
* A functional model ``fn(params, x)`` gives the factors of the equivalent ``nn.Module``.
* ``x @ W`` with ``W`` stored ``[D_in, D_out]``: ``kron(A, B)`` (cvec of the canonical
  ``[D_out, D_in]`` matrix) is the GGN of ``rvec`` of the stored parameter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxkfac

from .references import (
    assert_matrix_close,
    exact_blocks,
    ggn_block,
    kfac_matrix,
    module_fn,
    relative_error,
)

BATCH, D_IN, D_MID, D_OUT = 4, 3, 2, 3
REDUCTION = pytest.mark.parametrize("reduction", ["mean", "sum"])


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Functional copies of a module's parameters (leaves that require grad, like the
    parameters a functional training loop differentiates)."""
    return {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}


def requiring_grad(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.requires_grad_() for name, p in params.items()}


# ---------------------------------------------------------------------------------------------
# tied weights


class TiedStack(nn.Module):
    """``lin`` on two inputs, outputs stacked along a new position axis, optional linear head."""

    def __init__(self, head: bool, bias: bool):
        super().__init__()
        self.lin = nn.Linear(D_IN, D_MID, bias=bias)
        self.head = nn.Linear(D_MID, D_OUT, bias=bias) if head else nn.Identity()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.head(torch.stack([self.lin(x1), self.lin(x2)], dim=1))


class TiedUnequalPositions(nn.Module):
    """``lin`` on ``[N, D]`` and on ``[N, 3, D]``: 1 + 3 positions per datum."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D_IN, D_MID)
        self.head = nn.Linear(D_MID, D_OUT)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.lin(x1).unsqueeze(1), self.lin(x2)], dim=1))


class TiedAverage(nn.Module):
    """``lin`` on two inputs, outputs averaged, then a linear head."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D_IN, D_MID)
        self.head = nn.Linear(D_MID, D_OUT)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.head((self.lin(x1) + self.lin(x2)) / 2)


def check_layers_against_ggn(model, inputs, y, loss_func, factors, layers):
    fn, params = module_fn(model)
    for name in layers:
        bias = f"{name}.bias" if model.get_submodule(name).bias is not None else None
        blocks = exact_blocks(fn, params, inputs, y, loss_func, f"{name}.weight", bias)
        for order in ("rvec", "cvec"):
            assert_matrix_close(kfac_matrix(*factors[name], order), blocks.ggn(order), name=f"{name} {order}")


@REDUCTION
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("head", [False, True], ids=["no_head", "head"])
def test_tied_stack_expand_type2_equals_ggn(head, bias, reduction):
    torch.manual_seed(1)
    model = TiedStack(head, bias)
    x1, x2 = rand(BATCH, D_IN, seed=1), rand(BATCH, D_IN, seed=2)
    y = rand(*model(x1, x2).shape, seed=3)
    loss_func = nn.MSELoss(reduction=reduction)
    kmod = fxkfac.compile(model, example_inputs=(x1, x2))
    assert kmod.layer("lin").tied and len(kmod.layer("lin").nodes) == 2
    _, cap = kmod(x1, x2)
    factors = cap.factors(loss_func, y, fisher_type="type-2")
    layers = ["lin", "head"] if head else ["lin"]
    assert sorted(factors) == sorted(layers)
    check_layers_against_ggn(model, (x1, x2), y, loss_func, factors, layers)


def test_tied_ggn_is_sum_of_uses():
    """Sanity check of the reference: the shared weight's GGN is the sum of both uses' GGNs
    (each computed with the other use's weight held fixed as a separate parameter)."""
    torch.manual_seed(1)
    model = TiedStack(True, True)
    x1, x2 = rand(BATCH, D_IN, seed=1), rand(BATCH, D_IN, seed=2)
    y = rand(*model(x1, x2).shape, seed=3)
    loss_func = nn.MSELoss()
    fn, params = module_fn(model)
    shared = ggn_block(fn, params, (x1, x2), y, loss_func, "lin.weight", "lin.bias")

    def untied(p, x1, x2):
        first = F.linear(x1, p["w1"], p["b1"])
        second = F.linear(x2, p["w2"], p["b2"])
        return F.linear(torch.stack([first, second], dim=1), p["hw"], p["hb"])

    w, b = params["lin.weight"], params["lin.bias"]
    p = {"w1": w, "b1": b, "w2": w, "b2": b, "hw": params["head.weight"], "hb": params["head.bias"]}
    first = ggn_block(untied, p, (x1, x2), y, loss_func, "w1", "b1")
    second = ggn_block(untied, p, (x1, x2), y, loss_func, "w2", "b2")
    assert_matrix_close(shared, first + second)


@REDUCTION
def test_tied_unequal_positions_expand_type2_equals_ggn(reduction):
    """B of a tied weight is normalized by the positions of *all* uses (N·(1 + 3))."""
    torch.manual_seed(1)
    model = TiedUnequalPositions()
    x1, x2 = rand(BATCH, D_IN, seed=1), rand(BATCH, 3, D_IN, seed=2)
    y = rand(*model(x1, x2).shape, seed=3)
    loss_func = nn.MSELoss(reduction=reduction)
    _, cap = fxkfac.compile(model, example_inputs=(x1, x2))(x1, x2)
    factors = cap.factors(loss_func, y, fisher_type="type-2")
    check_layers_against_ggn(model, (x1, x2), y, loss_func, factors, ["lin", "head"])


@REDUCTION
def test_tied_average_reduce_type2_equals_ggn(reduction):
    torch.manual_seed(1)
    model = TiedAverage()
    x1, x2 = rand(BATCH, D_IN, seed=1), rand(BATCH, D_IN, seed=2)
    y = rand(BATCH, D_OUT, seed=3)
    loss_func = nn.MSELoss(reduction=reduction)
    _, cap = fxkfac.compile(model, example_inputs=(x1, x2))(x1, x2)
    factors = cap.factors(loss_func, y, fisher_type="type-2", kfac_approx="reduce")
    check_layers_against_ggn(model, (x1, x2), y, loss_func, factors, ["lin", "head"])
    # expand treats the two uses as separate loss terms: not exact here
    expand = cap.factors(loss_func, y, fisher_type="type-2", kfac_approx="expand")
    fn, params = module_fn(model)
    ggn = ggn_block(fn, params, (x1, x2), y, loss_func, "lin.weight", "lin.bias")
    assert relative_error(kfac_matrix(*expand["lin"]), ggn) > 0.05


@REDUCTION
def test_tied_functional_equals_module(reduction):
    """The same weight passed twice to ``F.linear`` in a functional model: one tied layer."""
    torch.manual_seed(1)
    model = TiedStack(True, True)
    x1, x2 = rand(BATCH, D_IN, seed=1), rand(BATCH, D_IN, seed=2)
    y = rand(*model(x1, x2).shape, seed=3)
    params = trainable(model)

    def fn(p, x1, x2):
        out1 = F.linear(x1, p["lin.weight"], p["lin.bias"])
        out2 = F.linear(x2, p["lin.weight"], p["lin.bias"])
        return F.linear(torch.stack([out1, out2], dim=1), p["head.weight"], p["head.bias"])

    loss_func = nn.MSELoss(reduction=reduction)
    kmod = fxkfac.compile(fn, params=params, example_inputs=(x1, x2))
    assert kmod.layer("lin").tied
    _, cap = kmod(x1, x2)
    mine = cap.factors(loss_func, y)
    _, cap_module = fxkfac.compile(model, example_inputs=(x1, x2))(x1, x2)
    theirs = cap_module.factors(loss_func, y)
    assert sorted(mine) == sorted(theirs) == ["head", "lin"]
    for name in mine:
        for a, b in zip(mine[name], theirs[name], strict=True):
            assert_matrix_close(a, b, name=name)


# ---------------------------------------------------------------------------------------------
# functional models


def mlp(bias: bool) -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(D_IN, 4, bias=bias), nn.Tanh(), nn.Linear(4, D_OUT, bias=bias)).double()


def _linear(form: str, x, w, b):
    if form == "F.linear":
        return F.linear(x, w, b)
    if form == "matmul_t":
        out = x @ w.T
        return out if b is None else out + b
    if form == "addmm":
        return torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t())
    raise ValueError(form)


FORMS = ["F.linear", "matmul_t", "addmm"]
FISHER = [
    dict(fisher_type="type-2"),
    dict(fisher_type="empirical"),
    dict(fisher_type="mc", mc_samples=3),
    dict(fisher_type="forward-only"),
    dict(fisher_type="type-2", kfac_approx="reduce"),
]


@pytest.mark.parametrize("kwargs", FISHER, ids=lambda k: "-".join(map(str, k.values())))
@pytest.mark.parametrize(
    ("form", "bias"),
    [(form, bias) for form in FORMS for bias in (True, False) if form != "addmm" or bias],
    ids=lambda v: v if isinstance(v, str) else ("bias" if v else "nobias"),
)
def test_functional_equals_module(form, bias, kwargs):
    model = mlp(bias)
    params = trainable(model)

    def fn(p, x):
        h = torch.tanh(_linear(form, x, p["0.weight"], p.get("0.bias")))
        return _linear(form, h, p["2.weight"], p.get("2.bias"))

    x = rand(BATCH, D_IN, seed=1)
    y = torch.randint(0, D_OUT, (BATCH,), generator=torch.Generator().manual_seed(2))
    loss_func = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(fn, params=params, example_inputs=(x,))
    assert [layer.name for layer in kmod.layers] == ["0", "2"]
    assert all(layer.call_form == "function" for layer in kmod.layers)
    _, cap = kmod(x)
    generator = torch.Generator().manual_seed(0)
    mine = cap.factors(loss_func, y, generator=generator, **kwargs)
    _, cap_module = fxkfac.compile(model, example_inputs=(x,))(x)
    generator = torch.Generator().manual_seed(0)
    theirs = cap_module.factors(loss_func, y, generator=generator, **kwargs)
    assert sorted(mine) == sorted(theirs) == ["0", "2"]
    for name in mine:
        for a, b in zip(mine[name], theirs[name], strict=True):
            assert_matrix_close(a, b, name=name)


@pytest.mark.parametrize("form", FORMS)
def test_functional_type2_equals_ggn_single_datum(form):
    """Test 1 directly on a functional model (references differentiate ``fn`` itself)."""
    torch.manual_seed(3)
    params = requiring_grad(
        {
            "fc1.weight": torch.randn(4, D_IN),
            "fc1.bias": torch.randn(4),
            "fc2.weight": torch.randn(D_OUT, 4),
            "fc2.bias": torch.randn(D_OUT),
        }
    )

    def fn(p, x):
        h = torch.sigmoid(_linear(form, x, p["fc1.weight"], p["fc1.bias"]))
        return _linear(form, h, p["fc2.weight"], p["fc2.bias"])

    x = rand(1, D_IN, seed=1)
    y = torch.tensor([1])
    loss_func = nn.CrossEntropyLoss()
    _, cap = fxkfac.compile(fn, params=params, example_inputs=(x,))(x)
    factors = cap.factors(loss_func, y)
    assert sorted(factors) == ["fc1", "fc2"]
    for name in factors:
        ggn = ggn_block(fn, params, (x,), y, loss_func, f"{name}.weight", f"{name}.bias")
        assert_matrix_close(kfac_matrix(*factors[name]), ggn, name=name)


# ---------------------------------------------------------------------------------------------
# x @ W: weights stored [D_in, D_out]


def in_out_fn(p, x):
    """Deep linear, both layers ``x @ W`` (the first with a bias, the second without)."""
    return (x @ p["w1"] + p["b1"]) @ p["w2"]


def in_out_params():
    torch.manual_seed(4)
    return requiring_grad({"w1": torch.randn(D_IN, 4), "b1": torch.randn(4), "w2": torch.randn(4, D_OUT)})


@REDUCTION
def test_in_out_weight_kron_a_b_is_rvec_of_stored(reduction):
    params = in_out_params()
    x, y = rand(BATCH, D_IN, seed=1), rand(BATCH, D_OUT, seed=2)
    loss_func = nn.MSELoss(reduction=reduction)
    kmod = fxkfac.compile(in_out_fn, params=params, example_inputs=(x,))
    assert [(layer.name, layer.weight_layout) for layer in kmod.layers] == [
        ("w1", "in_out"),
        ("w2", "in_out"),
    ]
    _, cap = kmod(x)
    factors = cap.factors(loss_func, y, fisher_type="type-2")
    A, B = factors["w2"]
    assert A.shape == (4, 4) and B.shape == (D_OUT, D_OUT)  # canonical [D_out, D_in] sizes
    # the stored [D_in, D_out] parameter taken as it is, flattened row-major
    stored = ggn_block(in_out_fn, params, (x,), y, loss_func, "w2", order="rvec")
    assert_matrix_close(torch.kron(A, B), stored, name="w2 kron(A, B) vs rvec(stored W)")
    # and with a bias: W̃ = [Wᵀ | b] of the canonical orientation, both flattenings
    blocks = exact_blocks(in_out_fn, params, (x,), y, loss_func, "w1", "b1", layout="in_out")
    for order in ("rvec", "cvec"):
        assert_matrix_close(kfac_matrix(*factors["w1"], order), blocks.ggn(order), name=order)


class InOutModule(nn.Module):
    def __init__(self):
        super().__init__()
        p = in_out_params()
        self.w1 = nn.Parameter(p["w1"].detach())
        self.b1 = nn.Parameter(p["b1"].detach())
        self.w2 = nn.Parameter(p["w2"].detach())

    def forward(self, x):
        return in_out_fn({"w1": self.w1, "b1": self.b1, "w2": self.w2}, x)


def test_in_out_module_parameter():
    """A module holding ``nn.Parameter(D_in, D_out)`` used as ``x @ self.w``."""
    model = InOutModule()
    x, y = rand(BATCH, D_IN, seed=1), rand(BATCH, D_OUT, seed=2)
    loss_func = nn.MSELoss()
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(loss_func, y)
    assert sorted(factors) == ["w1", "w2"]
    fn, params = module_fn(model)
    stored = ggn_block(fn, params, (x,), y, loss_func, "w2")
    assert_matrix_close(torch.kron(*factors["w2"]), stored, name="w2")
    ggn = ggn_block(fn, params, (x,), y, loss_func, "w1", "b1", layout="in_out")
    assert_matrix_close(kfac_matrix(*factors["w1"]), ggn, name="w1")


# ---------------------------------------------------------------------------------------------
# tied weight in a chain (the second use consumes the first use's output): not exact, so the
# factors are checked against Definition 23 with every use as extra shared positions


class TiedChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.lin(torch.tanh(self.lin(x))))


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_tied_chain_factors_match_definition(kfac_approx):
    from .references import criterion, loss_hessians

    torch.manual_seed(5)
    model = TiedChain()
    x = rand(BATCH, 3, seed=1)
    y = torch.randint(0, 2, (BATCH,), generator=torch.Generator().manual_seed(2))
    loss_func = nn.CrossEntropyLoss()
    w, b = model.lin.weight.detach(), model.lin.bias.detach()

    def untied(delta1, delta2):
        z1 = F.linear(x, w, b) + delta1
        z2 = F.linear(torch.tanh(z1), w, b) + delta2
        return model.head(z2)

    zeros = torch.zeros(BATCH, 3)
    prediction = untied(zeros, zeros).detach()
    jac1, jac2 = torch.func.jacrev(untied, argnums=(0, 1))(zeros, zeros)  # [N, F, N, D]
    g1 = torch.stack([jac1[n, :, n] for n in range(BATCH)]).detach()  # [N, F, D]
    g2 = torch.stack([jac2[n, :, n] for n in range(BATCH)]).detach()
    ones = torch.ones(BATCH, 1)
    x1 = torch.cat([x, ones], dim=1)
    x2 = torch.cat([torch.tanh(F.linear(x, w, b)), ones], dim=1)
    hess = loss_hessians(loss_func, prediction, y)
    r = criterion(loss_func, prediction).R
    if kfac_approx == "expand":
        a_ref = r * (x1.T @ x1 + x2.T @ x2)
        b_ref = sum(torch.einsum("nfi,nfe,nej->ij", g, hess, g) for g in (g1, g2)) / (2 * BATCH)
    else:
        x_bar = (x1 + x2) / 2
        g_bar = g1 + g2
        a_ref = r * x_bar.T @ x_bar
        b_ref = torch.einsum("nfi,nfe,nej->ij", g_bar, hess, g_bar) / BATCH

    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    A, B = cap.factors(loss_func, y, kfac_approx=kfac_approx)["lin"]
    assert_matrix_close(A, a_ref, name="A")
    assert_matrix_close(B, b_ref, name="B")
