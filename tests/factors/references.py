"""Exact float64 references for the K-FAC factor tests, computed with torch.func / autograd.

Nothing here uses fxkfac; everything follows the tutorial (*KFAC from scratch*, Dangel et al.,
2025) literally:

* :func:`criterion` splits a loss into ``loss = R Σ_n c(f_n, y_n)`` (tutorial Eq. 1).
* :func:`ggn_block` / :func:`ef_block` are the exact GGN ``R Σ_n J_nᵀ H_n J_n`` and empirical
  Fisher ``R Σ_n ∇c_n ∇c_nᵀ`` (Eq. 2) of one layer's ``W̃ = [W.reshape(D_out, -1) | b]``,
  flattened ``rvec`` (row-major) or ``cvec`` (column-major).
* :func:`kfac_matrix` turns a factor pair into the matrix it approximates: ``kron(B, A)`` for
  rvec, ``kron(A, B)`` for cvec, block-diagonal over groups for stacked ``[G, ., .]`` factors.
* :func:`kfac_reference` computes the factors of Definition 23 (expand / reduce, Eschenhagen
  et al. 2023 for weight sharing) from autodiff quantities: layer inputs ``x̃`` are read off
  the Jacobian of the layer output w.r.t. ``W̃`` and the output gradients ``g`` come from the
  Jacobian of the prediction w.r.t. the layer output. It is valid for *any* network, also
  where K-FAC is not exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

ModelFn = Callable[..., Tensor]
"""``fn(params: dict[str, Tensor], *inputs) -> prediction [N, ...]``."""


# ---------------------------------------------------------------------------------------------
# models as functions of their parameters


def module_fn(model: nn.Module) -> tuple[ModelFn, dict[str, Tensor]]:
    """``(fn, params)`` with ``fn(params, *inputs) == model(*inputs)``."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def fn(p: dict[str, Tensor], *inputs: Tensor) -> Tensor:
        return functional_call(model, p, inputs)

    return fn, params


# ---------------------------------------------------------------------------------------------
# criterion and reduction factor


@dataclass
class Criterion:
    """``loss(f, y) = R Σ_n c(f_n, y_n)``."""

    c: Callable[[Tensor, Tensor], Tensor]
    """Per-datum criterion ``c(f_n, y_n)`` (a scalar)."""
    R: float
    """Reduction factor."""


def _mse(f: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((f - y) ** 2).sum()


def _cross_entropy(f: Tensor, y: Tensor) -> Tensor:
    """``f: [C, *d]``; ``y: [*d]`` class indices or ``[C, *d]`` probabilities."""
    log_p = f.log_softmax(dim=0)
    if not y.is_floating_point():  # one-hot by comparison (vmap-friendly)
        classes = torch.arange(f.shape[0], device=f.device).reshape(-1, *([1] * y.ndim))
        y = (classes == y).to(f.dtype)
    return -(y * log_p).sum()


def _bce_with_logits(f: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(f, y, reduction="sum")


def criterion(loss_func: nn.Module, prediction: Tensor) -> Criterion:
    """Criterion and reduction factor of ``loss_func`` for a batch ``prediction [N, ...]``.

    MSE: ``c = ½‖f − y‖²``, ``R = 2`` (sum) or ``2 / (N dim(Y))`` (mean).
    CE: ``c = −log softmax(f)_y``, ``R = 1`` or ``1 / (N · positions)``.
    BCEWithLogits: ``R = 1`` or ``1 / (N dim(Y))``.
    """
    batch = prediction.shape[0]
    if isinstance(loss_func, nn.MSELoss):
        c, scale, dim = _mse, 2.0, prediction[0].numel()
    elif isinstance(loss_func, nn.CrossEntropyLoss):
        c, scale, dim = _cross_entropy, 1.0, prediction[0, 0].numel()
    elif isinstance(loss_func, nn.BCEWithLogitsLoss):
        c, scale, dim = _bce_with_logits, 1.0, prediction[0].numel()
    else:
        raise NotImplementedError(type(loss_func).__name__)
    if loss_func.reduction == "sum":
        return Criterion(c, scale)
    assert loss_func.reduction == "mean"
    return Criterion(c, scale / (batch * dim))


def loss_hessians(loss_func: nn.Module, prediction: Tensor, targets: Tensor) -> Tensor:
    """``[N, F, F]``: Hessian of ``c(f_n, y_n)`` w.r.t. the flattened ``f_n``."""
    crit = criterion(loss_func, prediction)
    shape = prediction.shape[1:]

    def c_flat(f: Tensor, y: Tensor) -> Tensor:
        return crit.c(f.reshape(shape), y)

    flat = prediction.detach().reshape(prediction.shape[0], -1)
    return vmap(hessian(c_flat))(flat, targets)


def loss_gradients(loss_func: nn.Module, prediction: Tensor, targets: Tensor) -> Tensor:
    """``[N, F]``: gradient of ``c(f_n, y_n)`` w.r.t. the flattened ``f_n``."""
    crit = criterion(loss_func, prediction)
    shape = prediction.shape[1:]

    def c_flat(f: Tensor, y: Tensor) -> Tensor:
        return crit.c(f.reshape(shape), y)

    flat = prediction.detach().reshape(prediction.shape[0], -1)
    return vmap(grad(c_flat))(flat, targets)


def reduced_loss(loss_func: nn.Module, prediction: Tensor, targets: Tensor) -> Tensor:
    """``R Σ_n c(f_n, y_n)``: must equal ``loss_func(prediction, targets)``."""
    crit = criterion(loss_func, prediction)
    return crit.R * sum(crit.c(f, y) for f, y in zip(prediction, targets, strict=True))


# ---------------------------------------------------------------------------------------------
# exact curvature blocks


def _vec(matrix_jac: Tensor, order: str) -> Tensor:
    """``[..., D_out, D_in]`` -> ``[..., D_out D_in]`` row-major (rvec) or column-major (cvec)."""
    if order == "cvec":
        matrix_jac = matrix_jac.transpose(-1, -2)
    elif order != "rvec":
        raise ValueError(f"order must be 'rvec' or 'cvec', got {order!r}")
    return matrix_jac.flatten(-2)


def weight_jacobian(
    fn: ModelFn,
    params: dict[str, Tensor],
    inputs: Sequence[Tensor],
    weight: str,
    bias: str | None = None,
    *,
    order: str | None = "rvec",
    layout: str = "out_in",
) -> Tensor:
    """``[N, F, P]``: Jacobian of each datum's prediction w.r.t. ``vec(W̃)``.

    ``W̃ = [W.reshape(D_out, -1) | b]``; with ``layout='in_out'`` the parameter is stored
    ``[D_in, D_out]`` and ``W̃ = [Wᵀ | b]``. ``order=None``: ``[N, F, D_out, D_in (+1)]``.
    """

    def predict(w: Tensor, b: Tensor | None) -> Tensor:
        p = dict(params)
        p[weight] = w
        if bias is not None:
            p[bias] = b
        return fn(p, *inputs)

    w = params[weight]
    prediction = predict(w, params[bias] if bias is not None else None)
    batch, dim_f = prediction.shape[0], prediction[0].numel()
    if bias is None:
        jac_w = jacrev(predict, argnums=0)(w, None)
    else:
        jac_w, jac_b = jacrev(predict, argnums=(0, 1))(w, params[bias])
    jac_w = jac_w.reshape(batch, dim_f, *w.shape)
    if layout == "in_out":
        assert w.ndim == 2
        jac_w = jac_w.transpose(-1, -2)
    elif layout != "out_in":
        raise ValueError(layout)
    d_out = jac_w.shape[2]
    jac = jac_w.reshape(batch, dim_f, d_out, -1)
    if bias is not None:
        jac = torch.cat([jac, jac_b.reshape(batch, dim_f, d_out, 1)], dim=-1)
    return jac if order is None else _vec(jac, order)


@dataclass
class ExactBlocks:
    """Exact GGN and empirical Fisher of one layer's ``W̃``, both flattenings, computed from a
    single Jacobian (per datum ``J_n: [F, D_out, D_in (+1)]``)."""

    jac: Tensor
    """``[N, F, D_out, D_in (+1)]``: Jacobian of each datum's prediction w.r.t. ``W̃``."""
    hessians: Tensor
    """``[N, F, F]``: loss Hessians ``∇²_f c(f_n, y_n)``."""
    gradients: Tensor
    """``[N, F]``: loss gradients ``∇_f c(f_n, y_n)``."""
    R: float

    def ggn(self, order: str = "rvec") -> Tensor:
        """``R Σ_n J_nᵀ H_n J_n`` of ``vec(W̃)``."""
        jac = _vec(self.jac, order)
        return self.R * torch.einsum("nfp,nfg,ngq->pq", jac, self.hessians, jac)

    def ef(self, order: str = "rvec") -> Tensor:
        """``R Σ_n ∇_θ c_n ∇_θ c_nᵀ`` of ``vec(W̃)``."""
        grads = torch.einsum("nfp,nf->np", _vec(self.jac, order), self.gradients)
        return self.R * grads.T @ grads


def exact_blocks(
    fn: ModelFn,
    params: dict[str, Tensor],
    inputs: Sequence[Tensor],
    targets: Tensor,
    loss_func: nn.Module,
    weight: str,
    bias: str | None = None,
    *,
    layout: str = "out_in",
) -> ExactBlocks:
    """Everything needed for the exact curvature blocks of one layer (see ExactBlocks)."""
    prediction = fn(params, *inputs).detach()
    return ExactBlocks(
        jac=weight_jacobian(fn, params, inputs, weight, bias, order=None, layout=layout).detach(),
        hessians=loss_hessians(loss_func, prediction, targets),
        gradients=loss_gradients(loss_func, prediction, targets),
        R=criterion(loss_func, prediction).R,
    )


def ggn_block(
    fn: ModelFn,
    params: dict[str, Tensor],
    inputs: Sequence[Tensor],
    targets: Tensor,
    loss_func: nn.Module,
    weight: str,
    bias: str | None = None,
    *,
    order: str = "rvec",
    layout: str = "out_in",
) -> Tensor:
    """Exact GGN ``R Σ_n J_nᵀ H_n J_n`` of ``vec(W̃)`` (tutorial Eq. 2, type-II Fisher)."""
    blocks = exact_blocks(fn, params, inputs, targets, loss_func, weight, bias, layout=layout)
    return blocks.ggn(order)


def ef_block(
    fn: ModelFn,
    params: dict[str, Tensor],
    inputs: Sequence[Tensor],
    targets: Tensor,
    loss_func: nn.Module,
    weight: str,
    bias: str | None = None,
    *,
    order: str = "rvec",
    layout: str = "out_in",
) -> Tensor:
    """Exact empirical Fisher ``R Σ_n ∇c_n ∇c_nᵀ`` of ``vec(W̃)``."""
    blocks = exact_blocks(fn, params, inputs, targets, loss_func, weight, bias, layout=layout)
    return blocks.ef(order)


# ---------------------------------------------------------------------------------------------
# Kronecker matrices


def rvec_to_cvec(matrix: Tensor, d_out: int, d_in: int) -> Tensor:
    """Re-index a curvature matrix of ``rvec(W̃)`` (``W̃: [d_out, d_in]``) to ``cvec(W̃)``."""
    rows = torch.arange(d_out).unsqueeze(0) * d_in + torch.arange(d_in).unsqueeze(1)
    perm = rows.flatten()  # position k of cvec holds rvec entry perm[k]
    return matrix[perm][:, perm]


def kfac_matrix(A: Tensor, B: Tensor, order: str = "rvec") -> Tensor:
    """The matrix a factor pair stands for.

    ``kron(B, A)`` (rvec) or ``kron(A, B)`` (cvec); stacked factors ``[G, ., .]`` give the
    block diagonal over groups in rvec order (each group owns ``D_out / G`` contiguous rows of
    ``W̃``), re-indexed for cvec.
    """
    A, B = A.detach().contiguous(), B.detach().contiguous()
    if A.ndim == 2:
        if order == "rvec":
            return torch.kron(B, A)
        if order == "cvec":
            return torch.kron(A, B)
        raise ValueError(order)
    assert A.ndim == B.ndim == 3 and A.shape[0] == B.shape[0]
    rvec = torch.block_diag(*[torch.kron(b, a) for a, b in zip(A, B, strict=True)])
    if order == "rvec":
        return rvec
    if order == "cvec":
        return rvec_to_cvec(rvec, A.shape[0] * B.shape[-1], A.shape[-1])
    raise ValueError(order)


# ---------------------------------------------------------------------------------------------
# Definition-23 factors from autodiff quantities (valid for any network)


def kfac_reference(
    model: nn.Module,
    inputs: Sequence[Tensor],
    targets: Tensor,
    loss_func: nn.Module,
    layer: str,
    *,
    fisher_type: str = "type-2",
    kfac_approx: str = "expand",
) -> tuple[Tensor, Tensor]:
    """K-FAC factors ``(A, B)`` of submodule ``layer`` (``nn.Linear`` / ``nn.ConvNd``).

    expand: ``A = R Σ_{n,s} x̃ x̃ᵀ``, ``B = 1/(NS) Σ_{n,s} G_{n,s}ᵀ M_n G_{n,s}``;
    reduce: ``A = R Σ_n x̄ x̄ᵀ``, ``B = 1/N Σ_n Ḡ_nᵀ M_n Ḡ_n`` with ``Ḡ_n = Σ_s G_{n,s}``;
    ``G_{n,s} = J_{z_{n,s}} f_n`` and ``M_n = Σ_c ▲▲ᵀ``: the loss Hessian (type-2) or
    ``∇c ∇cᵀ`` (empirical). The layer must be called exactly once per forward.
    """
    module = model.get_submodule(layer)
    is_conv = isinstance(module, nn.modules.conv._ConvNd)
    groups = module.groups if is_conv else 1
    seen: dict[str, Tensor] = {}

    def record(mod: nn.Module, args: tuple, out: Tensor) -> None:
        seen["x"] = args[0].detach()
        seen["z"] = out.detach()

    handle = module.register_forward_hook(record)
    try:
        with torch.no_grad():
            prediction = model(*inputs)
    finally:
        handle.remove()
    x, z = seen["x"], seen["z"]
    batch = prediction.shape[0]
    d_out = module.weight.shape[0]
    per_group = d_out // groups

    # J of the prediction w.r.t. the layer output, per datum: [N, F, S, D_out]
    def perturbed(delta: Tensor) -> Tensor:
        h = module.register_forward_hook(lambda mod, args, out: out + delta)
        try:
            return model(*inputs)
        finally:
            h.remove()

    jac_z = jacrev(perturbed)(torch.zeros_like(z))
    jac_z = jac_z.reshape(batch, prediction[0].numel(), batch, *z.shape[1:])
    jac_z = torch.stack([jac_z[n, :, n] for n in range(batch)])  # [N, F, *z[0]]
    if is_conv:
        jac_z = jac_z.movedim(2, -1)  # channels last
    jac_z = jac_z.reshape(batch, jac_z.shape[1], -1, d_out)  # [N, F, S, D_out]

    # x̃_{n,s}: row o of J_{W̃} z_{n,s,o} (for the first output channel o of each group)
    has_bias = module.bias is not None

    def layer_out(w: Tensor, b: Tensor | None) -> Tensor:
        p = {"weight": w} if b is None else {"weight": w, "bias": b}
        return functional_call(module, p, (x,))

    w = module.weight.detach()
    if has_bias:
        jac_w, jac_b = jacrev(layer_out, argnums=(0, 1))(w, module.bias.detach())
    else:
        jac_w = jacrev(layer_out, argnums=0)(w, None)
    jac_w = jac_w.reshape(batch, *z.shape[1:], d_out, -1)
    if is_conv:
        jac_w = jac_w.movedim(1, -3)  # [N, *spatial, C_out(z), C_out(W), D_in]
    jac_w = jac_w.reshape(batch, -1, d_out, d_out, jac_w.shape[-1])  # [N, S, Dz, Dw, D_in]
    if has_bias:
        jac_b = jac_b.reshape(batch, *z.shape[1:], d_out)
        if is_conv:
            jac_b = jac_b.movedim(1, -2)
        jac_b = jac_b.reshape(batch, -1, d_out, d_out, 1)
        jac_w = torch.cat([jac_w, jac_b], dim=-1)
    first = [g * per_group for g in range(groups)]
    x_tilde = torch.stack([jac_w[:, :, o, o, :] for o in first], dim=2)  # [N, S, G, D_A]
    positions = x_tilde.shape[1]

    crit = criterion(loss_func, prediction)
    if fisher_type == "type-2":
        m = loss_hessians(loss_func, prediction, targets)
    elif fisher_type == "empirical":
        g = loss_gradients(loss_func, prediction, targets)
        m = torch.einsum("nf,ng->nfg", g, g)
    else:
        raise ValueError(fisher_type)

    jac_z = jac_z.reshape(batch, jac_z.shape[1], positions, groups, per_group)
    if kfac_approx == "expand":
        a = crit.R * torch.einsum("nsgi,nsgj->gij", x_tilde, x_tilde)
        b = torch.einsum("nfsgi,nfe,nesgj->gij", jac_z, m, jac_z) / (batch * positions)
    elif kfac_approx == "reduce":
        x_bar = x_tilde.mean(dim=1)
        a = crit.R * torch.einsum("ngi,ngj->gij", x_bar, x_bar)
        g_bar = jac_z.sum(dim=2)  # [N, F, G, D]
        b = torch.einsum("nfgi,nfe,negj->gij", g_bar, m, g_bar) / batch
    else:
        raise ValueError(kfac_approx)
    a, b = a.detach(), b.detach()
    if groups == 1:
        return a[0].contiguous(), b[0].contiguous()
    return a, b


# ---------------------------------------------------------------------------------------------
# comparisons


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``‖actual − expected‖_F / ‖expected‖_F`` (``‖actual‖_F`` where ``expected = 0``)."""
    actual, expected = actual.detach(), expected.detach()
    scale = expected.norm()
    difference = (actual - expected).norm()
    return float(difference / scale) if scale > 0 else float(difference)


def assert_matrix_close(
    actual: Tensor, expected: Tensor, *, rtol: float = 1e-9, atol_scale: float = 1e-11, name=""
) -> None:
    """``assert_close`` with ``atol = atol_scale · max|expected|`` and a worst-entry report."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    atol = atol_scale * float(expected.abs().max()) + 1e-14

    def message(default: str) -> str:
        diff = (actual - expected).abs()
        worst = torch.unravel_index(diff.argmax(), diff.shape)
        index = tuple(int(i) for i in worst)
        return (
            f"{name}: worst entry {index}: actual {float(actual[index]):.10g}, "
            f"expected {float(expected[index]):.10g} (|diff| {float(diff[index]):.3g}); "
            f"max|expected| {float(expected.abs().max()):.3g}, relative Frobenius error "
            f"{relative_error(actual, expected):.3g}\n{default}"
        )

    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=message)
