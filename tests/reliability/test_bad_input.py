"""Bad input (issue 8): every row raises a clear error or behaves in a documented, safe way.

Safe means: nothing non-finite is ever written into parameters or optimizer state, and a
step that is refused or skipped leaves the state as it was. Rows tested elsewhere (listed
so that the table is complete, see docs/reliability.md):

======================================  =============================================================
row                                     test
======================================  =============================================================
untraceable model                       capture/test_compile_zoo.py::test_data_dependent_control_flow_*
unsupported ops                         capture/test_compile_zoo.py::test_uncaptured_parameters_and_reasons,
                                        optim/test_uncaptured.py
NaN/Inf in gradients or inputs          optim/test_failures.py::test_non_finite_*_skips_the_step
empty batch (``cap.factors``)           factors/test_errors.py::test_empty_batch
targets of the wrong shape or dtype     factors/test_errors.py::test_wrong_targets
unsupported loss (``cap.factors``)      factors/test_errors.py::test_unsupported_loss_*
capture from another compiled module    optim/test_failures.py::test_capture_from_another_*
enormous factor dimensions              optim/test_failures.py::test_large_factors_are_diagonal_and_train
checkpoint from a different model       optim/test_checkpoint.py::test_checkpoint_of_*_is_rejected
======================================  =============================================================
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from optim.helpers import assert_same, snapshot
from torch import Tensor, nn

import fxkfac
from fxkfac.precond.inverse import KroneckerInverse

LOSS = nn.CrossEntropyLoss()


class MLP(nn.Module):
    def __init__(self, d_in: int = 3, width: int = 5, d_out: int = 3, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, width, bias=bias)
        self.fc2 = nn.Linear(width, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def batch(size: int, d_in: int = 3, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, d_in, generator=generator)
    return x, torch.randint(0, classes, (size,), generator=generator)


def make(model: nn.Module, x: Tensor, loss_func: nn.Module = LOSS, **options):
    kmod = fxkfac.compile(model, example_inputs=(x,))
    settings = {"lr": 0.1, "damping": 1e-2, "inverse_every": 1, **options}
    return kmod, fxkfac.KFAC(kmod, loss_func=loss_func, **settings)


def train_step(kmod, opt, x, y, loss_func: nn.Module = LOSS) -> dict:
    out, cap = kmod(x)
    loss = loss_func(out, y)
    opt.zero_grad()
    loss.backward()
    return opt.step(cap, loss=loss.detach())


def assert_finite(model: nn.Module, opt: fxkfac.KFAC) -> None:
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    for name, factors in opt.preconditioner.factors.items():
        for key, value in factors.items():
            assert torch.isfinite(value).all(), (name, key)
    for name, inverse in opt.preconditioner.inverses.items():
        assert inverse.is_finite(), name
    for state in opt.state.values():
        for entry, value in state.items():
            if isinstance(value, Tensor):
                assert torch.isfinite(value).all(), entry


# ---------------------------------------------------------------------------------------------
# NaN/Inf in factors and inverses: skip that update, keep the last good state, warn


def test_non_finite_factor_keeps_the_last_good_factor():
    """Inputs of 1e20 saturate tanh: every gradient is finite (fc1's exactly zero), but fc1's
    ``A = R Σ x̃x̃ᵀ`` overflows float32. Only that factor's update is skipped."""
    torch.manual_seed(0)
    model = MLP()
    x, y = batch(8)
    kmod, opt = make(model, x, fisher_type="type-2", factor_decay=0.5)
    train_step(kmod, opt, x, y)
    before = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="non-finite K-FAC factor for layer fc1"):
        stats = train_step(kmod, opt, 1e20 * x, y)
    assert stats["skipped"] is None and stats["skipped_layers"] == ["fc1"]
    factors = opt.preconditioner.factors
    for key in ("A", "B"):
        assert torch.equal(factors["fc1"][key], before["factors"]["fc1"][key]), key
    assert not torch.equal(factors["fc2"]["A"], before["factors"]["fc2"]["A"])
    assert_finite(model, opt)
    assert train_step(kmod, opt, x, y)["skipped"] is None


def test_non_finite_inverse_keeps_the_previous_inverse(monkeypatch):
    """Fault injection: one inversion returns NaN; the previous inverse stays in use."""
    torch.manual_seed(0)
    model = MLP()
    x, y = batch(8)
    kmod, opt = make(model, x, fisher_type="type-2")
    train_step(kmod, opt, x, y)
    before = snapshot(model, opt)
    compute = KroneckerInverse.compute

    def broken(cls, *args, **kwargs):
        inverse = compute(*args, **kwargs)
        tensors = {key: torch.full_like(value, math.nan) for key, value in inverse.tensors.items()}
        return KroneckerInverse(inverse.method, tensors, inverse.damping, inverse.tol)

    monkeypatch.setattr(KroneckerInverse, "compute", classmethod(broken))
    with pytest.warns(RuntimeWarning, match="non-finite inverse for layer"):
        stats = train_step(kmod, opt, x, y)
    assert stats["skipped"] is None and not stats["inverses_updated"]
    for name, tensors in before["inverses"].items():
        for key, value in tensors.items():
            assert torch.equal(opt.preconditioner.inverses[name].tensors[key], value), (name, key)
    assert_finite(model, opt)
    for name, p in model.named_parameters():  # the step was still taken, with the old inverse
        assert not torch.equal(p, before["params"][name]), name


# ---------------------------------------------------------------------------------------------
# singular and all-zero factors


class Degenerate(nn.Module):
    """``fc1`` sees rank-2 inputs (singular ``A``), ``silent`` sees zeros (``A = 0``), the
    output of ``dead`` is multiplied by zero (``B = 0``)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5, bias=False)
        self.fc2 = nn.Linear(5, 3)
        self.silent = nn.Linear(4, 3, bias=False)
        self.dead = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) + self.silent(x * 0) + 0 * self.dead(x)


def _eye(n: int) -> Tensor:
    return torch.eye(n, dtype=torch.float64)


def expected_natural_gradient(A: Tensor, B: Tensor, G: Tensor, damping: float, inverse: str) -> Tensor:
    """Float64 reference: ``(B ⊗ A + λI)⁻¹ rvec(G)`` (eigh) or the π-split damped inverse."""
    A, B, G = A.double(), B.double(), G.double()
    if inverse == "eigh":
        matrix = torch.kron(B, A) + damping * _eye(B.shape[0] * A.shape[0])
        return torch.linalg.solve(matrix, G.flatten()).reshape(G.shape)
    pi = math.sqrt((A.trace() / A.shape[0]) / (B.trace() / B.shape[0]))
    root = math.sqrt(damping)
    left = torch.linalg.inv(B + root / pi * _eye(B.shape[0]))
    right = torch.linalg.inv(A + root * pi * _eye(A.shape[0]))
    return left @ G @ right


@pytest.mark.parametrize("inverse", ["cholesky", "eigh"])
def test_singular_and_all_zero_factors_give_finite_exact_steps(inverse):
    torch.manual_seed(0)
    model = Degenerate().double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, generator=generator, dtype=torch.float64) @ torch.randn(
        2, 4, generator=generator, dtype=torch.float64
    )
    y = torch.randint(0, 3, (16,), generator=generator)
    damping = 1e-3
    kmod, opt = make(
        model, x, lr=1.0, damping=damping, inverse=inverse, fisher_type="type-2", factor_decay=0.0
    )
    before = snapshot(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        stats = train_step(kmod, opt, x, y)
    assert stats["skipped"] is None
    factors = opt.preconditioner.factors
    assert torch.linalg.matrix_rank(factors["fc1"]["A"][0]) == 2
    assert torch.equal(factors["silent"]["A"], torch.zeros_like(factors["silent"]["A"]))
    assert torch.equal(factors["dead"]["B"], torch.zeros_like(factors["dead"]["B"]))
    assert_finite(model, opt)
    # fc1: exactly the damped inverse of the singular block
    natural = before["params"]["fc1.weight"] - model.fc1.weight.detach()
    expected = expected_natural_gradient(
        factors["fc1"]["A"][0], factors["fc1"]["B"][0], model.fc1.weight.grad, damping, inverse
    )
    torch.testing.assert_close(natural, expected, rtol=1e-7, atol=1e-10)
    # zero factors come with zero gradients: those parameters do not move
    for name in ("silent.weight", "dead.weight", "dead.bias"):
        assert torch.equal(dict(model.named_parameters())[name], before["params"][name]), name


def rank_one_batch(size: int = 16) -> tuple[Tensor, Tensor]:
    """Inputs ``[t, t, 0]``: ``A`` of the first (bias-free) layer is exactly singular."""
    generator = torch.Generator().manual_seed(2)
    t = torch.randn(size, 1, generator=generator)
    return torch.cat([t, t, torch.zeros_like(t)], 1), torch.randint(0, 3, (size,), generator=generator)


def test_undamped_singular_factor_never_writes_non_finite_values():
    """``damping=0`` with a singular factor: the π-split Cholesky inverse is unbounded, the
    update overflows; the step is skipped (parameters and momentum untouched) with a warning."""
    torch.manual_seed(0)
    model = MLP(bias=False)
    x, y = rank_one_batch()
    kmod, opt = make(model, x, lr=1.0, damping=0.0, momentum=0.9, inverse="cholesky", fisher_type="type-2")
    before = snapshot(model, opt)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="non-finite K-FAC update.*increase damping"):
            stats = train_step(kmod, opt, x, y)
        assert stats["skipped"] == "non-finite update"
        after = snapshot(model, opt)
        for name, p in before["params"].items():
            assert torch.equal(p, after["params"][name]), name
    assert not opt.state  # no momentum buffer was written
    assert all(inverse.is_finite() for inverse in opt.preconditioner.inverses.values())


def test_undamped_singular_factor_leaves_grad_alone_in_the_preconditioner():
    """Used with another optimizer, the preconditioner never writes a non-finite ``.grad``."""
    torch.manual_seed(0)
    model = MLP(bias=False)
    x, y = rank_one_batch()
    kmod = fxkfac.compile(model, example_inputs=(x,))
    pre = fxkfac.KFACPreconditioner(kmod, LOSS, damping=0.0, inverse="cholesky", fisher_type="type-2")
    out, cap = kmod(x)
    LOSS(out, y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    with pytest.warns(RuntimeWarning, match="non-finite K-FAC direction"):
        stats = pre.step(cap)
    assert stats["skipped"] == "non-finite update"
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


def test_undamped_singular_factor_with_eigh_pseudo_inverse_trains():
    """The documented fix: ``inverse='eigh'`` with ``tol > 0`` discards the null directions."""
    torch.manual_seed(0)
    model = MLP(bias=False)
    x, y = rank_one_batch()
    kmod, opt = make(model, x, lr=0.1, damping=0.0, inverse="eigh", tol=1e-2, fisher_type="type-2")
    initial = model.fc1.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        losses = []
        for _ in range(5):
            stats = train_step(kmod, opt, x, y)
            assert stats["skipped"] is None
            losses.append(stats["loss"])
    assert_finite(model, opt)
    assert losses[-1] < losses[0]
    # the directions the inputs never span ([0, 0, 1] and [1, -1, 0]) are left alone
    weight = model.fc1.weight.detach()
    torch.testing.assert_close(weight[:, 2], initial[:, 2], rtol=0, atol=1e-6)
    torch.testing.assert_close(weight[:, 0] - weight[:, 1], initial[:, 0] - initial[:, 1], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# batch size 1 and empty batches


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical", "forward-only"])
def test_batch_of_one_trains(fisher_type, kfac_approx):
    torch.manual_seed(0)
    model = SmallCNN()
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 2, 5, 5, generator=generator), torch.tensor([1])
    kmod, opt = make(model, x, lr=0.2, fisher_type=fisher_type, kfac_approx=kfac_approx, momentum=0.5)
    losses = [train_step(kmod, opt, x, y)["loss"] for _ in range(8)]
    assert_finite(model, opt)
    assert losses[-1] < 0.5 * losses[0], losses
    factors = opt.preconditioner.factors
    assert factors["conv"]["A"].shape == (1, 2 * 9 + 1, 2 * 9 + 1)
    assert factors["conv"]["B"].shape == (1, 4, 4)


def test_empty_batch_step_is_skipped_and_state_kept():
    """An empty batch gives a NaN mean loss and zero gradients: the step is skipped."""
    torch.manual_seed(0)
    model = MLP()
    x, y = batch(8)
    kmod, opt = make(model, x, momentum=0.9)
    train_step(kmod, opt, x, y)
    before = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="empty batch"):
        stats = train_step(kmod, opt, x[:0], y[:0])
    assert stats["skipped"] == "empty batch"
    assert_same(before, snapshot(model, opt))
    assert train_step(kmod, opt, x, y)["skipped"] is None
    assert_finite(model, opt)


def test_empty_batch_in_the_preconditioner_raises_value_error():
    torch.manual_seed(0)
    model = MLP()
    x, y = batch(8)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    pre = fxkfac.KFACPreconditioner(kmod, LOSS)
    out, cap = kmod(x[:0])
    LOSS(out, y[:0]).backward()
    with pytest.raises(ValueError, match="batch is empty"):
        pre.step(cap)
    assert pre.steps == 0 and not pre.factors and not pre.inverses


# ---------------------------------------------------------------------------------------------
# float16 / bfloat16 models: factors accumulated in float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_factors_accumulate_in_float32(dtype):
    """``Σ x xᵀ`` of 64 inputs of size ~300 exceeds float16's range (65504), and summing in
    bfloat16 keeps 8 bits; the float32 factors match a float64 reference of the same inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    generator = torch.Generator().manual_seed(4)
    x = (300 * torch.randn(64, 4, generator=generator)).to(dtype)
    y = torch.randn(64, 3, generator=generator).to(dtype)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    _, cap = kmod(x)
    factors = cap.factors(nn.MSELoss(), y, fisher_type="type-2")
    for A, B in factors.values():
        assert A.dtype == B.dtype == torch.float32
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
    x_tilde = torch.cat([x.double(), torch.ones(64, 1, dtype=torch.float64)], 1)
    R = 2 / (64 * 3)
    torch.testing.assert_close(factors["0"][0].double(), R * x_tilde.T @ x_tilde, rtol=1e-5, atol=0)
    # MSE: the last layer's B is the identity, exactly
    torch.testing.assert_close(factors["2"][1], torch.eye(3), rtol=0, atol=0)
    # the first layer's B is close to that of a float64 copy of the same model
    model64 = copy.deepcopy(model).double()
    _, cap64 = fxkfac.compile(model64, example_inputs=(x.double(),))(x.double())
    B64 = cap64.factors(nn.MSELoss(), y.double(), fisher_type="type-2")["0"][1]
    torch.testing.assert_close(factors["0"][1].double(), B64, rtol=0.05, atol=1e-3 * float(B64.abs().max()))


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_trains(dtype, fisher_type):
    torch.manual_seed(0)
    model = MLP(width=8).to(dtype)
    x, y = batch(32)
    x = x.to(dtype)
    kmod, opt = make(model, x, lr=0.3, momentum=0.5, fisher_type=fisher_type)
    losses = []
    for _ in range(15):
        out, cap = kmod(x)
        loss = LOSS(out.float(), y)
        opt.zero_grad()
        loss.backward()
        assert opt.step(cap)["skipped"] is None
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == dtype for p in model.parameters())
    for factors in opt.preconditioner.factors.values():
        assert all(f.dtype == torch.float32 for f in factors.values())
    assert_finite(model, opt)


# ---------------------------------------------------------------------------------------------
# parameters on another device or dtype than the inputs


def test_inputs_of_another_dtype_name_both_dtypes_and_the_fix():
    model = MLP()
    x, _ = batch(4)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    with pytest.raises(fxkfac.InputMismatchError) as info:
        kmod(x.double())
    message = str(info.value)
    assert "torch.float64" in message and "torch.float32" in message, message
    assert "x.to(torch.float32)" in message and "model.to(torch.float64)" in message, message
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, fxkfac.FxKfacError)


def test_parameters_on_the_meta_device_are_named():
    model = MLP().to("meta")
    x, _ = batch(4)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    with pytest.raises(fxkfac.InputMismatchError, match=r"'meta' device.*to_empty"):
        kmod(x)


def test_inputs_on_another_device_are_named():
    model = MLP()
    x, _ = batch(4)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    with pytest.raises(fxkfac.InputMismatchError, match=r"inputs are on meta.*parameters are on cpu"):
        kmod(x.to("meta"))


def test_a_model_that_casts_its_inputs_is_not_second_guessed():
    class Casting(MLP):
        def forward(self, x):
            return super().forward(x.to(self.fc1.weight.dtype))

    model = Casting()
    x, _ = batch(4)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    out, _ = kmod(x.double())
    torch.testing.assert_close(out, model(x))


def test_an_unrelated_forward_error_is_not_relabelled():
    class Broken(MLP):
        def forward(self, x):
            return super().forward(x)[:, :, None] @ torch.ones(2, 2)

    x, _ = batch(4)
    kmod = fxkfac.compile(Broken(), example_inputs=(x,))
    with pytest.raises(RuntimeError) as info:
        kmod(x)
    assert not isinstance(info.value, fxkfac.FxKfacError)


def test_a_shape_error_of_a_casting_model_is_not_blamed_on_the_dtype():
    class Casting(MLP):
        def forward(self, x):
            return super().forward(x.to(self.fc1.weight.dtype))

    kmod = fxkfac.compile(Casting())
    with pytest.raises(RuntimeError, match="cannot be multiplied") as info:
        kmod(torch.randn(2, 5, dtype=torch.float64))  # wrong feature size, float64 inputs
    assert not isinstance(info.value, fxkfac.InputMismatchError)


# ---------------------------------------------------------------------------------------------
# unsupported loss and steps without a capture, in the optimizer


@pytest.mark.parametrize(
    "loss_func",
    [nn.L1Loss(), nn.MSELoss(reduction="none"), nn.functional.cross_entropy],
    ids=["l1", "reduction-none", "function"],
)
@pytest.mark.parametrize("build", ["KFAC", "KFACPreconditioner"])
def test_optimizer_rejects_an_unsupported_loss_when_built(loss_func, build):
    x, _ = batch(4)
    kmod = fxkfac.compile(MLP(), example_inputs=(x,))
    with pytest.raises(fxkfac.UnsupportedLossError):
        getattr(fxkfac, build)(kmod, loss_func)


def test_step_before_any_capture_raises_and_changes_nothing():
    torch.manual_seed(0)
    model = MLP()
    x, y = batch(8)
    kmod, opt = make(model, x, momentum=0.9)
    before = snapshot(model, opt)
    with pytest.raises(fxkfac.CaptureError, match="needs the capture"):
        opt.step()
    assert_same(before, snapshot(model, opt))
    out, cap = kmod(x)
    LOSS(out, y).backward()
    with pytest.raises(fxkfac.CaptureError, match=r"opt.step\(cap\)"):
        opt.step()  # a backward happened, but the capture was not passed
    assert_same(before, snapshot(model, opt))
    assert opt.step(cap)["skipped"] is None


# ---------------------------------------------------------------------------------------------
# determinism


def test_fixed_seed_gives_an_identical_run():
    """MC sampling draws from the optimizer's own generator (``seed=``): other code consuming
    the global RNG between steps does not change the run; another seed does."""
    data = [batch(16, seed=s) for s in range(6)]

    def run(seed: int, disturb: bool) -> dict[str, Tensor]:
        torch.manual_seed(0)
        model = MLP()
        kmod, opt = make(model, data[0][0], fisher_type="mc", seed=seed, momentum=0.9, inverse_every=2)
        for i, (x, y) in enumerate(data):
            if disturb:
                torch.randn(i + 1)  # e.g. dropout or data augmentation elsewhere
            train_step(kmod, opt, x, y)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    first, disturbed, other_seed = run(0, False), run(0, True), run(1, False)
    for name, p in first.items():
        assert torch.equal(p, disturbed[name]), name
    assert any(not torch.equal(p, other_seed[name]) for name, p in first.items())


def test_adaptive_damping_does_not_move_after_a_skipped_update():
    """A step skipped for a non-finite update takes no step: the next loss change says nothing."""
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    kmod = fxkfac.compile(model, example_inputs=(x,))
    opt = fxkfac.KFAC(kmod, LOSS, lr=0.1, damping=1e-2, adaptive_damping=True, fisher_type="type-2")

    def step(lr: float) -> dict:
        opt.param_groups[0]["lr"] = lr
        out, cap = kmod(x)
        loss = LOSS(out, y)
        opt.zero_grad()
        loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return opt.step(cap, loss=loss)

    step(0.1), step(0.1)
    assert step(math.inf)["skipped"] == "non-finite update"
    damping = opt.preconditioner.damping
    assert step(0.1)["skipped"] is None
    assert opt.preconditioner.damping == damping
