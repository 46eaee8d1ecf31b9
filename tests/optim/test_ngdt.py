"""NGD-T (seed 001) against a hand computation.

Deep linear regression, ``inverse='eigh'`` with a relative tolerance, type-2 factors. The
first layer sees ``N = 4 < D_in = 6`` data, so its input factor ``A`` is rank deficient, and
``B = W₂ᵀW₂`` (3×3 from a 2-output layer) too: the pseudo-inverse discards the eigen-direction
pairs with ``b_i a_j ≤ tol · max``. The inverses are computed on step 1 and reused on step 2
(``inverse_every=2``), so the step-2 gradient (another batch, other parameters) has a
component in the discarded directions. By hand, per layer, with ``A = Q_A diag(a) Q_Aᵀ``,
``B = Q_B diag(b) Q_Bᵀ`` of the step-1 factors and ``M = Q_Bᵀ g Q_A``::

    g_nat = Q_B [M ⊙ kept / (b aᵀ + λ)] Q_Aᵀ        r_proj = Q_B [M ⊙ ¬kept] Q_Aᵀ
    ΔF = Σ_l ⟨g_l, g_nat,l⟩     η = clip(η₀ Q / (ΔF + ε), η_min, η_max)     Q_pred = ½ η² ΔF
    θ ← θ − η g_nat − null_ratio · η · r,   r = r_proj or g − g_nat (``'residual'``)
"""

from __future__ import annotations

import pytest
import torch
from factors.references import assert_matrix_close
from torch import nn

import fxkfac

from .helpers import canonical, canonical_change, compiled_copy, linear_layers, loss_gradient, parameters_of

N, D_IN, D_HIDDEN, D_OUT = 4, 6, 3, 2
DAMPING, TOL = 1e-3, 1e-6


def model_and_data():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.Linear(D_HIDDEN, D_OUT))
    generator = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(N, D_IN, generator=generator), torch.randn(N, D_OUT, generator=generator))
        for _ in range(2)
    ]
    return model, data


def hand_step(factors, gradients, regulator: fxkfac.NGDT):
    """Everything NGD-T computes, from explicit factors ``{layer: (A, B)}`` and gradients."""
    naturals, nulls, discarded = {}, {}, {}
    for name, g in gradients.items():
        A, B = factors[name]
        a, QA = torch.linalg.eigh(A)
        b, QB = torch.linalg.eigh(B)
        a, b = a.clamp_min(0), b.clamp_min(0)
        product = b[:, None] * a[None, :]
        kept = product > TOL * product.max()
        rotated = QB.T @ g @ QA
        naturals[name] = QB @ torch.where(kept, rotated / (product + DAMPING), 0.0) @ QA.T
        nulls[name] = QB @ torch.where(kept, 0.0, rotated) @ QA.T
        discarded[name] = int((~kept).sum())
    delta_f = sum(float((gradients[n] * naturals[n]).sum()) for n in gradients)
    eta = regulator.eta0 * regulator.q_budget / (delta_f + regulator.eps)
    eta = min(max(eta, regulator.eta_min), regulator.eta_max)
    if regulator.null_space == "residual":
        nulls = {n: gradients[n] - naturals[n] for n in gradients}
    updates = {n: eta * naturals[n] + regulator.null_ratio * eta * nulls[n] for n in gradients}
    return {
        "delta_f": delta_f,
        "eta": eta,
        "q_pred": 0.5 * eta**2 * delta_f,
        "naturals": naturals,
        "nulls": nulls,
        "updates": updates,
        "discarded": discarded,
    }


def run_two_steps(regulator: fxkfac.NGDT):
    """Two NGD-T steps; returns (hand computation, stats, parameter change, gradients) per step."""
    model, data = model_and_data()
    layers = linear_layers(model)
    loss_func = nn.MSELoss()
    kmod = fxkfac.compile(model, example_inputs=(data[0][0],))
    opt = fxkfac.KFAC(
        kmod,
        loss_func=loss_func,
        lr=123.0,  # ignored: the regulator sets the step size
        damping=DAMPING,
        regulator=regulator,
        fisher_type="type-2",
        inverse="eigh",
        tol=TOL,
        factor_decay=0.0,
        inverse_every=2,
    )
    results = []
    factors = None
    for step, (x, y) in enumerate(data):
        if step == 0:  # the inverses of both steps come from the step-1 factors
            _, kref = compiled_copy(model, x)
            factors = kref(x)[1].factors(loss_func, y, fisher_type="type-2")
        grads = loss_gradient(model, x, y, loss_func)
        gradients = {name: canonical(grads, layer) for name, layer in layers.items()}
        hand = hand_step(factors, gradients, regulator)
        before = parameters_of(model)
        out, cap = kmod(x)
        loss = loss_func(out, y)
        opt.zero_grad()
        loss.backward()
        stats = opt.step(cap, loss=loss)
        after = parameters_of(model)
        change = {name: canonical_change(before, after, layer) for name, layer in layers.items()}
        results.append((hand, stats, change, gradients))
    return results


def check_step(hand, stats, change):
    assert stats["delta_f"] == pytest.approx(hand["delta_f"], rel=1e-8)
    assert stats["lr"] == pytest.approx(hand["eta"], rel=1e-8)
    assert stats["q_pred"] == pytest.approx(hand["q_pred"], rel=1e-8)
    for name, update in hand["updates"].items():
        assert_matrix_close(change[name], update, rtol=1e-7, atol_scale=1e-8, name=name)
        assert stats["step_norms"][name] == pytest.approx(float(update.norm()), rel=1e-7)


def test_projection_matches_hand_computation():
    regulator = fxkfac.NGDT(q_budget=1e-2, eta0=1.0, eta_min=1e-9, eta_max=1e9, null_ratio=0.5, eps=1e-8)
    results = run_two_steps(regulator)
    for step, (hand, stats, change, gradients) in enumerate(results):
        assert regulator.eta_min < hand["eta"] < regulator.eta_max, "clipping must not be active here"
        # the pseudo-inverse really discards directions (rank-deficient A and B of layer 0)
        assert hand["discarded"]["0"] > 0
        check_step(hand, stats, change)
        if step == 1:
            # the step-2 gradient has a sizeable component in the discarded directions ...
            r = hand["nulls"]["0"]
            assert r.norm() > 0.05 * gradients["0"].norm()
            # ... that is orthogonal to what the pseudo-inverse keeps, and not the residual
            assert float((r * hand["naturals"]["0"]).sum()) == pytest.approx(
                0.0, abs=1e-9 * float(r.norm()) ** 2
            )
            residual = gradients["0"] - hand["naturals"]["0"]
            assert not torch.allclose(r, residual, rtol=1e-2)


def test_residual_matches_hand_computation():
    regulator = fxkfac.NGDT(
        q_budget=1e-2, eta0=2.0, eta_min=1e-9, eta_max=1e9, null_ratio=0.3, eps=1e-8, null_space="residual"
    )
    for hand, stats, change, _ in run_two_steps(regulator):
        assert regulator.eta_min < hand["eta"] < regulator.eta_max
        check_step(hand, stats, change)


@pytest.mark.parametrize("null_space", ["projection", "residual"])
def test_step_size_clipped_to_eta_max(null_space):
    regulator = fxkfac.NGDT(
        q_budget=1e3, eta0=1.0, eta_min=1e-6, eta_max=0.05, null_ratio=0.2, null_space=null_space
    )
    for hand, stats, change, _ in run_two_steps(regulator):
        assert hand["eta"] == 0.05
        assert 1e3 / hand["delta_f"] > 0.05  # unclipped it would be larger
        check_step(hand, stats, change)


@pytest.mark.parametrize("null_space", ["projection", "residual"])
def test_step_size_clipped_to_eta_min(null_space):
    regulator = fxkfac.NGDT(
        q_budget=1e-9, eta0=1.0, eta_min=1e-3, eta_max=1.0, null_ratio=0.2, null_space=null_space
    )
    for hand, stats, change, _ in run_two_steps(regulator):
        assert hand["eta"] == 1e-3
        assert 1e-9 / hand["delta_f"] < 1e-3  # unclipped it would be smaller
        check_step(hand, stats, change)
