"""Peer cross-check: fxkfac's K-FAC factors against curvlinops' ``KFACLinearOperator``.

curvlinops (``pip install curvlinops-for-pytorch``) implements the same K-FAC family
independently, with module hooks: Fisher types ``'type-2'``, ``'mc'``, ``'empirical'``,
``'forward-only'`` and ``kfac_approx`` ``'expand'`` / ``'reduce'`` (Eschenhagen et al.,
2023). Its conventions, read from ``curvlinops/kfac.py`` (version 3.0.1):

* Factors: ``state_dict()["input_covariances"][layer]`` (A) and
  ``state_dict()["gradient_covariances"][layer]`` (B), keyed by module name. With
  ``separate_weight_and_bias=False`` A carries the bias as a trailing ones-feature, like ours,
  and the operator maps ``M = [W.reshape(D_out, -1) | b]`` to ``B M A``: ``kron(B, A)`` on
  ``rvec(W̃)``, our convention. The operator's own (dense) ordering is ``[W.flatten(), b]``
  per layer, layers in ``params`` order. Its default ``separate_weight_and_bias=True`` drops
  the weight-bias cross terms (tested below).
* Scale split: the peer normalizes ``A = Σ x̃x̃ᵀ / (N S)`` (expand) or ``Σ x̄x̄ᵀ / N`` (reduce)
  and keeps the rest of the loss scaling in B; we put the reduction factor ``R`` into A
  (tutorial Definition 23). So ``A_ours = α A_peer`` and ``B_ours = B_peer / α`` with
  ``α = R N S`` (expand) or ``α = R N`` (reduce); ``kron(B, A)`` agrees.
* Conventions where the peer differs (we follow the tutorial, seed 004):
  - empirical Fisher with ``MSELoss``: ours = ½ × peer (the peer squares the gradient of
    ``‖f − y‖²``; the tutorial's criterion is ``c = ½‖f − y‖²`` with ``R = 2`` (sum) or
    ``2 / (N dim Y)`` (mean), and ``EF = R Σ ∇c ∇cᵀ``);
  - ``'forward-only'``: B is the identity in both, so the scale split no longer cancels:
    ours = ``α`` × peer;
  - ``'type-2'`` with image-shaped outputs ``[N, C, H, W]``: the peer backpropagates one
    column of the Hessian square root per *class*, summed over all output positions (for
    MSE it even takes the last axis W as the feature axis), which adds cross-position terms
    that are not in the GGN; ours backpropagates one column per (class, position) and equals
    the exact autodiff reference ``J_zᵀ ∇²c J_z`` (diagonal position blocks for expand, all
    blocks summed for reduce).

Monte Carlo is compared exactly: with the same seed both libraries draw the same labels.
MSE: one ``randn`` over the prediction's shape; we backpropagate ``ε``, the peer the gradient
``−√2 ε`` of ``‖f − y‖²``, the same K-FAC after the scale split. Cross-entropy: one
``multinomial`` sample per row of the probabilities, the same labels with or without
replacement.
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from torch import Tensor, nn

import fxkfac

with warnings.catch_warnings():  # backpack (a curvlinops dependency) uses torch.jit.script
    warnings.simplefilter("ignore", FutureWarning)
    curvlinops = pytest.importorskip("curvlinops")

N = 8
SEED = 42
RTOL = 1e-6


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).double()


def _fcn() -> nn.Module:
    """Image-shaped outputs ``[N, 4, 6, 6]`` (segmentation / pixel regression)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).double()


MODELS = {"mlp": (_mlp, (6,)), "cnn": (_cnn, (3, 6, 6)), "fcn": (_fcn, (3, 6, 6))}


def _problem(model_name: str, loss_name: str, reduction: str, batch: int = N):
    build, shape = MODELS[model_name]
    model = build()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    if loss_name == "ce":
        loss_func = nn.CrossEntropyLoss(reduction=reduction)
        y = torch.randint(0, out.shape[1], (batch, *out.shape[2:]), generator=gen)
    else:
        loss_func = nn.MSELoss(reduction=reduction)
        y = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    return model, x, loss_func, y


def _reduction_factor(loss_func: nn.Module, out: Tensor) -> float:
    """``R`` of tutorial Examples 1–2 (independent of fxkfac's own implementation)."""
    mse = isinstance(loss_func, nn.MSELoss)
    scale = 2.0 if mse else 1.0
    if loss_func.reduction == "sum":
        return scale
    dim_y = out[0].numel() if mse else out[0, 0].numel()
    return scale / (out.shape[0] * dim_y)


def _layer_outputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    outputs: dict[str, Tensor] = {}

    def record(name, module, inputs, output):
        outputs[name] = output.detach()

    handles = [
        module.register_forward_hook(partial(record, name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return outputs


def _positions(model: nn.Module, x: Tensor) -> dict[str, int]:
    """Weight-sharing positions ``S`` per layer (1 for a linear layer on ``[N, D]``)."""
    return {
        name: z.shape[2:].numel() if isinstance(model.get_submodule(name), nn.Conv2d) else 1
        for name, z in _layer_outputs(model, x).items()
    }


def _alpha(loss_func, model, x, kfac_approx) -> dict[str, float]:
    """Scale split ``A_ours / A_peer`` per layer: ``R N S`` (expand) or ``R N`` (reduce)."""
    with torch.no_grad():
        R = _reduction_factor(loss_func, model(x))
    return {
        name: R * x.shape[0] * (s if kfac_approx == "expand" else 1)
        for name, s in _positions(model, x).items()
    }


def _ours(model, x, loss_func, y, fisher_type, kfac_approx):
    kmod = fxkfac.compile(model, example_inputs=(x,))
    _, capture = kmod(x)
    return capture.factors(
        loss_func,
        y,
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        generator=torch.Generator().manual_seed(SEED),
    )


def _peer(model, x, loss_func, y, fisher_type, kfac_approx, separate=False):
    peer = curvlinops.KFACLinearOperator(
        model,
        loss_func,
        list(model.parameters()),
        [(x, y)],
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        separate_weight_and_bias=separate,
        check_deterministic=False,
        seed=SEED,
        num_data=x.shape[0],
    )
    peer.compute_kronecker_factors()
    state = peer.state_dict()
    return peer, state["input_covariances"], state["gradient_covariances"]


def _dense_ours(model: nn.Module, factors, separate: bool = False) -> Tensor:
    """Block-diagonal ``kron(B, A)`` reordered to the peer's ``[W.flatten(), b]`` per layer."""
    blocks = []
    for name, _ in model.named_modules():
        if name not in factors:
            continue
        A, B = factors[name]
        d_out, d_in = B.shape[0], A.shape[0] - 1
        index = torch.arange(d_out * (d_in + 1)).reshape(d_out, d_in + 1)  # rvec(W̃)
        perm = torch.cat([index[:, :-1].flatten(), index[:, -1]])
        block = torch.kron(B, A)[perm][:, perm]
        if separate:
            w = d_out * d_in
            block[:w, w:] = 0
            block[w:, :w] = 0
        blocks.append(block)
    return torch.block_diag(*blocks)


def _dense_peer(peer) -> Tensor:
    return peer @ torch.eye(peer.shape[1], dtype=torch.float64)


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def _assert_close(actual: Tensor, expected: Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape, what
    assert _rel(actual, expected) <= RTOL, f"{what}: relative error {_rel(actual, expected):.2e}"


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_factors_match_peer(model_name, loss_name, reduction, fisher_type, kfac_approx):
    model, x, loss_func, y = _problem(model_name, loss_name, reduction)
    ours = _ours(model, x, loss_func, y, fisher_type, kfac_approx)
    peer, A_peer, B_peer = _peer(model, x, loss_func, y, fisher_type, kfac_approx)
    # The peer's empirical Fisher for MSE is twice the tutorial's (see
    # test_empirical_fisher_mse_is_half_of_peer_and_exact); everything else agrees exactly.
    kappa = 0.5 if (fisher_type == "empirical" and loss_name == "mse") else 1.0
    alpha = _alpha(loss_func, model, x, kfac_approx)
    assert set(ours) == set(A_peer) == set(B_peer)
    for name, (A, B) in ours.items():
        _assert_close(A, alpha[name] * A_peer[name], f"A of {name}")
        _assert_close(B, kappa * B_peer[name] / alpha[name], f"B of {name}")
        _assert_close(torch.kron(B, A), kappa * torch.kron(B_peer[name], A_peer[name]), f"kron {name}")
    # the full block-diagonal matrix in the peer's parameter ordering
    _assert_close(_dense_ours(model, ours), kappa * _dense_peer(peer), "dense K-FAC")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_fisher_mse_is_half_of_peer_and_exact(reduction):
    """EF with MSE: ours is the tutorial's ``R Σ ∇c ∇cᵀ``, c = ½‖f − y‖²; the peer's is 2×.

    With a single datum, K-FAC of a layer without weight sharing is exact for the EF
    (``∇_W̃ c = g x̃ᵀ``, so ``kron(ggᵀ, R x̃x̃ᵀ) = R rvec(∇c) rvec(∇c)ᵀ``), which gives an exact
    autodiff reference. The peer writes the loss as ``R' Σ ‖f − y‖²`` (R' = R / 2) and squares
    the gradient of that per-datum term: ``R' Σ ∇(2c) ∇(2c)ᵀ = 2 R Σ ∇c ∇cᵀ``. The tutorial
    (Example 1, Definition 21, Section 4.3) fixes c = ½‖f − y‖² = −log N(y | f, I) + const;
    with that likelihood ``E_y[∇c ∇cᵀ] = I = ∇²c``, so our EF and our type-2 / MC Fisher
    describe the same curvature. The peer's EF matches its type-2 Fisher in expectation only
    under the likelihood ``N(f, ½ I)`` (its MC sampler draws ``y = f + √½ ε``); type-2 and MC
    agree between the libraries because they do not depend on that choice, the EF squares
    the criterion's gradient and does.
    """
    model, x, loss_func, y = _problem("mlp", "mse", reduction, batch=1)
    ours = _ours(model, x, loss_func, y, "empirical", "expand")
    _, A_peer, B_peer = _peer(model, x, loss_func, y, "empirical", "expand")
    out = model(x)
    R = _reduction_factor(loss_func, out)
    criterion = 0.5 * (out - y).square().sum()
    torch.testing.assert_close(loss_func(out, y), R * criterion, rtol=1e-12, atol=0)
    for name, (A, B) in ours.items():
        layer = model.get_submodule(name)
        grad_w, grad_b = torch.autograd.grad(criterion, (layer.weight, layer.bias), retain_graph=True)
        g = torch.cat([grad_w, grad_b[:, None]], dim=1).flatten()  # rvec(∇_W̃ c)
        exact = R * torch.outer(g, g)
        _assert_close(torch.kron(B, A), exact, f"ours vs exact EF, {name}")
        _assert_close(torch.kron(B_peer[name], A_peer[name]), 2 * exact, f"peer vs 2 × EF, {name}")


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_forward_only_differs_by_the_scale_split(loss_name, kfac_approx):
    """Both use ``B = I``, so the split of ``R`` between A and B shows: ours = α × peer."""
    model, x, loss_func, y = _problem("cnn", loss_name, "mean")
    ours = _ours(model, x, loss_func, y, "forward-only", kfac_approx)
    _, A_peer, B_peer = _peer(model, x, loss_func, y, "forward-only", kfac_approx)
    alpha = _alpha(loss_func, model, x, kfac_approx)
    for name, (A, B) in ours.items():
        eye = torch.eye(B.shape[0], dtype=B.dtype)
        _assert_close(B, eye, f"B of {name}")
        _assert_close(B_peer[name], eye, f"peer B of {name}")
        _assert_close(A, alpha[name] * A_peer[name], f"A of {name}")


def test_peer_separate_weight_and_bias_drops_cross_terms():
    """The peer's default ``separate_weight_and_bias=True`` is ours without W–b blocks."""
    model, x, loss_func, y = _problem("cnn", "ce", "mean")
    ours = _ours(model, x, loss_func, y, "type-2", "expand")
    peer, _, _ = _peer(model, x, loss_func, y, "type-2", "expand", separate=True)
    _assert_close(_dense_ours(model, ours, separate=True), _dense_peer(peer), "dense K-FAC")


def _unit_vectors(like: Tensor) -> Tensor:
    """``[dim, *like.shape]``: ``e_k`` in every datum at once (per-datum flat index k)."""
    dim = like[0].numel()
    eye = torch.eye(dim, dtype=like.dtype).unsqueeze(1).expand(dim, like.shape[0], dim)
    return eye.reshape(dim, *like.shape)


def _per_datum_jacobian(tail: nn.Module, z: Tensor) -> Tensor:
    """``[N, dim F, dim Z]``: ``∂f_n / ∂z_n`` by autodiff (the tail acts per datum)."""
    z = z.detach().requires_grad_()
    f = tail(z)
    (jac,) = torch.autograd.grad(f, z, _unit_vectors(f), is_grads_batched=True)
    return jac.flatten(2).transpose(0, 1)  # [N, dim F, dim Z]


def _criterion(loss_name: str, y: Tensor, f: Tensor) -> Tensor:
    """``Σ_n c(f_n, y_n)``, the tutorial's criterion summed over the batch."""
    if loss_name == "ce":
        return nn.functional.cross_entropy(f, y, reduction="sum")
    return 0.5 * (f - y).square().sum()


def _per_datum_hessian(criterion, out: Tensor) -> Tensor:
    """``[N, dim F, dim F]``: ``∇²_f c(f_n, y_n)`` by double backward."""
    f = out.detach().requires_grad_()
    (grad,) = torch.autograd.grad(criterion(f), f, create_graph=True)
    (hess,) = torch.autograd.grad(grad, f, _unit_vectors(f), is_grads_batched=True)
    return hess.flatten(2).transpose(0, 1)


def _peer_style_vectors(loss_name: str, out_n: Tensor) -> Tensor:
    """``[K, *out_n.shape]``: the peer's type-2 vectors for one image-shaped datum, our scale.

    Cross-entropy: per class ``c`` the Hessian square-root column ``√p_c (e_c − p)`` at
    *every* position at once. MSE: the peer treats the last axis (W) as the feature axis, so
    per width index ``w`` a vector of ones on all entries ``[:, :, w]``.
    """
    if loss_name == "ce":
        p = out_n.softmax(dim=0)  # [C, H, W]
        classes = p.shape[0]
        onehot = torch.eye(classes, dtype=p.dtype).reshape(classes, classes, 1, 1)
        return p.sqrt().unsqueeze(1) * (onehot - p.unsqueeze(0))
    width = out_n.shape[-1]
    eye = torch.eye(width, dtype=out_n.dtype).reshape(width, 1, 1, width)
    return eye.expand(width, *out_n.shape).clone()


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_type2_image_outputs_ours_exact_peer_sums_positions(loss_name, kfac_approx):
    """Image-shaped outputs: B against an exact autodiff reference; the peer's B explained.

    Exact (tutorial, ``S Sᵀ = ∇²c`` per datum, independent of the square root chosen):
    ``G_n = J_nᵀ ∇²c_n J_n`` with ``J_n = ∂f_n / ∂z_n`` for the layer output ``z``;
    expand: ``B = 1/(N S) Σ_n Σ_s G_n[s, s]``, reduce: ``B = 1/N Σ_n Σ_{s,s'} G_n[s, s']``.
    A agrees with the peer (up to the scale split α) in all cases.
    """
    model, x, loss_func, y = _problem("fcn", loss_name, "mean")
    ours = _ours(model, x, loss_func, y, "type-2", kfac_approx)
    _, A_peer, B_peer = _peer(model, x, loss_func, y, "type-2", kfac_approx)
    alpha = _alpha(loss_func, model, x, kfac_approx)
    with torch.no_grad():
        out = model(x)
    zs = _layer_outputs(model, x)

    differences = []
    for name, (A, B) in ours.items():
        _assert_close(A, alpha[name] * A_peer[name], f"A of {name}")
        tail = model[int(name) + 1 :]
        z = zs[name]
        channels, positions = z.shape[1], z[0, 0].numel()
        jac = _per_datum_jacobian(tail, z)  # [N, dim F, dim Z]
        hess = _per_datum_hessian(partial(_criterion, loss_name, y), out)  # [N, dim F, dim F]
        ggn = (jac.mT @ hess @ jac).reshape(-1, channels, positions, channels, positions)
        vectors = torch.stack([_peer_style_vectors(loss_name, f_n) for f_n in out])
        grads = (vectors.flatten(2) @ jac).reshape(*vectors.shape[:2], channels, positions)
        if kfac_approx == "expand":  # grads: [N, K, C', S]
            exact = torch.einsum("nasbs->ab", ggn) / positions
            peer_style = torch.einsum("nkas,nkbs->ab", grads, grads) / positions
        else:
            exact = torch.einsum("nasbt->ab", ggn)
            peer_style = torch.einsum("nkas,nkbt->ab", grads, grads)
        exact /= x.shape[0]
        peer_style /= x.shape[0]
        _assert_close(B, exact, f"ours vs exact B, {name}")
        _assert_close(B_peer[name] / alpha[name], peer_style, f"peer vs peer-style B, {name}")
        differences.append(_rel(B_peer[name] / alpha[name], B))
    assert max(differences) > 1e-2  # a real difference, not round-off
