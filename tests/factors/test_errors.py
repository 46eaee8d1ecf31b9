"""Errors and edge cases of ``cap.factors``: clear exceptions, forward-only factors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxkfac


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    return model, kmod, x


def test_unsupported_loss_names_supported_losses(setup):
    _, kmod, x = setup
    _, cap = kmod(x)
    with pytest.raises(fxkfac.UnsupportedLossError) as info:
        cap.factors(nn.L1Loss(), torch.randn(5, 2))
    message = str(info.value)
    for name in ("L1Loss", "MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss"):
        assert name in message, message
    assert isinstance(info.value, fxkfac.FxKfacError)


@pytest.mark.parametrize(
    "loss_func",
    [
        nn.MSELoss(reduction="none"),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.ones(2)),
        nn.BCEWithLogitsLoss(pos_weight=torch.ones(2)),
    ],
    ids=["reduction-none", "label-smoothing", "class-weights", "pos-weight"],
)
def test_unsupported_loss_settings(setup, loss_func):
    _, kmod, x = setup
    _, cap = kmod(x)
    y = torch.zeros(5, dtype=torch.long) if isinstance(loss_func, nn.CrossEntropyLoss) else None
    with pytest.raises(fxkfac.UnsupportedLossError):
        cap.factors(loss_func, torch.rand(5, 2) if y is None else y)


def test_loss_function_instead_of_module(setup):
    _, kmod, x = setup
    _, cap = kmod(x)
    with pytest.raises(fxkfac.UnsupportedLossError, match="module"):
        cap.factors(nn.functional.mse_loss, torch.randn(5, 2))


@pytest.mark.parametrize(
    ("loss_func", "targets"),
    [
        (nn.MSELoss(), torch.randn(5, 3)),
        (nn.MSELoss(), torch.randn(5)),
        (nn.MSELoss(), torch.zeros(5, 2, dtype=torch.long)),
        (nn.CrossEntropyLoss(), torch.zeros(4, dtype=torch.long)),
        (nn.CrossEntropyLoss(), torch.zeros(5, 2, dtype=torch.long)),
        (nn.CrossEntropyLoss(), torch.full((5,), 2)),  # class index out of range
        (nn.CrossEntropyLoss(), torch.full((5,), -100)),  # ignore_index
        (nn.CrossEntropyLoss(), torch.rand(5, 3)),  # probabilities of the wrong shape
        (nn.BCEWithLogitsLoss(), torch.rand(5, 1)),
        (nn.BCEWithLogitsLoss(), torch.ones(5, 2, dtype=torch.long)),
    ],
    ids=[
        "mse-features",
        "mse-rank",
        "mse-int",
        "ce-batch",
        "ce-rank",
        "ce-range",
        "ce-ignore",
        "ce-probs",
        "bce-shape",
        "bce-int",
    ],
)
def test_wrong_targets(setup, loss_func, targets):
    _, kmod, x = setup
    _, cap = kmod(x)
    with pytest.raises(ValueError):
        cap.factors(loss_func, targets)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fisher_type="bogus"),
        dict(kfac_approx="bogus"),
        dict(fisher_type="mc", mc_samples=0),
        dict(fisher_type="mc", mc_samples=2.5),
    ],
    ids=["fisher", "approx", "mc-zero", "mc-float"],
)
def test_bad_options(setup, kwargs):
    _, kmod, x = setup
    _, cap = kmod(x)
    with pytest.raises(ValueError) as info:
        cap.factors(nn.MSELoss(), torch.randn(5, 2), **kwargs)
    value = next(iter(kwargs.values())) if "mc_samples" not in kwargs else kwargs["mc_samples"]
    assert repr(value) in str(info.value), str(info.value)


def test_bad_fisher_type_lists_options(setup):
    _, kmod, x = setup
    _, cap = kmod(x)
    with pytest.raises(ValueError) as info:
        cap.factors(nn.MSELoss(), torch.randn(5, 2), fisher_type="bogus")
    for option in ("type-2", "mc", "empirical", "forward-only"):
        assert option in str(info.value)


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_no_grad_forward_raises_capture_error(setup, fisher_type):
    _, kmod, x = setup
    with torch.no_grad():
        _, cap = kmod(x)
    with pytest.raises(fxkfac.CaptureError, match="no_grad"):
        cap.factors(nn.MSELoss(), torch.randn(5, 2), fisher_type=fisher_type)


def test_functional_params_without_grad_raise_capture_error():
    """Functional parameters that do not require grad leave no graph either."""

    def fn(p, x):
        return torch.nn.functional.linear(x, p["w"])

    x = torch.randn(4, 3)
    kmod = fxkfac.compile(fn, params={"w": torch.randn(2, 3)}, example_inputs=(x,))
    _, cap = kmod(x)
    with pytest.raises(fxkfac.CaptureError):
        cap.factors(nn.MSELoss(), torch.randn(4, 2))


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_forward_only_b_is_identity(setup, kfac_approx, no_grad):
    """forward-only needs no backward (works under no_grad); A equals the type-2 A."""
    _, kmod, x = setup
    y = torch.randn(5, 2)
    _, cap_grad = kmod(x)
    type2 = cap_grad.factors(nn.MSELoss(), y, kfac_approx=kfac_approx)
    if no_grad:
        with torch.no_grad():
            _, cap = kmod(x)
    else:
        cap = cap_grad
    factors = cap.factors(nn.MSELoss(), y, fisher_type="forward-only", kfac_approx=kfac_approx)
    assert sorted(factors) == ["0", "2"]
    for name, (A, B) in factors.items():
        torch.testing.assert_close(B, torch.eye(B.shape[0]), rtol=0, atol=0)
        torch.testing.assert_close(A, type2[name][0])


def test_forward_only_grouped_conv_b_is_stacked_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    x = torch.randn(2, 4, 5, 5)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    A, B = cap.factors(nn.MSELoss(), torch.randn(2, 6, 3, 3), fisher_type="forward-only")["0"]
    assert A.shape == (2, 2 * 9 + 1, 2 * 9 + 1)
    torch.testing.assert_close(B, torch.eye(3).expand(2, 3, 3), rtol=0, atol=0)


def test_empty_batch(setup):
    _, kmod, _ = setup
    x = torch.randn(0, 3)
    _, cap = kmod(x)
    with pytest.raises(ValueError, match="empty"):
        cap.factors(nn.MSELoss(), torch.randn(0, 2))


def test_not_a_capture():
    from fxkfac.factors.compute import compute_factors

    with pytest.raises(fxkfac.CaptureError):
        compute_factors(object(), nn.MSELoss(), torch.randn(2, 2))


def test_factors_are_detached_and_reusable(setup):
    """Factors carry no autograd graph, and one capture serves several factor calls."""
    _, kmod, x = setup
    y = torch.randn(5, 2)
    _, cap = kmod(x)
    first = cap.factors(nn.MSELoss(), y)
    second = cap.factors(nn.MSELoss(), y)
    for name in first:
        for a, b in zip(first[name], second[name], strict=True):
            assert not a.requires_grad
            torch.testing.assert_close(a, b, rtol=0, atol=0)
