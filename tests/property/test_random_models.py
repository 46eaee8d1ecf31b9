"""Property-based tests (hypothesis): random MLP and CNN architectures and shapes.

For every drawn architecture (depth, widths, bias on/off, activation; convolution dimension,
kernel, stride, padding, dilation, groups; batch size including 1; loss and reduction):

* the compiled module's outputs and parameter gradients equal the original model's;
* the type-2 and empirical factors equal a direct float64 reference. For MLPs it is written
  out here: ``A = R Σ_n x̃_n x̃_nᵀ`` from the recorded layer inputs and
  ``B = 1/N Σ_n J_nᵀ M_n J_n`` with ``J_n = ∂f_n/∂z_n`` by autograd and ``M_n`` the loss
  Hessian (type-2) or ``∇c ∇cᵀ`` (empirical); for CNNs it is
  :func:`factors.references.kfac_reference` (expand and reduce).

``derandomize=True`` makes the drawn examples the same on every run (reproducible CI).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from factors.references import assert_matrix_close, criterion, kfac_reference, loss_gradients, loss_hessians
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fxkfac

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
DTYPE = torch.float64
ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "identity": nn.Identity,
}
LOSSES = {"mse": nn.MSELoss, "cross_entropy": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Case:
    """A drawn model with its data, loss and factor options."""

    model: nn.Module
    x: Tensor
    y: Tensor
    loss_func: nn.Module
    fisher_type: str
    kfac_approx: str = "expand"


def _targets(loss: str, prediction_shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    if loss == "cross_entropy":
        return torch.randint(0, prediction_shape[1], prediction_shape[:1], generator=generator)
    if loss == "bce":
        return torch.rand(prediction_shape, generator=generator, dtype=DTYPE)
    return torch.randn(prediction_shape, generator=generator, dtype=DTYPE)


def _loss_and_options(draw) -> tuple[str, nn.Module, str]:
    loss = draw(st.sampled_from(sorted(LOSSES)))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    fisher_type = draw(st.sampled_from(["type-2", "empirical"]))
    return loss, LOSSES[loss](reduction=reduction), fisher_type


@st.composite
def mlps(draw) -> Case:
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 5)) for _ in range(depth + 1)]
    activation = ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]
    loss, loss_func, fisher_type = _loss_and_options(draw)
    if loss == "cross_entropy":
        widths[-1] = max(widths[-1], 2)
    batch = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=draw(st.booleans())))
        if i < depth - 1:
            layers.append(activation())
    model = nn.Sequential(*layers).to(DTYPE)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, widths[0], generator=generator, dtype=DTYPE)
    y = _targets(loss, (batch, widths[-1]), generator)
    return Case(model, x, y, loss_func, fisher_type)


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@st.composite
def cnns(draw) -> Case:
    dim = draw(st.sampled_from([1, 2]))
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[dim]
    activation = ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]
    loss, loss_func, fisher_type = _loss_and_options(draw)
    batch = draw(st.integers(1, 4))
    size = draw(st.integers(3, 7))
    first_groups = draw(st.sampled_from([2, 1, 3]))
    channels = first_groups * draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    in_channels, spatial = channels, size
    layers: list[nn.Module] = []
    for index in range(draw(st.integers(1, 2))):
        divisors = [g for g in (2, 1, 3) if in_channels % g == 0]
        groups = first_groups if index == 0 else draw(st.sampled_from(divisors))
        out_channels = groups * draw(st.integers(1, 3))
        kernel, stride = draw(st.sampled_from([3, 2, 1])), draw(st.integers(1, 2))
        padding, dilation = draw(st.integers(0, 2)), draw(st.integers(1, 2))
        spatial = _output_size(spatial, kernel, stride, padding, dilation)
        assume(spatial >= 1)
        layers.append(
            conv(
                in_channels,
                out_channels,
                kernel,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=draw(st.booleans()),
            )
        )
        layers.append(activation())
        in_channels = out_channels
    d_out = draw(st.integers(2 if loss == "cross_entropy" else 1, 3))
    layers += [nn.Flatten(), nn.Linear(in_channels * spatial**dim, d_out, bias=draw(st.booleans()))]
    model = nn.Sequential(*layers).to(DTYPE)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *([size] * dim), generator=generator, dtype=DTYPE)
    y = _targets(loss, (batch, d_out), generator)
    kfac_approx = draw(st.sampled_from(["reduce", "expand"]))
    return Case(model, x, y, loss_func, fisher_type, kfac_approx)


# ---------------------------------------------------------------------------------------------
# the compiled module equals the original


def describe(case: Case) -> None:
    """Record what was drawn (``pytest --hypothesis-show-statistics`` lists it)."""
    event(f"loss={type(case.loss_func).__name__}({case.loss_func.reduction})")
    event(f"fisher_type={case.fisher_type}, kfac_approx={case.kfac_approx}")
    event(f"batch={case.x.shape[0]}")
    for m in case.model.modules():
        if isinstance(m, nn.Linear):
            event(f"linear bias={m.bias is not None}")
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            event(f"conv{m.weight.ndim - 2}d groups={m.groups}")
            event(f"kernel={m.kernel_size[0]}, stride={m.stride[0]}, dilation={m.dilation[0]}")
            event(f"padding={m.padding[0]}")


def assert_compiled_equals_original(case: Case) -> None:
    describe(case)
    model, x, y, loss_func = case.model, case.x, case.y, case.loss_func
    kmod = fxkfac.compile(model, example_inputs=(x,))
    assert {layer.name for layer in kmod.layers} == {
        name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
    }
    assert not kmod.uncaptured
    model.zero_grad()
    expected_out = model(x)
    loss_func(expected_out, y).backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    out, _ = kmod(x)
    loss_func(out, y).backward()
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-12, atol=1e-12, msg=name)


@SETTINGS
@given(case=mlps())
def test_compiled_mlp_equals_original(case: Case):
    assert_compiled_equals_original(case)


@SETTINGS
@given(case=cnns())
def test_compiled_cnn_equals_original(case: Case):
    assert_compiled_equals_original(case)


# ---------------------------------------------------------------------------------------------
# factors equal a direct float64 reference


def mlp_reference(case: Case) -> dict[str, tuple[Tensor, Tensor]]:
    """Definition 23 for an MLP, from recorded layer inputs and per-datum Jacobians."""
    model, x, y, loss_func = case.model, case.x, case.y, case.loss_func
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    handles = [
        m.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
        for name, m in linears.items()
    ]
    try:
        prediction = model(x)
    finally:
        for handle in handles:
            handle.remove()
    batch, dim_f = prediction.shape
    R = criterion(loss_func, prediction).R
    if case.fisher_type == "type-2":
        curvature = loss_hessians(loss_func, prediction, y)  # [N, F, F]
    else:
        gradients = loss_gradients(loss_func, prediction, y)
        curvature = torch.einsum("nf,ng->nfg", gradients, gradients)
    factors = {}
    for name, linear in linears.items():
        layer_input, layer_output = seen[name]
        x_tilde = layer_input.detach()
        if linear.bias is not None:
            x_tilde = torch.cat([x_tilde, torch.ones(batch, 1, dtype=DTYPE)], dim=1)
        A = R * x_tilde.T @ x_tilde
        # J_n = ∂f_n/∂z_n: data are independent, so ∂(Σ_n f_{n,c})/∂z holds row c of every J_n
        rows = [
            torch.autograd.grad(prediction[:, c].sum(), layer_output, retain_graph=True)[0]
            for c in range(dim_f)
        ]
        jacobians = torch.stack(rows, dim=1)  # [N, F, D_out]
        B = torch.einsum("nfi,nfg,ngj->ij", jacobians, curvature, jacobians) / batch
        factors[name] = (A, B)
    return factors


@SETTINGS
@given(case=mlps())
def test_mlp_factors_equal_direct_reference(case: Case):
    describe(case)
    kmod = fxkfac.compile(case.model, example_inputs=(case.x,))
    _, cap = kmod(case.x)
    factors = cap.factors(case.loss_func, case.y, fisher_type=case.fisher_type)
    expected = mlp_reference(case)
    assert factors.keys() == expected.keys()
    for name, (A, B) in factors.items():
        assert_matrix_close(A, expected[name][0], name=f"{name} A")
        assert_matrix_close(B, expected[name][1], name=f"{name} B")


@SETTINGS
@given(case=cnns())
def test_cnn_factors_equal_reference(case: Case):
    describe(case)
    kmod = fxkfac.compile(case.model, example_inputs=(case.x,))
    _, cap = kmod(case.x)
    factors = cap.factors(case.loss_func, case.y, fisher_type=case.fisher_type, kfac_approx=case.kfac_approx)
    for name, (A, B) in factors.items():
        A_ref, B_ref = kfac_reference(
            case.model,
            (case.x,),
            case.y,
            case.loss_func,
            name,
            fisher_type=case.fisher_type,
            kfac_approx=case.kfac_approx,
        )
        assert_matrix_close(A, A_ref, name=f"{name} A")
        assert_matrix_close(B, B_ref, name=f"{name} B")
