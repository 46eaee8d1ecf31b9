"""K-FAC factors against Definition 23 computed from autodiff, where K-FAC is *not* exact.

The exactness tests only see ``kron(B, A)`` in special cases. Here ``A`` and ``B`` are compared
one by one with :func:`references.kfac_reference` on nonlinear networks with many data,
sequence/spatial weight sharing and cross-entropy over positions:

    expand: A = R Σ_{n,s} x̃ x̃ᵀ,   B = 1/(N S) Σ_{n,s} J_{z_{n,s}}ᵀ M_n J_{z_{n,s}}
    reduce: A = R Σ_n x̄ x̄ᵀ,       B = 1/N Σ_n (Σ_s J_{z_{n,s}})ᵀ M_n (Σ_s J_{z_{n,s}})

with ``M_n`` the loss Hessian (type-2) or ``∇c ∇cᵀ`` (empirical). This pins down where every
backpropagated vector lands (which datum, which position), which exact cases cannot.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxkfac

from .references import assert_matrix_close, ggn_block, kfac_matrix, kfac_reference, module_fn

N = 3


class PositionsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class Transpose12(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class SequenceMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def build(case: str):
    """``(model, x, y, loss_func, layers)`` of one case; data depend on the datum."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if case == "mlp-ce":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
        loss = nn.CrossEntropyLoss()
    elif case == "mlp-mse":
        model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3, bias=False))
        x, y = torch.randn(N, 4, generator=g), torch.randn(N, 3, generator=g)
        loss = nn.MSELoss(reduction="sum")
    elif case == "mlp-bce":
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
        x, y = torch.randn(N, 4, generator=g), torch.rand(N, 3, generator=g)
        loss = nn.BCEWithLogitsLoss()
    elif case == "seq-mse":  # [N, S, D] through a nonlinear per-position MLP
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
        x, y = torch.randn(N, 3, 4, generator=g), torch.randn(N, 3, 2, generator=g)
        loss = nn.MSELoss()
    elif case == "seq-ce":  # logits [N, C, S]: cross-entropy over positions
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), PositionsLast())
        x, y = torch.randn(N, 4, 4, generator=g), torch.randint(0, 3, (N, 4), generator=g)
        loss = nn.CrossEntropyLoss()
    elif case == "seq-mean-ce":  # positions mixed (mean) before the head
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), SequenceMean(), nn.Linear(5, 3))
        x, y = torch.randn(N, 3, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
        loss = nn.CrossEntropyLoss(reduction="sum")
    elif case == "conv-ce":  # conv net, spatial mixing through a linear head
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(4, 4, 2, groups=2, padding=1, padding_mode="circular"),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 3),
        )
        x, y = torch.randn(N, 2, 5, 6, generator=g), torch.randint(0, 3, (N,), generator=g)
        loss = nn.CrossEntropyLoss()
    elif case == "conv-pixel-ce":  # segmentation-like logits [N, C, H, W]
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding="same"), nn.Sigmoid(), nn.Conv2d(4, 3, 1))
        x, y = torch.randn(N, 2, 3, 4, generator=g), torch.randint(0, 3, (N, 3, 4), generator=g)
        loss = nn.CrossEntropyLoss()
    elif case == "conv1d-bce":
        model = nn.Sequential(nn.Conv1d(2, 3, 2, dilation=2), nn.Tanh(), nn.Conv1d(3, 2, 2))
        x = torch.randn(N, 2, 7, generator=g)
        y = torch.rand(N, 2, 4, generator=g)
        loss = nn.BCEWithLogitsLoss()
    elif case == "conv3d-mse":
        model = nn.Sequential(nn.Conv3d(2, 2, 2, groups=2), nn.ReLU(), nn.Conv3d(2, 3, 2))
        x = torch.randn(N, 2, 4, 3, 3, generator=g)
        y = torch.randn(N, 3, 2, 1, 1, generator=g)
        loss = nn.MSELoss()
    elif case == "mlp-inplace-relu":  # the layer output is overwritten in place
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
        x, y = torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
        loss = nn.CrossEntropyLoss()
    elif case == "seq4d-mse":  # two shared axes [N, S1, S2, D]
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        x, y = torch.randn(N, 2, 3, 4, generator=g), torch.randn(N, 2, 3, 2, generator=g)
        loss = nn.MSELoss()
    elif case == "seq-flatten-mse":  # positions mixed by flattening into a linear head
        model = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(9, 2))
        x, y = torch.randn(N, 3, 4, generator=g), torch.randn(N, 2, generator=g)
        loss = nn.MSELoss()
    elif case == "transposed-input":  # non-contiguous layer input [N, S, D] from [N, D, S]
        model = nn.Sequential(Transpose12(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        x, y = torch.randn(N, 4, 5, generator=g), torch.randn(N, 5, 2, generator=g)
        loss = nn.MSELoss(reduction="sum")
    elif case == "scalar-bce":  # binary classification, prediction [N]
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0))
        x, y = torch.randn(N, 4, generator=g), torch.rand(N, generator=g)
        loss = nn.BCEWithLogitsLoss()
    elif case == "scalar-mse":  # scalar regression, prediction [N]
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 1), nn.Flatten(0))
        x, y = torch.randn(N, 4, generator=g), torch.randn(N, generator=g)
        loss = nn.MSELoss()
    elif case == "channels-last-conv":
        model = nn.Sequential(nn.Conv2d(3, 4, 2, stride=(1, 2)), nn.Tanh(), nn.Conv2d(4, 2, 2))
        x = torch.randn(N, 3, 4, 6, generator=g).to(memory_format=torch.channels_last)
        y = torch.randint(0, 2, (N, 2, 2), generator=g)
        loss = nn.CrossEntropyLoss()
    else:
        raise ValueError(case)
    layers = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    return model, x, y, loss, layers


CASES = [
    "mlp-ce",
    "mlp-mse",
    "mlp-bce",
    "seq-mse",
    "seq-ce",
    "seq-mean-ce",
    "conv-ce",
    "conv-pixel-ce",
    "conv1d-bce",
    "conv3d-mse",
    "mlp-inplace-relu",
    "seq4d-mse",
    "seq-flatten-mse",
    "transposed-input",
    "scalar-bce",
    "scalar-mse",
    "channels-last-conv",
]


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("case", CASES)
def test_factors_match_definition(case, fisher_type, kfac_approx):
    model, x, y, loss_func, layers = build(case)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(loss_func, y, fisher_type=fisher_type, kfac_approx=kfac_approx)
    assert sorted(factors) == sorted(layers)
    for name in layers:
        expected = kfac_reference(
            model, (x,), y, loss_func, name, fisher_type=fisher_type, kfac_approx=kfac_approx
        )
        for label, actual, reference in zip("AB", factors[name], expected, strict=True):
            assert_matrix_close(actual, reference, name=f"{name} {label}")


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", ["mlp-ce", "seq-ce", "conv-pixel-ce"])
def test_forward_only_matches_definition(case, kfac_approx):
    """forward-only: the same A as the gradient-based types, B = I."""
    model, x, y, loss_func, layers = build(case)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(loss_func, y, fisher_type="forward-only", kfac_approx=kfac_approx)
    for name in layers:
        a_ref, b_ref = kfac_reference(model, (x,), y, loss_func, name, kfac_approx=kfac_approx)
        A, B = factors[name]
        assert_matrix_close(A, a_ref, name=f"{name} A")
        assert_matrix_close(B, torch.eye(B.shape[-1]).expand_as(b_ref), name=f"{name} B")


@pytest.mark.parametrize("case", ["mlp-ce", "seq-ce", "conv-ce"])
def test_mc_matches_definition_in_expectation(case):
    """KFAC-MC with many samples approaches the type-2 factors (B) and keeps A exactly."""
    model, x, y, loss_func, layers = build(case)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(
        loss_func, y, fisher_type="mc", mc_samples=3000, generator=torch.Generator().manual_seed(0)
    )
    for name in layers:
        a_ref, b_ref = kfac_reference(model, (x,), y, loss_func, name)
        A, B = factors[name]
        assert_matrix_close(A, a_ref, name=f"{name} A")
        error = float((B - b_ref).norm() / b_ref.norm())
        assert error < 0.08, f"{name} B: relative error {error:.3g}"


def test_reference_is_exact_where_kfac_is():
    """Sanity check of kfac_reference: in an exact case (deep linear, MSE, sequence) its
    factors reproduce the autodiff GGN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    x, y = torch.randn(4, 3, 3), torch.randn(4, 3, 2)
    loss_func = nn.MSELoss()
    fn, params = module_fn(model)
    for name in ("0", "1"):
        a, b = kfac_reference(model, (x,), y, loss_func, name)
        ggn = ggn_block(fn, params, (x,), y, loss_func, f"{name}.weight", f"{name}.bias")
        assert_matrix_close(kfac_matrix(a, b), ggn, name=name)


@pytest.mark.parametrize("chunk_size", [1, 5])
@pytest.mark.parametrize("case", ["seq-ce", "conv-pixel-ce", "conv1d-bce", "seq4d-mse"])
def test_chunk_size_does_not_change_type2(case, chunk_size):
    """Type-2 vectors come in chunks; chunk boundaries inside (class, position) blocks must
    not change the factors."""
    model, x, y, loss_func, layers = build(case)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    chunked = cap.factors(loss_func, y, chunk_size=chunk_size)
    for name in layers:
        expected = kfac_reference(model, (x,), y, loss_func, name)
        for label, actual, reference in zip("AB", chunked[name], expected, strict=True):
            assert_matrix_close(actual, reference, name=f"{name} {label}")


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_float32_close_to_float64(fisher_type):
    model, x, y, loss_func, layers = build("conv-ce")
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    exact = cap.factors(loss_func, y, fisher_type=fisher_type)
    model32, x32 = model.float(), x.float()
    _, cap32 = fxkfac.compile(model32, example_inputs=(x32,))(x32)
    single = cap32.factors(loss_func, y, fisher_type=fisher_type)
    for name in layers:
        for a32, a64 in zip(single[name], exact[name], strict=True):
            assert a32.dtype == torch.float32
            torch.testing.assert_close(a32.double(), a64, rtol=1e-4, atol=1e-6 * a64.abs().max())


class TwoHeads(nn.Module):
    """Returns ``(aux, logits)``: the loss is on the second output."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.aux = nn.Linear(5, 2)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.aux(h), self.head(h)


class Logits(nn.Module):
    """The ``head`` path of TwoHeads alone (for the reference)."""

    def __init__(self, two_heads: TwoHeads):
        super().__init__()
        self.body, self.head = two_heads.body, two_heads.head

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_prediction_argument_and_unused_layer():
    """``prediction=`` selects the loss input; a layer not on its path gets ``B = 0``."""
    torch.manual_seed(0)
    model = TwoHeads()
    x, y = torch.randn(N, 4), torch.randint(0, 3, (N,))
    loss_func = nn.CrossEntropyLoss()
    (_aux, logits), cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(loss_func, y, prediction=logits)
    reference_model = Logits(model)
    for name in ("body", "head"):
        expected = kfac_reference(reference_model, (x,), y, loss_func, name)
        for label, actual, reference in zip("AB", factors[name], expected, strict=True):
            assert_matrix_close(actual, reference, name=f"{name} {label}")
    A, B = factors["aux"]
    assert A.abs().max() > 0
    torch.testing.assert_close(B, torch.zeros_like(B), rtol=0, atol=0)
