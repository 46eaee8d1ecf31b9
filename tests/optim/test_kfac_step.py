"""One K-FAC step against the exact block-diagonal natural-gradient step, and the options.

Deep linear regression (no activations, MSE, float64) with ``N > D_in + 1`` and hidden
widths ``≤ D_out``: every factor is invertible and type-2 K-FAC equals the exact per-layer
GGN block (tutorial §5.2.2). With ``damping=0``, ``inverse='eigh'`` and ``factor_decay=0``
one step is ``θ ← θ − lr · G_l⁻¹ g_l`` per layer, ``G_l`` computed by autodiff.
"""

from __future__ import annotations

import copy

import pytest
import torch
from factors.references import assert_matrix_close
from torch import nn

import fxkfac

from .helpers import (
    canonical,
    canonical_change,
    compiled_copy,
    exact_natural_gradients,
    linear_layers,
    loss_gradient,
    parameters_of,
    train_step,
)

N, D_IN, D_HIDDEN, D_OUT = 10, 4, 3, 3
EXACT = {"fisher_type": "type-2", "inverse": "eigh", "factor_decay": 0.0, "inverse_every": 1}


def deep_linear(seed: int = 1, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(D_IN, D_HIDDEN, bias=bias),
        nn.Linear(D_HIDDEN, D_HIDDEN, bias=bias),
        nn.Linear(D_HIDDEN, D_OUT, bias=bias),
    )


def batch(seed: int, n: int = N):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=generator), torch.randn(n, D_OUT, generator=generator)


def kfac_for(model: nn.Module, x, **options):
    kmod = fxkfac.compile(model, example_inputs=(x,))
    loss_func = nn.MSELoss()
    kwargs = {"lr": 0.5, "damping": 0.0, "regulator": None, **EXACT, **options}
    return kmod, fxkfac.KFAC(kmod, loss_func=loss_func, **kwargs), loss_func


# ---------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_step_equals_exact_block_natural_gradient(bias):
    model = deep_linear(bias=bias)
    x, y = batch(0)
    kmod, opt, loss_func = kfac_for(model, x)
    layers = linear_layers(model)
    expected = exact_natural_gradients(model, x, y, loss_func, layers)
    before = parameters_of(model)
    stats = train_step(kmod, opt, loss_func, x, y)
    after = parameters_of(model)
    assert stats["skipped"] is None and stats["factors_updated"]
    for name, layer in layers.items():
        natural, _, _ = expected[name]
        change = canonical_change(before, after, layer)
        assert change.abs().max() > 1e-3, name  # the layer really moved
        assert_matrix_close(change, 0.5 * natural, rtol=1e-8, atol_scale=1e-9, name=name)
    # ΔF = Σ ⟨g, G⁻¹ g⟩ in the stats
    delta_f = sum(float((nat * g).sum()) for nat, g, _ in expected.values())
    assert stats["delta_f"] == pytest.approx(delta_f, rel=1e-8)


def test_cholesky_with_tiny_damping_is_close():
    """The π rule adds ``π√λ`` and ``√λ/π`` to the factors, so λ = 1e-16 perturbs them by ~1e-8."""
    model = deep_linear()
    x, y = batch(0)
    kmod, opt, loss_func = kfac_for(model, x, inverse="cholesky", damping=1e-16)
    layers = linear_layers(model)
    expected = exact_natural_gradients(model, x, y, loss_func, layers)
    before = parameters_of(model)
    train_step(kmod, opt, loss_func, x, y)
    after = parameters_of(model)
    for name, layer in layers.items():
        change = canonical_change(before, after, layer)
        assert_matrix_close(change, 0.5 * expected[name][0], rtol=1e-5, atol_scale=1e-6, name=name)


def test_cholesky_damping_changes_the_step():
    """Sanity of the previous test: a large damping does *not* give the exact step."""
    model = deep_linear()
    x, y = batch(0)
    kmod, opt, loss_func = kfac_for(model, x, inverse="cholesky", damping=1.0)
    layers = linear_layers(model)
    expected = exact_natural_gradients(model, x, y, loss_func, layers)
    before = parameters_of(model)
    train_step(kmod, opt, loss_func, x, y)
    after = parameters_of(model)
    change = canonical_change(before, after, layers["0"])
    assert not torch.allclose(change, 0.5 * expected["0"][0], rtol=1e-3)


class InOut(nn.Module):
    """Deep linear with weights stored ``[D_in, D_out]``: ``(x @ w1 + b1) @ w2``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.w1 = nn.Parameter(torch.randn(D_IN, D_HIDDEN))
        self.b1 = nn.Parameter(torch.randn(D_HIDDEN))
        self.w2 = nn.Parameter(torch.randn(D_HIDDEN, D_OUT))

    def forward(self, x):
        return (x @ self.w1 + self.b1) @ self.w2


def test_transposed_weight_step_is_exact():
    model = InOut()
    x, y = batch(3)
    kmod, opt, loss_func = kfac_for(model, x)
    assert [(layer.name, layer.weight_layout) for layer in kmod.layers] == [
        ("w1", "in_out"),
        ("w2", "in_out"),
    ]
    layers = {"w1": ("w1", "b1", "in_out"), "w2": ("w2", None, "in_out")}
    expected = exact_natural_gradients(model, x, y, loss_func, layers)
    before = parameters_of(model)
    train_step(kmod, opt, loss_func, x, y)
    after = parameters_of(model)
    for name, layer in layers.items():
        change = canonical_change(before, after, layer)
        assert change.abs().max() > 1e-3, name
        assert_matrix_close(change, 0.5 * expected[name][0], rtol=1e-8, atol_scale=1e-9, name=name)


# ---------------------------------------------------------------------------------------------
# every Fisher type through the user's loop


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


FISHER_TYPES = ["mc", "type-2", "empirical", "forward-only"]


@pytest.mark.parametrize("loss_func", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")], ids=["ce", "mse"])
@pytest.mark.parametrize("fisher_type", FISHER_TYPES)
def test_loop_factors_equal_explicit_factors(fisher_type, loss_func):
    """One loop iteration (no second forward, no retain_graph) accumulates ``cap.factors``."""
    model = MLP()
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(7, 3, generator=generator)
    if isinstance(loss_func, nn.CrossEntropyLoss):
        y = torch.randint(0, 4, (7,), generator=generator)
    else:
        y = torch.randn(7, 4, generator=generator)
    seed = 1234
    reference, kref = compiled_copy(model, x)
    out_ref, cap_ref = kref(x)
    explicit = cap_ref.factors(
        loss_func, y, fisher_type=fisher_type, generator=torch.Generator().manual_seed(seed)
    )
    loss_func(out_ref, y).backward()  # the explicit factors left the graph usable

    kmod = fxkfac.compile(model, example_inputs=(x,))
    opt = fxkfac.KFAC(
        kmod, loss_func=loss_func, lr=0.1, damping=1e-3, fisher_type=fisher_type, factor_decay=0.0, seed=seed
    )
    out, cap = kmod(x)
    loss = loss_func(out, y)
    opt.zero_grad()
    loss.backward()
    # the K-FAC backward did not disturb the training gradients
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-12, atol=1e-14, msg=name)
    stats = opt.step(cap)
    assert stats["factors_updated"] and stats["skipped"] is None
    factors = opt.preconditioner.factors
    assert sorted(factors) == sorted(explicit) == ["fc1", "fc2"]
    for name, (A, B) in explicit.items():
        assert_matrix_close(factors[name]["A"][0], A, name=f"{name} A")
        assert_matrix_close(factors[name]["B"][0], B, name=f"{name} B")
    if fisher_type == "forward-only":
        assert torch.equal(factors["fc1"]["B"][0], torch.eye(5))
    else:
        assert not torch.allclose(factors["fc1"]["B"][0], torch.eye(5), atol=1e-3)


@pytest.mark.parametrize("fisher_type", FISHER_TYPES)
def test_loop_runs_for_many_steps(fisher_type):
    """Several iterations of the loop: factors update every step, the loss goes down."""
    model = MLP()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(32, 3, generator=generator)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    loss_func = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(model, example_inputs=(x,))
    opt = fxkfac.KFAC(
        kmod, loss_func=loss_func, lr=0.3, damping=1e-2, fisher_type=fisher_type, inverse_every=2
    )
    losses = []
    for _ in range(8):
        out, cap = kmod(x)
        loss = loss_func(out, y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        stats = opt.step(cap)
        assert stats["factors_updated"] and stats["skipped"] is None
    assert opt.preconditioner.steps == 8
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# momentum, weight decay, KL-clipping


def test_momentum_accumulates_the_natural_gradient():
    model = deep_linear()
    x0, _ = batch(0)
    lr, momentum = 0.2, 0.9
    kmod, opt, loss_func = kfac_for(model, x0, lr=lr, momentum=momentum)
    layers = linear_layers(model)
    buffers = None
    for step in range(3):
        x, y = batch(step)
        naturals = {
            n: nat for n, (nat, _, _) in exact_natural_gradients(model, x, y, loss_func, layers).items()
        }
        buffers = naturals if buffers is None else {n: momentum * buffers[n] + naturals[n] for n in naturals}
        before = parameters_of(model)
        train_step(kmod, opt, loss_func, x, y)
        after = parameters_of(model)
        for name, layer in layers.items():
            change = canonical_change(before, after, layer)
            assert_matrix_close(change, lr * buffers[name], rtol=1e-7, atol_scale=1e-8, name=f"{step} {name}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_weight_decay_is_added_before_preconditioning(bias):
    model = deep_linear(bias=bias)
    x, y = batch(0)
    lr, wd = 0.5, 0.3
    kmod, opt, loss_func = kfac_for(model, x, lr=lr, weight_decay=wd)
    layers = linear_layers(model)
    before = parameters_of(model)
    extra = {name: wd * p for name, p in before.items()}
    expected = exact_natural_gradients(model, x, y, loss_func, layers, extra=extra)
    without = exact_natural_gradients(model, x, y, loss_func, layers)
    stats = train_step(kmod, opt, loss_func, x, y)
    after = parameters_of(model)
    for name, layer in layers.items():
        change = canonical_change(before, after, layer)
        assert not torch.allclose(expected[name][0], without[name][0], rtol=1e-3)
        assert_matrix_close(change, lr * expected[name][0], rtol=1e-8, atol_scale=1e-9, name=name)
    delta_f = sum(float((nat * g).sum()) for nat, g, _ in expected.values())
    assert stats["delta_f"] == pytest.approx(delta_f, rel=1e-8)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_step_leaves_the_gradients_alone(bias):
    """Like every ``torch.optim`` optimizer, ``KFAC.step`` must not modify ``p.grad``
    (weight decay is added to a copy): code after the step (logging, clipping statistics,
    a second optimizer) still sees the loss gradient."""
    model = deep_linear(bias=bias)
    x, y = batch(0)
    kmod, opt, loss_func = kfac_for(model, x, weight_decay=0.3, inverse="cholesky", damping=1e-3)
    out, cap = kmod(x)
    opt.zero_grad()
    loss_func(out, y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt.step(cap)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), f"{name}.grad was modified by opt.step"


def test_kl_clip_scales_the_update():
    """Ba et al. (2017): ν = min(1, √(κ / (η² Σ ⟨G⁻¹g, g⟩))), so the step's quadratic KL
    ``η² Σ ⟨Δ, G Δ⟩`` (Δ = ν G⁻¹ g, the update before the lr) equals κ when clipping is active."""
    model = deep_linear()
    x, y = batch(0)
    lr, kl_clip = 0.5, 1e-4
    kmod, opt, loss_func = kfac_for(model, x, lr=lr, kl_clip=kl_clip)
    layers = linear_layers(model)
    expected = exact_natural_gradients(model, x, y, loss_func, layers)
    kl = lr**2 * sum(float((nat * g).sum()) for nat, g, _ in expected.values())
    assert kl > 100 * kl_clip  # clipping is active
    scale = (kl_clip / kl) ** 0.5
    before = parameters_of(model)
    stats = train_step(kmod, opt, loss_func, x, y)
    after = parameters_of(model)
    assert stats["kl_scale"] == pytest.approx(scale, rel=1e-8)
    achieved = 0.0
    for name, layer in layers.items():
        natural, _, ggn = expected[name]
        change = canonical_change(before, after, layer)
        assert_matrix_close(change, lr * scale * natural, rtol=1e-8, atol_scale=1e-9, name=name)
        update = (change / lr).flatten()  # Δ, the scaled natural gradient
        achieved += lr**2 * float(update @ ggn @ update)
    assert achieved <= kl_clip * (1 + 1e-9)
    assert achieved == pytest.approx(kl_clip, rel=1e-7)


def test_kl_clip_inactive_when_large():
    model = deep_linear()
    x, y = batch(0)
    kmod, opt, loss_func = kfac_for(model, x, kl_clip=1e6)
    layers = linear_layers(model)
    expected = exact_natural_gradients(model, x, y, loss_func, layers)
    before = parameters_of(model)
    stats = train_step(kmod, opt, loss_func, x, y)
    after = parameters_of(model)
    assert stats["kl_scale"] == 1.0
    for name, layer in layers.items():
        change = canonical_change(before, after, layer)
        assert_matrix_close(change, 0.5 * expected[name][0], rtol=1e-8, atol_scale=1e-9, name=name)


# ---------------------------------------------------------------------------------------------
# parameter groups and lr schedulers


def test_parameter_groups_layer_follows_its_weight():
    model = deep_linear()
    x, y = batch(0)
    named = dict(model.named_parameters())
    groups = [
        {"params": [named["0.weight"], named["0.bias"], named["2.bias"]], "lr": 0.3},
        {"params": [named["1.weight"], named["1.bias"], named["2.weight"]], "lr": 0.05},
    ]
    kmod, opt, loss_func = kfac_for(model, x, params=groups)
    layers = linear_layers(model)
    expected = exact_natural_gradients(model, x, y, loss_func, layers)
    before = parameters_of(model)
    train_step(kmod, opt, loss_func, x, y)
    after = parameters_of(model)
    lrs = {"0": 0.3, "1": 0.05, "2": 0.05}  # layer 2's bias sits in group 0 but follows its weight
    for name, layer in layers.items():
        change = canonical_change(before, after, layer)
        assert_matrix_close(change, lrs[name] * expected[name][0], rtol=1e-8, atol_scale=1e-9, name=name)


def test_layers_outside_the_optimized_parameters_are_left_alone():
    """``params=`` a subset (fine-tuning the head): the other captured layers still get
    gradients from ``loss.backward()`` but belong to no group, so K-FAC must not touch them."""
    model = MLP()
    generator = torch.Generator().manual_seed(6)
    x, y = torch.randn(12, 3, generator=generator), torch.randint(0, 4, (12,), generator=generator)
    loss_func = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(model, example_inputs=(x,))
    opt = fxkfac.KFAC(kmod, loss_func=loss_func, lr=0.1, damping=1e-2, params=model.fc2.parameters())
    before = parameters_of(model)
    stats = train_step(kmod, opt, loss_func, x, y)
    assert stats["skipped"] is None
    after = parameters_of(model)
    assert torch.equal(after["fc1.weight"], before["fc1.weight"])
    assert torch.equal(after["fc1.bias"], before["fc1.bias"])
    assert not torch.equal(after["fc2.weight"], before["fc2.weight"])


def test_step_lr_scheduler_changes_the_step():
    model = deep_linear()
    x0, _ = batch(0)
    kmod, opt, loss_func = kfac_for(model, x0, lr=0.4)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    layers = linear_layers(model)
    for step, lr in enumerate([0.4, 0.04, 0.004]):
        x, y = batch(step)
        expected = exact_natural_gradients(model, x, y, loss_func, layers)
        before = parameters_of(model)
        stats = train_step(kmod, opt, loss_func, x, y)
        scheduler.step()
        after = parameters_of(model)
        assert stats["lr"] == pytest.approx(lr, rel=1e-12)
        for name, layer in layers.items():
            change = canonical_change(before, after, layer)
            assert_matrix_close(change, lr * expected[name][0], rtol=1e-7, atol_scale=1e-8, name=name)
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-4)


# ---------------------------------------------------------------------------------------------
# the preconditioner alone with torch.optim.SGD


def test_preconditioner_with_sgd_equals_kfac():
    model = MLP()
    generator = torch.Generator().manual_seed(8)
    data = [
        (torch.randn(16, 3, generator=generator), torch.randint(0, 4, (16,), generator=generator))
        for _ in range(6)
    ]
    loss_func = nn.CrossEntropyLoss()
    options = {
        "damping": 1e-2,
        "fisher_type": "mc",
        "factor_decay": 0.8,
        "inverse_every": 2,
        "seed": 3,
    }
    lr, momentum = 0.2, 0.9

    kfac_model = copy.deepcopy(model)
    kmod = fxkfac.compile(kfac_model, example_inputs=(data[0][0],))
    opt = fxkfac.KFAC(kmod, loss_func=loss_func, lr=lr, momentum=momentum, **options)

    sgd_model = copy.deepcopy(model)
    kmod_sgd = fxkfac.compile(sgd_model, example_inputs=(data[0][0],))
    pre = fxkfac.KFACPreconditioner(kmod_sgd, loss_func, **options)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=lr, momentum=momentum)

    for x, y in data:
        train_step(kmod, opt, loss_func, x, y)
        out, cap = kmod_sgd(x)
        loss = loss_func(out, y)
        sgd.zero_grad()
        loss.backward()
        pre.step(cap)
        sgd.step()
    start = dict(model.named_parameters())
    for (name, p), q in zip(kfac_model.named_parameters(), sgd_model.parameters(), strict=True):
        assert not torch.allclose(p, start[name], atol=1e-3), name
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-13, msg=name)


def test_preconditioner_writes_the_natural_gradient_into_grad():
    model = deep_linear()
    x, y = batch(0)
    loss_func = nn.MSELoss()
    kmod = fxkfac.compile(model, example_inputs=(x,))
    pre = fxkfac.KFACPreconditioner(kmod, loss_func, damping=0.0, **EXACT)
    layers = linear_layers(model)
    expected = exact_natural_gradients(model, x, y, loss_func, layers)
    out, cap = kmod(x)
    loss_func(out, y).backward()
    plain = loss_gradient(model, x, y, loss_func)
    torch.testing.assert_close({n: p.grad for n, p in model.named_parameters()}, plain)
    pre.step(cap)
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, layer in layers.items():
        assert_matrix_close(canonical(grads, layer), expected[name][0], rtol=1e-8, atol_scale=1e-9, name=name)
