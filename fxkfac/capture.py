"""The capture a compiled module returns next to its outputs, and the graph nodes that fill it.

The rewritten graph calls :func:`tap` right after every matched op::

    linear = torch._C._nn.linear(x, fc1_weight, fc1_bias)
    linear = fxkfac.capture.tap(linear, x, capture, 0)

``tap`` returns the op's output unchanged. It keeps the op's input (which autograd keeps
alive anyway for the weight gradient) and the op output's *gradient edge*, so that gradients
with respect to the output can be computed later by ``torch.autograd.grad`` — correct even
when a later in-place op (``ReLU(inplace=True)``) overwrites the output. No module hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from fxkfac.errors import CaptureError

if TYPE_CHECKING:
    from fxkfac.layers import LayerInfo


class Capture:
    """What one forward pass of a compiled module recorded for K-FAC.

    Attributes:
        layers: the compiled module's layers.
        slot_layers: for each tap slot, the index of its layer in ``layers``.
        inputs: per slot, the op input ``x`` (``[N, ..., D_in]`` / ``[N, C_in, *S]``).
        output_edges: per slot, the gradient edge of the op output ``z``.
        output_shapes: per slot, ``z.shape``.
        outputs: the model's outputs (as returned next to the capture).
        owner: identifier of the compiled module that produced the capture.
    """

    def __init__(
        self,
        layers: tuple[LayerInfo, ...],
        slot_layers: tuple[int, ...],
        owner: int,
        callbacks: tuple[Callable[[Capture], None], ...] = (),
    ):
        self.layers = layers
        self.slot_layers = slot_layers
        self.owner = owner
        self.callbacks = callbacks
        self.grad_factors: dict[int, Tensor] | None = None
        """``B`` per layer index, filled during ``loss.backward()`` by an armed optimizer."""
        self.inputs: list[Tensor | None] = [None] * len(slot_layers)
        self.output_edges: list[GradientEdge | None] = [None] * len(slot_layers)
        self.output_shapes: list[torch.Size | None] = [None] * len(slot_layers)
        self.outputs: Any = None

    def record(self, slot: int, layer_input: Tensor, layer_output: Tensor) -> None:
        """Store one op's input and output gradient edge."""
        self.inputs[slot] = layer_input
        self.output_shapes[slot] = layer_output.shape
        if layer_output.requires_grad:
            self.output_edges[slot] = get_gradient_edge(layer_output)

    @property
    def prediction(self) -> Tensor:
        """The model output the loss is computed from (the output, or its first tensor)."""
        outputs = self.outputs
        if isinstance(outputs, Tensor):
            return outputs
        if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
            return outputs[0]
        if isinstance(outputs, dict) and outputs:
            first = next(iter(outputs.values()))
            if isinstance(first, Tensor):
                return first
        raise CaptureError(
            f"cannot find the prediction tensor in the model outputs ({type(outputs).__name__}); "
            "pass it explicitly: cap.factors(..., prediction=out['logits'])"
        )

    def slots_of(self, layer_index: int) -> list[int]:
        """Tap slots (uses) belonging to one layer."""
        return [slot for slot, index in enumerate(self.slot_layers) if index == layer_index]

    def factors(self, loss_func: nn.Module, targets: Tensor, **kwargs: Any):
        """K-FAC factors ``{layer name: (A, B)}``; see :func:`fxkfac.factors.compute_factors`."""
        from fxkfac.factors.compute import compute_factors

        return compute_factors(self, loss_func, targets, **kwargs)

    def __repr__(self) -> str:
        recorded = sum(x is not None for x in self.inputs)
        return f"Capture({len(self.layers)} layers, {recorded}/{len(self.inputs)} uses recorded)"


class CaptureFactory(nn.Module):
    """Submodule of the rewritten graph that creates a fresh :class:`Capture` per call."""

    def __init__(self, layers: tuple[LayerInfo, ...], slot_layers: tuple[int, ...]):
        super().__init__()
        self.layers = layers
        self.slot_layers = slot_layers
        self.owner = id(self)
        self.callbacks: list[Callable[[Capture], None]] = []
        """Called with each finished capture (optimizers arm their backward hooks here)."""

    def forward(self) -> Capture:
        """Return an empty capture for this forward pass."""
        return Capture(self.layers, self.slot_layers, self.owner, tuple(self.callbacks))


def tap(layer_output: Tensor, layer_input: Tensor, capture: Capture, slot: int) -> Tensor:
    """Record one matched op in ``capture``; returns ``layer_output`` (same values).

    A layer whose output needs no gradient (its parameters and everything upstream are
    frozen) still has curvature: with gradients enabled its output becomes a graph leaf
    so gradients with respect to it exist. Nothing upstream requires grad, so no
    parameter gradient changes.
    """
    if torch.is_grad_enabled() and not layer_output.requires_grad and layer_output.is_floating_point():
        layer_output = layer_output.detach().requires_grad_()
    capture.record(slot, layer_input, layer_output)
    return layer_output


def finish(capture: Capture, outputs: Any) -> Capture:
    """Record the model outputs in ``capture``; the graph returns ``(outputs, capture)``."""
    capture.outputs = outputs
    for callback in capture.callbacks:
        callback(capture)
    return capture
