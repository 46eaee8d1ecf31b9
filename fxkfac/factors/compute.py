"""Compute K-FAC factors ``{layer: (A, B)}`` from a :class:`~fxkfac.capture.Capture`.

Convention (tutorial Definition 23; Eschenhagen et al., 2023 for weight sharing)::

    expand:  A = R Σ_{n,s} x̃_{n,s} x̃_{n,s}ᵀ          B = 1/(N S) Σ_{n,s,c} g_{n,s,c} g_{n,s,c}ᵀ
    reduce:  A = R Σ_n x̄_n x̄_nᵀ,  x̄_n = mean_s x̃   B = 1/N Σ_{n,c} ḡ_{n,c} ḡ_{n,c}ᵀ,  ḡ = Σ_s g

``kron(B, A)`` approximates the curvature of ``rvec(W̃)``, ``W̃ = [W.reshape(D_out, -1) | b]``
(``kron(A, B)`` that of ``cvec``). ``g`` are gradients of the backpropagated vectors
(:mod:`fxkfac.factors.losses`) with respect to the layer output; all vectors of a chunk go
through one batched backward (``is_grads_batched``), never one backward per datum.

Grouped convolutions give stacked factors ``A: [G, D_A, D_A]``, ``B: [G, D_B, D_B]``.
A tied weight (several uses) treats every use as further weight-sharing positions:
expand sums over the positions of all uses (and divides ``B`` by their total count); reduce
averages inputs / sums gradients over all of them. That is exact when the uses feed
separate loss terms of a linear network (see the tests), like the sequence case.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from fxkfac.capture import Capture
from fxkfac.errors import CaptureError
from fxkfac.factors.datum_rows import per_datum_gradients, per_datum_inputs
from fxkfac.factors.losses import LossRule, loss_rule
from fxkfac.factors.rules import factor_rule, gram, gram_with_ones


class FisherType(str, Enum):
    """Which curvature the gradient-based factor approximates."""

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"
    FORWARD_ONLY = "forward-only"


class KFACApprox(str, Enum):
    """How weight-shared axes are handled (Eschenhagen et al., 2023)."""

    EXPAND = "expand"
    REDUCE = "reduce"


def _enum(kind: type[Enum], value: Any, argument: str) -> Enum:
    try:
        return kind(value)
    except ValueError:
        options = ", ".join(repr(member.value) for member in kind)
        raise ValueError(f"{argument}={value!r} is not one of {options}") from None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def compute_factors(
    capture: Capture,
    loss_func: nn.Module,
    targets: Tensor,
    fisher_type: str = "type-2",
    mc_samples: int = 1,
    kfac_approx: str = "expand",
    generator: torch.Generator | None = None,
    prediction: Tensor | None = None,
    chunk_size: int = 64,
    diagonal: frozenset[str] = frozenset(),
) -> dict[str, tuple[Tensor, Tensor]]:
    """K-FAC factors of every captured layer.

    Args:
        capture: the capture returned by the compiled module's forward.
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``
            (``reduction='mean'`` or ``'sum'``); only its type and settings are used.
        targets: targets of the batch (shape and dtype checked against the loss).
        fisher_type: ``'type-2'`` (= GGN), ``'mc'``, ``'empirical'`` or ``'forward-only'``.
        mc_samples: number of sampled labels per datum for ``'mc'``.
        kfac_approx: ``'expand'`` or ``'reduce'``.
        generator: random generator for ``'mc'`` (reproducible sampling).
        prediction: the tensor the loss is computed from (default: the model output).
        chunk_size: backpropagated vectors per batched backward.
        diagonal: names of layers whose factors are kept diagonal (returned as vectors
            ``[D]``; used for enormous layers).

    Returns:
        ``{layer name: (A, B)}``; ``A: [D_in (+1), D_in (+1)]``, ``B: [D_out, D_out]``,
        each with a leading group axis ``[G, ., .]`` for grouped convolutions.
    """
    fisher = _enum(FisherType, fisher_type, "fisher_type")
    approx = _enum(KFACApprox, kfac_approx, "kfac_approx")
    if not isinstance(capture, Capture):
        raise CaptureError(f"expected the Capture returned by kmod(...), got {type(capture).__name__}")
    prediction = capture.prediction if prediction is None else prediction
    rule = loss_rule(loss_func)
    rule.check(prediction, targets)
    check_batch(prediction)
    inputs = input_factors(capture, rule.reduction_factor(prediction), approx, diagonal, prediction.shape[0])
    if fisher is FisherType.FORWARD_ONLY:
        grads = identity_factors(capture, diagonal)
    else:
        vectors = backpropagated_vectors(rule, fisher, prediction, targets, mc_samples, generator, chunk_size)
        grads = grad_factors(capture, prediction, vectors, approx, diagonal)
    return {capture.layers[i].name: (inputs[i], grads[i]) for i in inputs}


def check_batch(prediction: Tensor) -> None:
    """Reject empty batches and predictions without an autograd graph."""
    if prediction.ndim == 0 or prediction.shape[0] == 0:
        raise ValueError("the batch is empty: K-FAC factors need at least one datum")


def backpropagated_vectors(
    rule: LossRule,
    fisher: FisherType,
    prediction: Tensor,
    targets: Tensor | None,
    mc_samples: int,
    generator: torch.Generator | None,
    chunk_size: int = 64,
) -> Iterator[Tensor]:
    """Chunks ``[K, *prediction.shape]`` of backpropagated vectors for ``fisher``."""
    if prediction.grad_fn is None:
        raise CaptureError(
            "the prediction has no autograd graph, so no gradient-based factors can be "
            "computed: run the forward with gradients enabled (not under torch.no_grad() or "
            "torch.inference_mode()) and make sure the prediction depends on a captured layer; "
            "or use fisher_type='forward-only'"
        )
    if fisher is FisherType.TYPE2:
        return rule.type2_vectors(prediction, chunk_size)
    if fisher is FisherType.MC:
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        return iter([rule.mc_vectors(prediction, mc_samples, generator)])
    return iter([rule.empirical_vectors(prediction, targets)])


def layer_indices(capture: Capture) -> list[int]:
    """Indices (into ``capture.layers``) of the layers with at least one use."""
    return sorted(set(capture.slot_layers))


def _outer(rows: Tensor, diagonal: bool, scale: float = 1.0) -> Tensor:
    """``scale · Σ_m r_m r_mᵀ`` per group for rows ``[M, G, D]`` -> ``[G, D, D]`` (or ``[G, D]``)."""
    if diagonal:
        return rows.square().sum(0).mul_(scale)
    return gram(rows, scale)


def _outer_over_positions(rows: Tensor, diagonal: bool) -> Tensor:
    """``Σ_{k,n,s} r rᵀ`` per group for ``rows: [K, N, S, G, D]`` -> ``[G, D, D]`` (or ``[G, D]``).

    When the positions are the fastest axis in memory (conv output gradients
    ``[K, N, C, *spatial]``) and ``S ≥ D``, one batched GEMM ``[D, S] @ [S, D]`` per sample
    plus a sum avoids copying the gradients into row-major ``[K N S, D]`` (the intermediate
    ``[K N, D, D]`` is no larger than the gradients). Measured on a 2-core CPU,
    ``[10, 64, 32, 32²]`` (type-2, small CNN): 93 -> 13 ms.
    """
    k, n, s, g, d = rows.shape
    if not diagonal and g == 1 and s >= d:
        per_sample = rows[:, :, :, 0, :].transpose(2, 3)  # [K, N, D, S]
        if per_sample.is_contiguous():
            per_sample = per_sample.reshape(k * n, d, s)
            return (per_sample @ per_sample.mT).sum(0).unsqueeze(0)
    return _outer(rows.flatten(0, 2), diagonal)


def _ungroup(factor: Tensor, groups: int) -> Tensor:
    return factor[0] if groups == 1 else factor


def input_factors(
    capture: Capture,
    reduction_factor: float,
    approx: KFACApprox,
    diagonal: frozenset[str] = frozenset(),
    batch_size: int | None = None,
) -> dict[int, Tensor]:
    """``A`` of every layer: ``[D_A, D_A]``, ``[G, D_A, D_A]`` with groups, ``[D_A]`` if diagonal.

    ``reduce`` groups each use's rows by datum with its ``BatchAxis`` (see
    :mod:`fxkfac.factors.datum_rows`); ``batch_size`` (default: the prediction's leading
    axis, as for ``B``) is only read for unknown layouts.
    """
    if batch_size is None:
        batch_size = capture_batch_size(capture)
    factors = {}
    for index in layer_indices(capture):
        layer = capture.layers[index]
        rule = factor_rule(layer.kind)
        features = []
        for slot, use in zip(capture.slots_of(index), layer.matches, strict=True):
            layer_input = capture.inputs[slot]
            if layer_input is None:
                raise CaptureError(f"layer {layer.name} was not recorded in this forward pass")
            x = layer_input.detach()
            x = x.to(_accumulation_dtype(x.dtype))
            if approx is KFACApprox.REDUCE:  # [N, m S, G, D]
                features.append(per_datum_inputs(x, layer, use, batch_size))
            else:  # [N m, S, G, D]
                features.append(rule.input_features(x, layer, use))
        if approx is KFACApprox.REDUCE:
            positions = sum(f.shape[1] for f in features)
            rows = sum(f.sum(dim=1) for f in features) / positions  # [N, G, D]
        else:
            rows = (
                features[0].flatten(0, 1)
                if len(features) == 1
                else torch.cat([f.flatten(0, 1) for f in features])
            )
        # R is folded into the GEMM (alpha): no extra pass over, or copy of, a large factor
        if layer.bias is not None:  # x̃ = [x; 1]; mean of the ones is 1 for reduce too
            factor = gram_with_ones(rows, rows.shape[0], layer.name in diagonal, reduction_factor)
        else:
            factor = _outer(rows, layer.name in diagonal, reduction_factor)
        factors[index] = _ungroup(factor, layer.groups)
    return factors


def identity_factors(capture: Capture, diagonal: frozenset[str] = frozenset()) -> dict[int, Tensor]:
    """``B = I`` of every layer (``fisher_type='forward-only'``)."""
    factors = {}
    for index in layer_indices(capture):
        layer = capture.layers[index]
        x = capture.inputs[capture.slots_of(index)[0]]
        dtype = _accumulation_dtype(x.dtype)
        eye = torch.ones(layer.groups, layer.output_factor_dim, dtype=dtype, device=x.device)
        if layer.name not in diagonal:
            eye = torch.diag_embed(eye)
        factors[index] = _ungroup(eye, layer.groups)
    return factors


_internal = threading.local()


def in_internal_backward() -> bool:
    """Whether fxkfac's own factor backward is running (hooks armed for training ignore it)."""
    return getattr(_internal, "active", False)


def _batched_grad(prediction: Tensor, edges: list, vectors: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients ``[K, *z.shape]`` of ``⟨vectors_k, prediction⟩`` w.r.t. each layer output."""
    previous = in_internal_backward()
    _internal.active = True
    try:
        return _batched_grad_unguarded(prediction, edges, vectors)
    finally:
        _internal.active = previous


def _batched_grad_unguarded(prediction: Tensor, edges: list, vectors: Tensor) -> tuple[Tensor | None, ...]:
    if vectors.shape[0] == 1:  # one vector (MC-1, empirical): a plain backward, no vmap
        grads = torch.autograd.grad(prediction, edges, vectors[0], retain_graph=True, allow_unused=True)
        return tuple(None if g is None else g.unsqueeze(0) for g in grads)
    try:
        return torch.autograd.grad(
            prediction, edges, vectors, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError as error:  # an op without a batching rule: one backward per vector
        if "vmap" not in str(error).lower() and "batch" not in str(error).lower():
            raise
        per_vector = [
            torch.autograd.grad(prediction, edges, vector, retain_graph=True, allow_unused=True)
            for vector in vectors
        ]
        return tuple(
            None if grads[0] is None else torch.stack(grads) for grads in zip(*per_vector, strict=True)
        )


def grad_factors(
    capture: Capture,
    prediction: Tensor,
    chunks: Iterable[Tensor],
    approx: KFACApprox,
    diagonal: frozenset[str] = frozenset(),
    observers: Iterable[Any] = (),
) -> dict[int, Tensor]:
    """``B`` of every layer from chunks of backpropagated vectors ``[K, *prediction.shape]``.

    ``observers`` (objects with ``add(grads_by_slot, num_vectors)``, e.g. the EKFAC
    eigenvalue correction) receive the same output gradients as the ``B`` accumulator.
    """
    observers = list(observers)
    slots = [slot for slot, edge in enumerate(capture.output_edges) if edge is not None]
    edges = [capture.output_edges[slot] for slot in slots]
    accumulator = GradFactorAccumulator(capture, approx, diagonal)
    for vectors in chunks:
        grads = _batched_grad(prediction, edges, vectors.detach())
        grads_by_slot = dict(zip(slots, grads, strict=True))
        accumulator.add(grads_by_slot, vectors.shape[0])
        for observer in observers:
            observer.add(grads_by_slot, vectors.shape[0])
    return accumulator.result()


class GradFactorAccumulator:
    """Sums ``Σ g gᵀ`` per layer over chunks of output gradients; :meth:`result` normalizes."""

    def __init__(self, capture: Capture, approx: KFACApprox, diagonal: frozenset[str] = frozenset()):
        self.capture = capture
        self.approx = approx
        self.diagonal = diagonal
        self.sums: dict[int, Tensor] = {}
        self.data: dict[int, int] = {}
        """``N`` per layer (``reduce``), read off the datum-major gradient rows."""

    def add(self, grads_by_slot: dict[int, Tensor | None], num_vectors: int) -> None:
        """Add gradients ``[K, *z.shape]`` per tap slot (``None``: the output is unused)."""
        capture = self.capture
        batch_size = capture_batch_size(capture) if self.approx is KFACApprox.REDUCE else None
        for index in layer_indices(capture):
            layer = capture.layers[index]
            rule = factor_rule(layer.kind)
            per_use = []
            for slot, use in zip(capture.slots_of(index), layer.matches, strict=True):
                grads = grads_by_slot.get(slot)
                if grads is None:
                    x = capture.inputs[slot]
                    grads = x.new_zeros((num_vectors, *capture.output_shapes[slot]))
                grads = grads.detach().to(_accumulation_dtype(grads.dtype))
                if self.approx is KFACApprox.REDUCE:  # [K, N, m S, G, D]
                    rows = per_datum_gradients(grads, layer, use, batch_size)
                    self.data[index] = rows.shape[1]
                else:  # [K, N m, S, G, D]
                    rows = rule.output_gradients(grads, layer)
                per_use.append(rows)
            diagonal = layer.name in self.diagonal
            if self.approx is KFACApprox.REDUCE:
                rows = sum(u.sum(dim=2) for u in per_use).flatten(0, 1)  # [K N, G, D]
                outer = _outer(rows, diagonal)
            elif len(per_use) == 1:  # no concatenation copy for the usual single use
                outer = _outer_over_positions(per_use[0], diagonal)
            else:
                outer = _outer(torch.cat([u.flatten(0, 2) for u in per_use]), diagonal)  # [K N S, G, D]
            self.sums[index] = outer if index not in self.sums else self.sums[index] + outer

    def result(self) -> dict[int, Tensor]:
        """``B = Σ g gᵀ / (N S)`` (expand) or ``/ N`` (reduce) per layer."""
        factors = {}
        for index, total in self.sums.items():
            layer = self.capture.layers[index]
            slots = self.capture.slots_of(index)
            if self.approx is KFACApprox.REDUCE:
                count = self.data[index]
            else:
                count = sum(_rows(self.capture.output_shapes[slot], layer) for slot in slots)
            factors[index] = _ungroup(total / count, layer.groups)
        return factors


def capture_batch_size(capture: Capture) -> int | None:
    """``N`` of the captured forward (the prediction's leading axis), if it can be told."""
    try:
        prediction = capture.prediction
    except CaptureError:
        return None
    return prediction.shape[0] if prediction.ndim else None


def _rows(shape: torch.Size, layer) -> int:
    """``N · S`` of one use: the number of output-gradient outer products per vector."""
    if layer.kind == "linear":
        return max(1, int(torch.Size(shape[:-1]).numel()))
    return shape[0] * int(torch.Size(shape[2:]).numel())
