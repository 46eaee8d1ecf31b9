"""NGD-T: the thermodynamic step-size regulator of seed 001, with a hybrid null-space update.

Given gradients ``g_l`` and natural gradients ``g_nat,l = F_l⁻¹ g_l`` of every layer::

    ΔF     = Σ_l ⟨g_l, g_nat,l⟩                     (squared natural-gradient norm)
    η_T    = clip(η₀ · Q_budget / (ΔF + ε), η_min, η_max)
    Q_pred = ½ η_T² ΔF                               (predicted dissipation)
    Δθ     = −η_T g_nat − η_null r,   η_null = null_ratio · η_T

``r`` is the part of ``g`` the preconditioner cannot see. ``null_space='projection'``
(default) projects ``g`` onto the eigen-directions the pseudo-inverse discards (zero for a
damped inverse, which discards nothing). ``null_space='residual'`` is seed 001's rule
``r = g − g_nat``; it subtracts vectors of different units (a gradient and a
curvature-scaled gradient), so its size depends on the curvature's scale — kept only for
reproducing the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fxkfac.precond.inverse import KroneckerInverse


@dataclass
class NGDT:
    """Configuration of the NGD-T regulator (pass it to :class:`fxkfac.KFAC` as ``regulator``)."""

    q_budget: float = 1e-3
    eta0: float = 1.0
    eta_min: float = 1e-6
    eta_max: float = 1.0
    null_ratio: float = 0.01
    eps: float = 1e-8
    null_space: str = "projection"

    def __post_init__(self) -> None:
        if self.null_space not in ("projection", "residual"):
            raise ValueError(f"null_space={self.null_space!r} is not one of 'projection', 'residual'")
        if not 0 < self.eta_min <= self.eta_max:
            raise ValueError(f"need 0 < eta_min <= eta_max, got {self.eta_min}, {self.eta_max}")
        if self.q_budget <= 0 or self.eps <= 0:
            raise ValueError("q_budget and eps must be positive")

    def step_size(self, delta_f: float) -> tuple[float, float]:
        """``(η_T, Q_pred)`` for a squared natural-gradient norm ``ΔF``."""
        eta = self.eta0 * self.q_budget / (delta_f + self.eps)
        eta = min(max(eta, self.eta_min), self.eta_max)
        return eta, 0.5 * eta**2 * delta_f

    def null_direction(self, gradient: Tensor, natural: Tensor, inverse: KroneckerInverse | None) -> Tensor:
        """``r`` for one layer (gradient matrices ``[G, D_B, D_A]``)."""
        if self.null_space == "residual":
            return gradient - natural
        if inverse is None:
            return gradient * 0
        return inverse.null_part(gradient)
