"""Supported losses: reduction factor ``R`` and backpropagated vectors per Fisher type.

Each loss is split into a per-datum criterion ``c(f, y)`` and a reduction factor ``R``
(tutorial Eq. 1, Examples 1–2) so that ``loss = R Σ_n c(f_n, y_n)``:

========================  ========================  ============  =========================
loss                      criterion c               R (sum)       R (mean)
========================  ========================  ============  =========================
``nn.MSELoss``            ½‖f − y‖²                 2             2 / (N dim(Y))
``nn.CrossEntropyLoss``   −log softmax(f)_y         1             1 / (N dim(Y)), dim(Y) =
                                                                  positions per datum
``nn.BCEWithLogitsLoss``  −y log σ(f) − (1−y)         1             1 / (N dim(Y))
                          log(1 − σ(f))
========================  ========================  ============  =========================

Backpropagated vectors ``▲`` (tutorial Section 4.3) all have the prediction's shape and
come stacked along a new leading axis ``[K, *prediction.shape]``:

* ``type-2``: the columns of a symmetric factorization ``S Sᵀ = ∇²_f c`` (``K = dim(F)``);
* ``mc``: ``∇_f c(f, ŷ_m) / √M`` for labels ``ŷ_m`` sampled from the model's likelihood;
* ``empirical``: ``∇_f c(f, y)`` at the true labels (``K = 1``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxkfac.errors import UnsupportedLossError

SUPPORTED_LOSSES = "nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss"


def _columns(num_columns: int, chunk_size: int) -> Iterator[range]:
    for start in range(0, num_columns, chunk_size):
        yield range(start, min(start + chunk_size, num_columns))


@dataclass
class LossRule:
    """Base: criterion-specific maths for one loss module.

    Args:
        loss_func: the PyTorch loss module.
    """

    loss_func: nn.Module

    def __post_init__(self) -> None:
        reduction = getattr(self.loss_func, "reduction", None)
        if reduction not in ("mean", "sum"):
            raise UnsupportedLossError(
                f"{type(self.loss_func).__name__}(reduction={reduction!r}) is not supported: "
                "use reduction='mean' or 'sum'"
            )
        self.reduction = reduction

    def check(self, prediction: Tensor, targets: Tensor) -> None:
        """Raise ``ValueError`` when ``targets`` do not fit ``prediction`` for this loss."""

    def positions(self, prediction: Tensor) -> int:
        """``dim(Y)``: the number of target entries per datum the mean divides by."""
        return prediction[0].numel()

    def reduction_factor(self, prediction: Tensor) -> float:
        """``R`` of ``loss = R Σ_n c(f_n, y_n)`` for a batch of predictions."""
        if prediction.ndim == 0 or prediction.shape[0] == 0:
            raise ValueError("the batch is empty: K-FAC factors need at least one datum")
        scale = self.criterion_scale()
        if self.reduction == "sum":
            return scale
        return scale / (prediction.shape[0] * self.positions(prediction))

    def criterion_scale(self) -> float:
        """``R`` for ``reduction='sum'`` (2 for MSE, whose criterion is ½‖f − y‖²)."""
        return 1.0

    def type2_vectors(self, prediction: Tensor, chunk_size: int) -> Iterator[Tensor]:
        """Columns of ``S_n`` (``S_n S_nᵀ = ∇²c``), in chunks ``[k, *prediction.shape]``."""
        raise NotImplementedError

    def mc_vectors(self, prediction: Tensor, samples: int, generator: torch.Generator | None) -> Tensor:
        """``[M, *prediction.shape]`` would-be gradients at sampled labels, scaled by 1/√M."""
        raise NotImplementedError

    def empirical_vectors(self, prediction: Tensor, targets: Tensor) -> Tensor:
        """``[1, *prediction.shape]``: ``∇_f c(f_n, y_n)`` at the true labels."""
        raise NotImplementedError


def _one_hot_columns(prediction: Tensor, columns: range, scale: Tensor | None) -> Tensor:
    """``[k, *prediction.shape]``: column ``j`` is ``e_j`` (flat index per datum) × scale."""
    batch, dim = prediction.shape[0], prediction[0].numel()
    index = torch.arange(columns.start, columns.stop, device=prediction.device)
    vectors = prediction.new_zeros(len(columns), batch, dim)
    vectors[torch.arange(len(columns)), :, index] = 1.0
    if scale is not None:
        vectors = vectors * scale.reshape(1, batch, dim)
    return vectors.reshape(len(columns), *prediction.shape)


class MSERule(LossRule):
    """``nn.MSELoss``: ``c = ½‖f − y‖²``, Hessian ``I``, likelihood ``N(f, I)``."""

    def check(self, prediction: Tensor, targets: Tensor) -> None:
        """Targets must have the prediction's shape and a floating dtype."""
        if targets.shape != prediction.shape:
            raise ValueError(
                f"MSELoss targets have shape {tuple(targets.shape)} but the prediction has "
                f"{tuple(prediction.shape)}; they must match"
            )
        if not targets.is_floating_point():
            raise ValueError(f"MSELoss targets must be floating point, got {targets.dtype}")

    def criterion_scale(self) -> float:
        """MSE sums squares; the criterion halves them, so ``R = 2`` for ``'sum'``."""
        return 2.0

    def type2_vectors(self, prediction: Tensor, chunk_size: int) -> Iterator[Tensor]:
        """Unit vectors, one per output entry."""
        for columns in _columns(prediction[0].numel(), chunk_size):
            yield _one_hot_columns(prediction, columns, None)

    def mc_vectors(self, prediction: Tensor, samples: int, generator: torch.Generator | None) -> Tensor:
        """``f − ŷ = −ε`` with ``ε ~ N(0, I)``."""
        noise = torch.randn(
            (samples, *prediction.shape),
            generator=generator,
            dtype=prediction.dtype,
            device=prediction.device,
        )
        return noise / math.sqrt(samples)

    def empirical_vectors(self, prediction: Tensor, targets: Tensor) -> Tensor:
        """``f − y``."""
        return (prediction - targets).unsqueeze(0)


class CrossEntropyRule(LossRule):
    """``nn.CrossEntropyLoss`` on logits ``[N, C]`` or ``[N, C, d1, ...]`` (class dim 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_func.weight is not None:
            raise UnsupportedLossError(
                "CrossEntropyLoss(weight=...) is not supported: drop the class weights"
            )
        if self.loss_func.label_smoothing != 0:
            raise UnsupportedLossError("CrossEntropyLoss(label_smoothing>0) is not supported")

    def check(self, prediction: Tensor, targets: Tensor) -> None:
        """Class indices ``[N, d1, ...]`` (int) or probabilities shaped like the logits."""
        if prediction.ndim < 2:
            raise ValueError(
                f"CrossEntropyLoss needs logits [N, C, ...], got shape {tuple(prediction.shape)}"
            )
        if targets.is_floating_point():
            if targets.shape != prediction.shape:
                raise ValueError(
                    f"CrossEntropyLoss probability targets have shape {tuple(targets.shape)}, "
                    f"the logits {tuple(prediction.shape)}; they must match"
                )
            return
        expected = (prediction.shape[0], *prediction.shape[2:])
        if targets.shape != expected:
            raise ValueError(
                f"CrossEntropyLoss class-index targets have shape {tuple(targets.shape)}; "
                f"logits {tuple(prediction.shape)} need targets of shape {expected}"
            )
        if (targets == self.loss_func.ignore_index).any():
            raise ValueError(
                f"targets contain ignore_index={self.loss_func.ignore_index}: ignored positions "
                "are not supported by the K-FAC factors; drop them from the batch"
            )
        classes = prediction.shape[1]
        if targets.numel() and (targets.min() < 0 or targets.max() >= classes):
            raise ValueError(f"CrossEntropyLoss targets must lie in [0, {classes - 1}]")

    def positions(self, prediction: Tensor) -> int:
        """Spatial/sequence positions per datum (the mean averages over N × positions)."""
        return prediction[0, 0].numel()

    def _probabilities(self, prediction: Tensor) -> Tensor:
        return prediction.detach().softmax(dim=1)

    def type2_vectors(self, prediction: Tensor, chunk_size: int) -> Iterator[Tensor]:
        """Columns ``√p_c (e_c − p)`` of ``diag(p) − ppᵀ``, one per (class, position)."""
        probs = self._probabilities(prediction)
        batch, classes = probs.shape[:2]
        flat = probs.reshape(batch, classes, -1)  # [N, C, P]
        positions = flat.shape[2]
        for columns in _columns(classes * positions, chunk_size):
            index = torch.arange(columns.start, columns.stop, device=probs.device)
            cls, pos = index // positions, index % positions
            p_pos = flat[:, :, pos].permute(2, 0, 1)  # [k, N, C]
            column = -p_pos * p_pos.gather(2, cls.view(-1, 1, 1).expand(-1, batch, 1)).sqrt()
            column[torch.arange(len(index)), :, cls] += p_pos[torch.arange(len(index)), :, cls].sqrt()
            vectors = probs.new_zeros(len(index), batch, classes, positions)
            vectors[torch.arange(len(index)), :, :, pos] = column
            yield vectors.reshape(len(index), *probs.shape)

    def mc_vectors(self, prediction: Tensor, samples: int, generator: torch.Generator | None) -> Tensor:
        """``p − onehot(ŷ)`` with ``ŷ ~ Categorical(p)`` at every position."""
        probs = self._probabilities(prediction)
        classes = probs.shape[1]
        per_position = probs.movedim(1, -1).reshape(-1, classes)
        labels = torch.multinomial(per_position, samples, replacement=True, generator=generator)
        onehot = F.one_hot(labels.T, classes).to(probs.dtype)  # [M, N*P, C]
        onehot = onehot.reshape(samples, *probs.movedim(1, -1).shape).movedim(-1, 2)
        return (probs.unsqueeze(0) - onehot) / math.sqrt(samples)

    def empirical_vectors(self, prediction: Tensor, targets: Tensor) -> Tensor:
        """``p − y`` (``y`` one-hot or a probability vector)."""
        probs = self._probabilities(prediction)
        if not targets.is_floating_point():
            targets = F.one_hot(targets, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
        return (probs - targets).unsqueeze(0)


class BCEWithLogitsRule(LossRule):
    """``nn.BCEWithLogitsLoss``: independent Bernoulli likelihoods, Hessian ``diag(σ(1−σ))``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_func.weight is not None or self.loss_func.pos_weight is not None:
            raise UnsupportedLossError("BCEWithLogitsLoss(weight/pos_weight) is not supported")

    def check(self, prediction: Tensor, targets: Tensor) -> None:
        """Targets in ``[0, 1]`` shaped like the logits."""
        if targets.shape != prediction.shape:
            raise ValueError(
                f"BCEWithLogitsLoss targets have shape {tuple(targets.shape)}, the logits "
                f"{tuple(prediction.shape)}; they must match"
            )
        if not targets.is_floating_point():
            raise ValueError(f"BCEWithLogitsLoss targets must be floating point, got {targets.dtype}")

    def type2_vectors(self, prediction: Tensor, chunk_size: int) -> Iterator[Tensor]:
        """Scaled unit vectors ``√(σ(1−σ)) e_j``."""
        sigma = prediction.detach().sigmoid()
        scale = (sigma * (1 - sigma)).sqrt()
        for columns in _columns(prediction[0].numel(), chunk_size):
            yield _one_hot_columns(prediction, columns, scale)

    def mc_vectors(self, prediction: Tensor, samples: int, generator: torch.Generator | None) -> Tensor:
        """``σ − ŷ`` with ``ŷ ~ Bernoulli(σ)``."""
        sigma = prediction.detach().sigmoid()
        labels = torch.bernoulli(sigma.expand(samples, *sigma.shape), generator=generator)
        return (sigma.unsqueeze(0) - labels) / math.sqrt(samples)

    def empirical_vectors(self, prediction: Tensor, targets: Tensor) -> Tensor:
        """``σ(f) − y``."""
        return (prediction.detach().sigmoid() - targets).unsqueeze(0)


LOSS_RULES: dict[type[nn.Module], type[LossRule]] = {
    nn.MSELoss: MSERule,
    nn.CrossEntropyLoss: CrossEntropyRule,
    nn.BCEWithLogitsLoss: BCEWithLogitsRule,
}


def loss_rule(loss_func: nn.Module) -> LossRule:
    """The :class:`LossRule` of a loss module; a clear error for unsupported losses."""
    for cls in type(loss_func).__mro__:
        if cls in LOSS_RULES:
            return LOSS_RULES[cls](loss_func)
    raise UnsupportedLossError(
        f"no K-FAC rule for loss {type(loss_func).__name__}; supported: {SUPPORTED_LOSSES} "
        "(pass the loss module, e.g. nn.CrossEntropyLoss(), not a function)"
    )
