"""The optimizer and EKFAC group data exactly like ``cap.factors`` for any batch layout.

Regressions: the preconditioner's ``A`` under ``reduce`` once ignored the batch size of an
unknown layout, and EKFAC's per-example gradients once ignored the probed layout.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fxkfac
from fxkfac.precond.preconditioner import KFACPreconditioner

N, S, E, C = 6, 5, 3, 2


class Merged(nn.Module):
    """``proj`` sees ``[N·S, E]`` (datum-major) through a reshape."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(E, 4)
        self.head = nn.Linear(4 * S, C)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x.reshape(-1, E))).reshape(x.shape[0], -1))


class SequenceFirst(nn.Module):
    """``proj`` sees ``[S, N, E]``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(E, 4)
        self.head = nn.Linear(4 * S, C)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x.transpose(0, 1))).transpose(0, 1).flatten(1))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, S, E, generator=g, dtype=torch.float64), torch.randn(
        N, C, generator=g, dtype=torch.float64
    )


def test_preconditioner_reduce_factors_equal_cap_factors_for_an_unknown_layout():
    torch.manual_seed(0)
    model, (x, y), loss_func = Merged().double(), data(), nn.MSELoss()
    kmod = fxkfac.compile(model)  # no example inputs: the layout is unknown
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "batch layout unknown"
        out, cap = kmod(x)
        expected = cap.factors(loss_func, y, fisher_type="type-2", kfac_approx="reduce")["proj"]
        pre = KFACPreconditioner(kmod, loss_func, fisher_type="type-2", kfac_approx="reduce")
        out, cap = kmod(x)
        loss_func(out, y).backward()
        pre.step(cap)
    x_mean = torch.cat([x, torch.ones(N, S, 1, dtype=x.dtype)], -1).mean(1)  # x̄_n of [x; 1]
    reduction = 2.0 / (N * C)  # MSELoss(mean) = R Σ ½‖f − y‖²
    torch.testing.assert_close(expected[0], reduction * x_mean.T @ x_mean)
    torch.testing.assert_close(pre.factors["proj"]["A"][0], expected[0])
    torch.testing.assert_close(pre.factors["proj"]["B"][0], expected[1])


@pytest.mark.parametrize("model_class", [SequenceFirst, Merged])
def test_ekfac_eigenvalues_use_per_example_gradients_in_any_layout(model_class):
    """``s = R Σ_n (Q_Bᵀ G_n Q_A)²`` with ``G_n`` from ``vmap(grad)`` of each datum's loss."""
    torch.manual_seed(0)
    model, (x, y), loss_func = model_class().double(), data(), nn.MSELoss()
    kmod = fxkfac.compile(model, example_inputs=(x,))
    pre = KFACPreconditioner(kmod, loss_func, fisher_type="empirical", inverse="ekfac", damping=1e-3)
    out, cap = kmod(x)
    loss_func(out, y).backward()
    pre.step(cap)
    inverse = pre.inverses["proj"]
    q_a, q_b, s = inverse.tensors["QA"][0], inverse.tensors["QB"][0], inverse.tensors["s"][0]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def criterion(p, x_n, y_n):
        return 0.5 * ((functional_call(model, p, (x_n[None],))[0] - y_n) ** 2).sum()

    g = vmap(grad(criterion), in_dims=(None, 0, 0))(params, x, y)
    per_example = torch.cat([g["proj.weight"], g["proj.bias"][:, :, None]], dim=2)  # [N, D_out, D_in + 1]
    expected = 2.0 / (N * C) * ((q_b.T @ per_example @ q_a) ** 2).sum(0)
    torch.testing.assert_close(s, expected, rtol=1e-10, atol=1e-12)


def test_ekfac_skips_a_layer_whose_first_factor_update_was_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).float()
    x = torch.randn(8, 3, dtype=torch.float32) * 1e20  # float32: A overflows, gradients stay finite
    y = torch.randint(0, 2, (8,))
    kmod = fxkfac.compile(model, example_inputs=(x,))
    pre = KFACPreconditioner(kmod, nn.CrossEntropyLoss(), fisher_type="type-2", inverse="ekfac")
    out, cap = kmod(x)
    nn.functional.cross_entropy(out, y).backward()
    with pytest.warns(RuntimeWarning, match="non-finite K-FAC factor for layer 0"):
        stats = pre.step(cap)
    assert "0" in stats["skipped_layers"] and "0" not in pre.inverses and "2" in pre.inverses
