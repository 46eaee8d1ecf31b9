"""EKFAC (``inverse='ekfac'``; George et al., 2018) against exact float64 references.

* The corrected eigenvalues equal ``diag((Q_B ⊗ Q_A)ᵀ C (Q_B ⊗ Q_A))`` with ``C`` the exact
  per-layer GGN (type-2) or empirical Fisher computed by autodiff, or, literally,
  ``R Σ_n (Q_Bᵀ G_n Q_A)²`` with per-example gradients ``G_n`` from ``torch.func``
  (``vmap(grad)``) — for sequences (weight sharing), grouped convolutions and diagonal factors;
  and ``Q`` is an eigenbasis of the reference factors ``A``, ``B``.
* Where EKFAC is exact — one datum (``C = B ⊗ A``), or inputs orthogonal to each other with
  one output (``C`` diagonal in ``Q_A``, where K-FAC is *not* exact) — the damped step equals
  ``(C + λI)⁻¹ g``.
* The damped step equals ``(Q_B ⊗ Q_A) diag(1 / (s + λ)) (Q_B ⊗ Q_A)ᵀ g`` built by hand, and
  ``s`` follows the running-average rule across basis recomputations.
* Training lowers the loss; a checkpoint continues identically.
"""

from __future__ import annotations

import pytest
import torch
from factors.references import assert_matrix_close, criterion, ef_block, ggn_block, module_fn
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import fxkfac
from fxkfac.precond import ekfac as ekfac_module
from fxkfac.precond.ekfac import corrected_eigenvalues
from fxkfac.precond.preconditioner import KFACPreconditioner

from .helpers import canonical, loss_gradient
from .test_checkpoint import BASE, batches, checkpoint, make, train

# ---------------------------------------------------------------------------------------------
# models: (model, layers {name: (weight, bias, layout)}, input, targets, loss)


class Sequence(nn.Module):
    """A linear layer shared over 3 positions (weight sharing), then a classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 5)
        self.head = nn.Linear(15, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).flatten(1))


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class Tied(nn.Module):
    """One weight used twice in a row (both uses are weight-sharing positions of one layer)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def case(name: str, n: int = 7):
    generator = torch.Generator().manual_seed(4)
    torch.manual_seed(2)
    if name == "mlp":
        model, x = mlp(), torch.randn(n, 4, generator=generator)
        layers = {"0": ("0.weight", "0.bias", "out_in"), "2": ("2.weight", "2.bias", "out_in")}
    elif name == "tied":
        model, x = Tied(), torch.randn(n, 4, generator=generator)
        layers = {
            "shared": ("shared.weight", "shared.bias", "out_in"),
            "head": ("head.weight", "head.bias", "out_in"),
        }
    elif name == "sequence":
        model, x = Sequence(), torch.randn(n, 3, 4, generator=generator)
        layers = {
            "embed": ("embed.weight", "embed.bias", "out_in"),
            "head": ("head.weight", "head.bias", "out_in"),
        }
    else:
        model, x = GroupedConv(), torch.randn(n, 4, 3, 3, generator=generator)
        layers = {"conv": ("conv.weight", "conv.bias", "out_in"), "fc": ("fc.weight", "fc.bias", "out_in")}
    if name == "sequence":
        loss_func, y = nn.MSELoss(), torch.randn(n, 3, generator=generator)
    else:
        loss_func, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (n,), generator=generator)
    return model, layers, x, y, loss_func


def preconditioner_step(model, x, y, loss_func, **options) -> tuple[KFACPreconditioner, dict[str, Tensor]]:
    """One ``KFACPreconditioner.step``; returns it and the raw canonical gradients."""
    kmod = fxkfac.compile(model, example_inputs=(x,))
    settings = {"inverse": "ekfac", "factor_decay": 0.0, "inverse_every": 1, "damping": 0.1, **options}
    pre = KFACPreconditioner(kmod, loss_func, **settings)
    out, cap = kmod(x)
    loss_func(out, y).backward()
    raw = pre.gradient_matrices()
    pre.step(cap)
    return pre, raw


def kron_basis(pre: KFACPreconditioner, name: str, group: int = 0) -> Tensor:
    """``Q_B ⊗ Q_A`` of one group (identity for a diagonal side)."""
    t = pre.inverses[name].tensors
    QA = t["QA"][group] if "QA" in t else torch.eye(t["a"].shape[-1])
    QB = t["QB"][group] if "QB" in t else torch.eye(t["b"].shape[-1])
    return torch.kron(QB, QA)


def projected_diagonal(curvature: Tensor, pre: KFACPreconditioner, name: str) -> Tensor:
    """``[G, D_B, D_A]``: ``diag(Qᵀ C_g Q)`` of each group's diagonal block of ``C``."""
    s = pre.inverses[name].tensors["s"]
    groups, dim_B, dim_A = s.shape
    size = dim_B * dim_A
    blocks = []
    for g in range(groups):
        block = curvature[g * size : (g + 1) * size, g * size : (g + 1) * size]
        Q = kron_basis(pre, name, g)
        blocks.append((Q.T @ block @ Q).diagonal().reshape(dim_B, dim_A))
    return torch.stack(blocks)


def per_example_gradients(model, layer, x, y, loss_func) -> Tensor:
    """``([N, D_out, D_A], R)``: ``∇_W̃ c(f(x_n), y_n)`` per datum by ``vmap(grad)``."""
    crit = criterion(loss_func, model(x))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def per_datum(p, xn, yn):
        return crit.c(functional_call(model, p, (xn[None],))[0], yn)

    grads = vmap(grad(per_datum), in_dims=(None, 0, 0))(params, x, y)
    return vmap(lambda g: canonical(g, layer))(grads), crit.R


# ---------------------------------------------------------------------------------------------
# (1) corrected eigenvalues against exact references


@pytest.mark.parametrize("name", ["mlp", "sequence", "tied", "grouped-conv"])
def test_corrected_eigenvalues_equal_projected_ggn(name):
    model, layers, x, y, loss_func = case(name)
    pre, _ = preconditioner_step(model, x, y, loss_func, fisher_type="type-2")
    fn, params = module_fn(model)
    reference_factors = fxkfac.compile(model, example_inputs=(x,))(x)[1].factors(
        loss_func, y, fisher_type="type-2"
    )
    for layer_name, (weight, bias, layout) in layers.items():
        ggn = ggn_block(fn, params, (x,), y, loss_func, weight, bias, layout=layout)
        s = pre.inverses[layer_name].tensors["s"]
        expected = projected_diagonal(ggn, pre, layer_name)
        assert expected.abs().max() > 1e-4
        assert_matrix_close(s, expected, rtol=1e-9, atol_scale=1e-10, name=layer_name)
        # the basis is an eigenbasis of the reference factors
        A, B = reference_factors[layer_name]
        A, B = (A, B) if A.ndim == 3 else (A[None], B[None])
        t = pre.inverses[layer_name].tensors
        for factor, Q in ((A, t["QA"]), (B, t["QB"])):
            rotated = Q.mT @ factor @ Q
            off_diagonal = rotated - torch.diag_embed(rotated.diagonal(dim1=-2, dim2=-1))
            assert off_diagonal.abs().max() < 1e-10 * factor.abs().max()


@pytest.mark.parametrize("name", ["mlp", "sequence", "tied", "grouped-conv"])
def test_corrected_eigenvalues_equal_per_example_gradients(name):
    """Empirical Fisher: ``s = R Σ_n (Q_Bᵀ G_n Q_A)²`` with ``G_n`` from ``vmap(grad)``."""
    model, layers, x, y, loss_func = case(name)
    pre, _ = preconditioner_step(model, x, y, loss_func, fisher_type="empirical")
    for layer_name, layer in layers.items():
        G, R = per_example_gradients(model, layer, x, y, loss_func)
        t = pre.inverses[layer_name].tensors
        groups = t["s"].shape[0]
        G = G.reshape(G.shape[0], groups, -1, G.shape[-1])  # [N, groups, D_B, D_A]
        rotated = t["QB"].mT @ G @ t["QA"]
        expected = R * rotated.square().sum(0)
        assert_matrix_close(t["s"], expected, rtol=1e-9, atol_scale=1e-10, name=layer_name)
        # and the same as the empirical Fisher block projected into the basis
        fn, params = module_fn(model)
        ef = ef_block(fn, params, (x,), y, loss_func, layer[0], layer[1])
        assert_matrix_close(t["s"], projected_diagonal(ef, pre, layer_name), rtol=1e-9, atol_scale=1e-10)


def test_diagonal_factor_uses_the_identity_basis():
    """A factor kept diagonal: the correction is computed in that side's coordinates."""
    model, layers, x, y, loss_func = case("mlp")
    with pytest.warns(UserWarning, match="max_factor_dim"):
        pre, _ = preconditioner_step(model, x, y, loss_func, fisher_type="empirical", max_factor_dim=4)
    t = pre.inverses["0"].tensors  # A is 5×5 > 4: diagonal; B is 5×5: diagonal too
    assert "QA" not in t and "QB" not in t
    G, R = per_example_gradients(model, layers["0"], x, y, loss_func)
    assert_matrix_close(t["s"][0], R * G.square().sum(0), rtol=1e-9, atol_scale=1e-10)
    t = pre.inverses["2"].tensors  # A diagonal (6 > 4), B = 3×3 dense
    assert "QA" not in t and "QB" in t
    G, R = per_example_gradients(model, layers["2"], x, y, loss_func)
    expected = R * (t["QB"][0].T @ G).square().sum(0)
    assert_matrix_close(t["s"][0], expected, rtol=1e-9, atol_scale=1e-10)


@pytest.mark.parametrize("positions", [1, 2, 6])
@pytest.mark.parametrize("chunk_elements", [1, 1 << 24])
def test_corrected_eigenvalues_paths_agree(positions, chunk_elements):
    """Rank-one GEMM, pairwise form and chunked per-example matrices against the definition."""
    generator = torch.Generator().manual_seed(0)
    k, n, groups, dim_B, dim_A = 3, 5, 2, 4, 7
    inputs = torch.randn(n, positions, groups, dim_A, generator=generator)
    grads = torch.randn(k, n, positions, groups, dim_B, generator=generator)
    expected = torch.einsum("knsgi,nsgj->kngij", grads, inputs).square().sum((0, 1))
    actual = corrected_eigenvalues(inputs, grads, chunk_elements)
    assert_matrix_close(actual, expected, rtol=1e-12, atol_scale=1e-13)
    # force the pairwise form by making the per-example matrices look expensive
    wide = torch.randn(k, n, positions, groups, 40, generator=generator)
    expected = torch.einsum("knsgi,nsgj->kngij", wide, inputs).square().sum((0, 1))
    assert_matrix_close(corrected_eigenvalues(inputs, wide, chunk_elements), expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# (2) exact cases


def exact_damped_direction(model, layer, x, y, loss_func, damping) -> Tensor:
    fn, params = module_fn(model)
    ggn = ggn_block(fn, params, (x,), y, loss_func, layer[0], layer[1], layout=layer[2])
    g = canonical(loss_gradient(model, x, y, loss_func), layer)
    eye = torch.eye(ggn.shape[0])
    return torch.linalg.solve(ggn + damping * eye, g.flatten()).reshape(g.shape)


def test_single_datum_step_is_the_exact_damped_natural_gradient():
    """One datum: ``C = B ⊗ A`` per layer (rank-one ``G_c``), so ``s = b aᵀ`` and the EKFAC
    step is ``(C + λI)⁻¹ g`` for every layer (3 classes: 3 backpropagated vectors)."""
    model, layers, x, y, loss_func = case("mlp", n=1)
    pre, _ = preconditioner_step(model, x, y, loss_func, fisher_type="type-2", damping=1e-2)
    for name, layer in layers.items():
        t = pre.inverses[name].tensors
        assert_matrix_close(t["s"], t["b"][:, :, None] * t["a"][:, None, :], rtol=1e-9, atol_scale=1e-10)
        expected = exact_damped_direction(model, layer, x, y, loss_func, 1e-2)
        actual = canonical({n: p.grad for n, p in model.named_parameters()}, layer)
        assert_matrix_close(actual, expected, rtol=1e-8, atol_scale=1e-10, name=name)


def test_orthogonal_inputs_ekfac_exact_where_kfac_is_not():
    """One output and mutually orthogonal inputs of distinct norms: ``C = R Σ_n h_n x_n x_nᵀ``
    is diagonal in ``Q_A`` (``x_n / ‖x_n‖``), so EKFAC is exact; K-FAC replaces the per-datum
    curvatures ``h_n`` by their mean and is not."""
    x = torch.diag(torch.tensor([1.0, 2.0, 3.0]))[:, :] @ torch.linalg.qr(torch.randn(3, 3))[0]
    x = torch.cat([x, torch.zeros(3, 1)], dim=1)  # [3, 4]: three orthogonal rows
    y = torch.tensor([[1.0], [0.0], [1.0]])
    loss_func = nn.BCEWithLogitsLoss()
    directions = {}
    for inverse in ("ekfac", "eigh"):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(4, 1, bias=False))
        with torch.no_grad():
            model[0].weight.mul_(4.0)  # distinct σ(1 − σ) per datum
        preconditioner_step(model, x, y, loss_func, fisher_type="type-2", damping=1e-3, inverse=inverse)
        directions[inverse] = model[0].weight.grad.clone()
    expected = exact_damped_direction(model, ("0.weight", None, "out_in"), x, y, loss_func, 1e-3)
    assert_matrix_close(directions["ekfac"], expected, rtol=1e-8, atol_scale=1e-10)
    assert (directions["eigh"] - expected).abs().max() > 1e-2 * expected.abs().max()


# ---------------------------------------------------------------------------------------------
# (3) the damped step by hand and the running average


def by_hand(pre: KFACPreconditioner, name: str, gradient: Tensor, damping: float) -> Tensor:
    """``(Q_B ⊗ Q_A) diag(1 / (s + λ)) (Q_B ⊗ Q_A)ᵀ rvec(g)`` (one group)."""
    Q = kron_basis(pre, name)
    s = pre.inverses[name].tensors["s"][0].flatten()
    return (Q @ ((Q.T @ gradient.flatten()) / (s + damping))).reshape(gradient.shape)


def test_damped_step_and_running_average_by_hand():
    """Empirical Fisher (deterministic), ``factor_decay=0.6``, basis every 3 steps:
    step 0 sets ``s``; steps 1, 2 average in the old basis; step 3 recomputes the basis and
    restarts the average from its K-FAC eigenvalues ``b aᵀ``; every step's direction is the
    hand-built ``Q diag(1/(s+λ)) Qᵀ g``."""
    decay, damping = 0.6, 0.05
    torch.manual_seed(2)
    model, layers = mlp(), {"0": ("0.weight", "0.bias", "out_in"), "2": ("2.weight", "2.bias", "out_in")}
    data = [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(4)]
    loss_func = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(model, example_inputs=(data[0][0],))
    options = {"inverse": "ekfac", "fisher_type": "empirical", "factor_decay": decay, "inverse_every": 3}
    pre = KFACPreconditioner(kmod, loss_func, damping=damping, **options)
    previous: dict[str, Tensor] = {}
    for step, (x, y) in enumerate(data):
        out, cap = kmod(x)
        model.zero_grad()
        loss_func(out, y).backward()
        raw = {
            name: canonical({n: p.grad for n, p in model.named_parameters()}, layer)
            for name, layer in layers.items()
        }
        pre.step(cap)
        for name, layer in layers.items():
            t = pre.inverses[name].tensors
            G, R = per_example_gradients(model, layer, x, y, loss_func)
            new = R * (t["QB"][0].T @ G @ t["QA"][0]).square().sum(0)
            if step == 0:
                expected = new
            elif step == 3:  # new basis: restart from b aᵀ
                expected = decay * t["b"][0][:, None] * t["a"][0][None, :] + (1 - decay) * new
            else:
                expected = decay * previous[name] + (1 - decay) * new
            assert_matrix_close(t["s"][0], expected, rtol=1e-9, atol_scale=1e-10, name=f"{name}@{step}")
            previous[name] = t["s"][0].clone()
            actual = canonical({n: p.grad for n, p in model.named_parameters()}, layer)
            assert_matrix_close(actual, by_hand(pre, name, raw[name], damping), rtol=1e-9, atol_scale=1e-10)
        with torch.no_grad():  # move the weights so the steps differ
            for p in model.parameters():
                p.sub_(0.1 * p.grad)


# ---------------------------------------------------------------------------------------------
# (4) training, (5) checkpoints, failures


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
def test_training_lowers_the_loss(fisher_type):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=generator)
    y = (x @ torch.randn(4, 3, generator=generator)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    kmod = fxkfac.compile(model, example_inputs=(x,))
    loss_func = nn.CrossEntropyLoss()
    opt = fxkfac.KFAC(
        kmod, loss_func, lr=0.2, damping=1e-2, inverse="ekfac", fisher_type=fisher_type, inverse_every=5
    )
    losses = []
    for _ in range(30):
        out, cap = kmod(x)
        loss = loss_func(out, y)
        opt.zero_grad()
        loss.backward()
        assert opt.step(cap)["skipped"] is None
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0], losses


def test_grouped_conv_trains():
    model, _, x, y, loss_func = case("grouped-conv", n=16)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    opt = fxkfac.KFAC(kmod, loss_func, lr=0.1, damping=1e-2, inverse="ekfac", inverse_every=3)
    losses = []
    for _ in range(12):
        out, cap = kmod(x)
        loss = loss_func(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step(cap)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_checkpoint_continues_identically():
    options = {**BASE, "inverse": "ekfac", "momentum": 0.5}
    first, second = batches(4, seed=1), batches(5, seed=2)
    model, kmod, opt = make(0, {**options, "seed": 5})
    train(kmod, opt, first)
    saved = checkpoint(model, opt)
    train(kmod, opt, second)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}

    def restore(state):
        restored, kmod2, opt2 = make(99, {**options, "seed": 77})
        restored.load_state_dict(state["model"])
        opt2.load_state_dict(state["optimizer"])
        return restored, kmod2, opt2

    restored, kmod2, opt2 = restore(torch.load(saved))
    assert opt2.preconditioner.inverses["fc1"].method == "ekfac"
    train(kmod2, opt2, second)
    for name, p in restored.named_parameters():
        assert torch.equal(p, expected[name]), name

    # control: the corrected eigenvalues are state that matters
    saved.seek(0)
    restored, kmod2, opt2 = restore(torch.load(saved))
    for inverse in opt2.preconditioner.inverses.values():
        t = inverse.tensors
        t["s"] = t["b"][:, :, None] * t["a"][:, None, :]
    train(kmod2, opt2, second)
    assert not torch.equal(restored.fc1.weight, expected["fc1.weight"])


def test_non_finite_correction_keeps_the_last_good_eigenvalues(monkeypatch):
    model, _, x, y, loss_func = case("mlp")
    kmod = fxkfac.compile(model, example_inputs=(x,))
    pre = KFACPreconditioner(kmod, loss_func, inverse="ekfac", inverse_every=10, factor_decay=0.5)
    out, cap = kmod(x)
    loss_func(out, y).backward()
    pre.step(cap)
    good = {name: inv.tensors["s"].clone() for name, inv in pre.inverses.items()}
    real = ekfac_module.EigenvalueCorrection.result

    def broken(self, reduction, bases):
        return {name: value * float("nan") for name, value in real(self, reduction, bases).items()}

    monkeypatch.setattr(ekfac_module.EigenvalueCorrection, "result", broken)
    out, cap = kmod(x)
    model.zero_grad()
    loss_func(out, y).backward()
    with pytest.warns(RuntimeWarning, match="non-finite EKFAC eigenvalues"):
        stats = pre.step(cap)
    assert sorted(stats["skipped_layers"]) == ["0", "2"]
    for name, inverse in pre.inverses.items():
        assert torch.equal(inverse.tensors["s"], good[name])
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_invalid_combinations_are_rejected():
    model, _, x, _, loss_func = case("mlp")
    kmod = fxkfac.compile(model, example_inputs=(x,))
    with pytest.raises(ValueError, match="forward-only"):
        KFACPreconditioner(kmod, loss_func, inverse="ekfac", fisher_type="forward-only")
    with pytest.raises(ValueError, match="ekfac"):
        KFACPreconditioner(kmod, loss_func, inverse="ekfc")


def test_adaptive_damping_reaches_the_cached_ekfac_inverses():
    model, _, x, y, loss_func = case("mlp", n=16)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    opt = fxkfac.KFAC(kmod, loss_func, lr=0.5, inverse="ekfac", inverse_every=100, adaptive_damping=True)
    for _ in range(4):
        out, cap = kmod(x)
        loss = loss_func(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step(cap, loss=loss.detach())
    pre = opt.preconditioner
    assert pre.damping != 1e-3
    assert all(inverse.damping == pre.damping for inverse in pre.inverses.values())
