"""Compute K-FAC factors ``{layer: (A, B)}`` from a :class:`~fxkfac.capture.capture.Capture`.

Convention (tutorial Definition 23; Eschenhagen et al., 2023 for weight sharing)::

    expand:  A = R Σ_{n,s} x̃_{n,s} x̃_{n,s}ᵀ          B = 1/(N S) Σ_{n,s,c} g_{n,s,c} g_{n,s,c}ᵀ
    reduce:  A = R Σ_n x̄_n x̄_nᵀ,  x̄_n = mean_s x̃   B = 1/N Σ_{n,c} ḡ_{n,c} ḡ_{n,c}ᵀ,  ḡ = Σ_s g

``kron(B, A)`` approximates the curvature of ``rvec(W̃)``, ``W̃ = [W.reshape(D_out, -1) | b]``
(``kron(A, B)`` that of ``cvec``). ``g`` are gradients of the backpropagated vectors
(:mod:`fxkfac.curvature.losses`) with respect to the layer output; all vectors of a chunk go
through one batched backward (``is_grads_batched``), never one backward per datum.

Grouped convolutions give stacked factors ``A: [G, D_A, D_A]``, ``B: [G, D_B, D_B]``.
A tied weight (several uses) treats every use as further weight-sharing positions:
expand sums over the positions of all uses (and divides ``B`` by their total count); reduce
averages inputs / sums gradients over all of them. That is exact when the uses feed
separate loss terms of a linear network (see the tests), like the sequence case.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from fxkfac.capture.capture import Capture
from fxkfac.curvature.losses import loss_rule
from fxkfac.errors import CaptureError
from fxkfac.factors.registry import factor_rule


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

    Returns:
        ``{layer name: (A, B)}``; ``A: [D_in (+1), D_in (+1)]``, ``B: [D_out, D_out]``,
        each with a leading group axis ``[G, ., .]`` for grouped convolutions.
    """
    fisher = _enum(FisherType, fisher_type, "fisher_type")
    approx = _enum(KFACApprox, kfac_approx, "kfac_approx")
    if not isinstance(capture, Capture):
        raise CaptureError(
            f"expected the Capture returned by kmod(...), got {type(capture).__name__}"
        )
    if fisher is FisherType.MC and (not isinstance(mc_samples, int) or mc_samples < 1):
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    prediction = capture.prediction if prediction is None else prediction
    rule = loss_rule(loss_func)
    rule.check(prediction, targets)
    if prediction.shape[0] == 0:
        raise ValueError("the batch is empty: K-FAC factors need at least one datum")
    reduction_factor = rule.reduction_factor(prediction)

    input_factors = {
        index: _input_factor(capture, index, approx, reduction_factor) for index in _layers(capture)
    }
    if fisher is FisherType.FORWARD_ONLY:
        grad_factors = {index: _identity_factor(capture, index) for index in input_factors}
    else:
        if prediction.grad_fn is None:
            raise CaptureError(
                "the prediction has no autograd graph: run the forward with gradients "
                "enabled (not under torch.no_grad()) to compute gradient-based factors, or use "
                "fisher_type='forward-only'"
            )
        if fisher is FisherType.TYPE2:
            chunks = rule.type2_vectors(prediction, chunk_size)
        elif fisher is FisherType.MC:
            chunks = iter([rule.mc_vectors(prediction, mc_samples, generator)])
        else:
            chunks = iter([rule.empirical_vectors(prediction, targets)])
        grad_factors = _grad_factors(capture, prediction, chunks, approx)
    return {
        capture.layers[index].name: (input_factors[index], grad_factors[index])
        for index in input_factors
    }


def _layers(capture: Capture) -> list[int]:
    return sorted(set(capture.slot_layers))


def _input_factor(
    capture: Capture, index: int, approx: KFACApprox, reduction_factor: float
) -> Tensor:
    """``A`` of one layer: ``[D_A, D_A]`` or ``[G, D_A, D_A]``."""
    layer = capture.layers[index]
    rule = factor_rule(layer.kind)
    features = []
    for slot, use in zip(capture.slots_of(index), layer.matches, strict=True):
        layer_input = capture.inputs[slot]
        if layer_input is None:
            raise CaptureError(
                f"layer {layer.name} was not recorded in this forward pass (its op did not run)"
            )
        x = layer_input.detach()
        x = x.to(_accumulation_dtype(x.dtype))
        features.append(rule.input_features(x, layer, use))  # [N, S, G, D]
    if approx is KFACApprox.REDUCE:
        positions = sum(f.shape[1] for f in features)
        x = sum(f.sum(dim=1) for f in features) / positions  # [N, G, D]
    else:
        x = torch.cat([f.flatten(0, 1) for f in features])  # [N S, G, D]
    factor = torch.einsum("mgi,mgj->gij", x, x) * reduction_factor
    return factor[0] if layer.groups == 1 else factor


def _identity_factor(capture: Capture, index: int) -> Tensor:
    layer = capture.layers[index]
    x = capture.inputs[capture.slots_of(index)[0]]
    eye = torch.eye(layer.output_factor_dim, dtype=_accumulation_dtype(x.dtype), device=x.device)
    return eye if layer.groups == 1 else eye.expand(layer.groups, -1, -1).clone()


def _batched_grad(prediction: Tensor, edges: list, vectors: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients ``[K, *z.shape]`` of ``⟨vectors_k, prediction⟩`` w.r.t. each layer output."""
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
            None if grads[0] is None else torch.stack(grads)
            for grads in zip(*per_vector, strict=True)
        )


def _grad_factors(
    capture: Capture, prediction: Tensor, chunks, approx: KFACApprox
) -> dict[int, Tensor]:
    """``B`` of every layer, accumulated over chunks of backpropagated vectors."""
    slots = [slot for slot, edge in enumerate(capture.output_edges) if edge is not None]
    edges = [capture.output_edges[slot] for slot in slots]
    sums: dict[int, Tensor] = {}
    for vectors in chunks:
        grads_by_slot = dict(
            zip(slots, _batched_grad(prediction, edges, vectors.detach()), strict=True)
        )
        for index in _layers(capture):
            layer = capture.layers[index]
            rule = factor_rule(layer.kind)
            per_use = []
            for slot in capture.slots_of(index):
                grads = grads_by_slot.get(slot)
                if grads is None:
                    shape = (vectors.shape[0], *capture.output_shapes[slot])
                    grads = prediction.new_zeros(shape)
                grads = grads.to(_accumulation_dtype(grads.dtype))
                per_use.append(rule.output_gradients(grads, layer))  # [K, N, S, G, D]
            if approx is KFACApprox.REDUCE:
                g = sum(u.sum(dim=2) for u in per_use).flatten(0, 1)  # [K N, G, D]
            else:
                g = torch.cat([u.flatten(0, 2) for u in per_use])  # [K N S, G, D]
            gram = torch.einsum("mgi,mgj->gij", g, g)
            sums[index] = gram if index not in sums else sums[index] + gram
    factors = {}
    for index, gram in sums.items():
        layer = capture.layers[index]
        slots_of_layer = capture.slots_of(index)
        if approx is KFACApprox.REDUCE:
            count = capture.output_shapes[slots_of_layer[0]][0]
        else:
            count = sum(_rows(capture, slot, layer) for slot in slots_of_layer)
        factor = gram / count
        factors[index] = factor[0] if layer.groups == 1 else factor
    return factors


def _rows(capture: Capture, slot: int, layer) -> int:
    """``N · S`` of one use: the number of output-gradient outer products per vector."""
    shape = capture.output_shapes[slot]
    if layer.kind == "linear":
        return max(1, int(torch.Size(shape[:-1]).numel()))
    return shape[0] * int(torch.Size(shape[2:]).numel())
