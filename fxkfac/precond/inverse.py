"""Invert a Kronecker-factored curvature block and apply it to a gradient matrix.

Factors are kept with a leading group axis: ``A: [G, D_A, D_A]`` or diagonal ``[G, D_A]``,
``B: [G, D_B, D_B]`` or ``[G, D_B]``. The gradient of a layer is the matrix
``Ĝ = [∇W.reshape(D_out, -1) | ∇b]`` split by group, ``[G, D_B, D_A]``; with the rvec
convention the curvature block is ``B ⊗ A`` and ``(B ⊗ A)⁻¹ rvec(Ĝ) = rvec(B⁻¹ Ĝ A⁻¹)``.

* ``cholesky`` — Tikhonov damping split between the factors with the π rule (Martens &
  Grosse, 2015, §6.3): ``(B + λ/π·I)⁻¹ Ĝ (A + π λ·I)⁻¹`` with
  ``π = sqrt((tr A / D_A) / (tr B / D_B))``, both inverses by Cholesky;
* ``eigh`` — eigendecompositions ``A = Q_A diag(a) Q_Aᵀ``, ``B = Q_B diag(b) Q_Bᵀ`` and the
  exact damped inverse ``(B ⊗ A + λ I)⁻¹``: in the eigenbasis divide by ``b_i a_j + λ``.
  Eigenvalue products below ``tol · max`` are discarded (a pseudo-inverse, as in seed 001);
  :meth:`KroneckerInverse.null_part` returns the component of ``Ĝ`` in those directions;
* ``ekfac`` — the ``eigh`` eigenbasis with corrected eigenvalues ``s: [G, D_B, D_A]``
  (George et al., 2018; :mod:`fxkfac.precond.ekfac`): divide by ``s_ij + λ`` in the
  eigenbasis. :meth:`KroneckerInverse.compute` starts from ``s = b aᵀ`` (plain K-FAC); the
  preconditioner replaces it by the running corrected eigenvalues. ``tol`` applies to ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def is_diagonal(factor: Tensor) -> bool:
    """Whether a grouped factor is stored as a diagonal ``[G, D]``."""
    return factor.ndim == 2


def mean_eigenvalue(factor: Tensor) -> Tensor:
    """``tr(F) / D`` per group, ``[G]``."""
    diagonal = factor if is_diagonal(factor) else factor.diagonal(dim1=-2, dim2=-1)
    return diagonal.mean(-1)


def _damped_inverse(factor: Tensor, damping: Tensor) -> Tensor:
    """``(F + δ I)⁻¹`` per group with ``δ: [G]``; Cholesky, eigh as fallback."""
    if is_diagonal(factor):
        return 1.0 / (factor + damping[:, None])
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    damped = factor + damping[:, None, None] * eye
    cholesky, info = torch.linalg.cholesky_ex(damped)
    if bool((info == 0).all()):
        return torch.cholesky_inverse(cholesky)
    values, vectors = torch.linalg.eigh(0.5 * (damped + damped.mT))
    values = values.clamp_min(torch.finfo(values.dtype).tiny)
    return (vectors / values[..., None, :]) @ vectors.mT


def _eigh(factor: Tensor) -> tuple[Tensor | None, Tensor]:
    """``(Q, eigenvalues)``; ``Q`` is ``None`` for diagonal factors."""
    if is_diagonal(factor):
        return None, factor.clamp_min(0)
    values, vectors = torch.linalg.eigh(0.5 * (factor + factor.mT))
    return vectors, values.clamp_min(0)


def _rotate(matrix: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``leftᵀ M right`` with ``None`` meaning identity; ``M: [G, D_B, D_A]``."""
    if left is not None:
        matrix = left.mT @ matrix
    if right is not None:
        matrix = matrix @ right
    return matrix


def _unrotate(matrix: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    if left is not None:
        matrix = left @ matrix
    if right is not None:
        matrix = matrix @ right.mT
    return matrix


@dataclass
class KroneckerInverse:
    """The inverse of one layer's ``B ⊗ A + λ I`` in a form that is cheap to apply.

    Attributes:
        method: ``'cholesky'``, ``'eigh'`` or ``'ekfac'``.
        tensors: ``{'A_inv', 'B_inv'}`` (cholesky) or ``{'QA', 'a', 'QB', 'b'}`` (eigh;
            ``QA``/``QB`` absent for diagonal factors); ekfac adds ``'s'``, ``[G, D_B, D_A]``.
        damping: ``λ``.
        tol: relative eigenvalue threshold of the pseudo-inverse (eigh, ekfac).
    """

    method: str
    tensors: dict[str, Tensor]
    damping: float
    tol: float = 0.0

    @classmethod
    def compute(cls, A: Tensor, B: Tensor, damping: float, method: str, tol: float = 0.0) -> KroneckerInverse:
        """Invert ``B ⊗ A + λ I`` for grouped factors ``A``, ``B``."""
        if method == "cholesky":
            pi = (mean_eigenvalue(A) / mean_eigenvalue(B)).clamp_min(1e-30).sqrt()
            pi = torch.where(torch.isfinite(pi) & (pi > 0), pi, torch.ones_like(pi))
            root = damping**0.5
            tensors = {
                "A_inv": _damped_inverse(A, root * pi),
                "B_inv": _damped_inverse(B, root / pi),
            }
        elif method in ("eigh", "ekfac"):
            QA, a = _eigh(A)
            QB, b = _eigh(B)
            tensors = {"a": a, "b": b}
            if QA is not None:
                tensors["QA"] = QA
            if QB is not None:
                tensors["QB"] = QB
            if method == "ekfac":
                tensors["s"] = b[:, :, None] * a[:, None, :]
        else:
            raise ValueError(f"inverse method {method!r} is not one of 'cholesky', 'eigh', 'ekfac'")
        return cls(method, tensors, float(damping), float(tol))

    def _eigen_scale(self) -> tuple[Tensor, Tensor]:
        """``(1 / (b aᵀ + λ) on kept entries, kept mask)``, both ``[G, D_B, D_A]`` (``s`` for ekfac)."""
        if self.method == "ekfac":
            product = self.tensors["s"]
        else:
            product = self.tensors["b"][:, :, None] * self.tensors["a"][:, None, :]
        largest = product.flatten(1).amax(1).clamp_min(0)[:, None, None]
        kept = product > self.tol * largest if self.tol > 0 else torch.ones_like(product, dtype=torch.bool)
        denominator = product + self.damping
        kept = kept & (denominator > 0)
        scale = torch.where(kept, 1.0 / torch.where(kept, denominator, 1.0), 0.0)
        return scale, kept

    def apply(self, gradient: Tensor) -> Tensor:
        """``(B ⊗ A + λI)⁻¹`` applied to ``gradient: [G, D_B, D_A]``."""
        t = self.tensors
        if self.method == "cholesky":
            left = t["B_inv"][:, :, None] * gradient if is_diagonal(t["B_inv"]) else t["B_inv"] @ gradient
            return left * t["A_inv"][:, None, :] if is_diagonal(t["A_inv"]) else left @ t["A_inv"]
        rotated = _rotate(gradient, t.get("QB"), t.get("QA"))
        scale, _ = self._eigen_scale()
        return _unrotate(rotated * scale, t.get("QB"), t.get("QA"))

    def null_part(self, gradient: Tensor) -> Tensor:
        """Component of ``gradient`` in the directions the pseudo-inverse discards."""
        if self.method == "cholesky":
            return torch.zeros_like(gradient)
        t = self.tensors
        rotated = _rotate(gradient, t.get("QB"), t.get("QA"))
        _, kept = self._eigen_scale()
        return _unrotate(rotated * (~kept), t.get("QB"), t.get("QA"))

    def is_finite(self) -> bool:
        """Whether every stored tensor is finite."""
        return all(bool(torch.isfinite(value).all()) for value in self.tensors.values())
