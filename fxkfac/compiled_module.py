"""The compiled module users hold: ``out, cap = kmod(*inputs)`` plus introspection."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from fxkfac.capture import Capture
from fxkfac.errors import InputMismatchError
from fxkfac.layers import LayerInfo

_DTYPE_OR_DEVICE_ERROR = re.compile(
    r"dtype|device|scalar type|type \(|Expected all tensors|should be the same", re.IGNORECASE
)
"""Messages of torch's dtype / device mismatch errors (others are re-raised as they are)."""


class CompiledModule(nn.Module):
    """A model rewritten to return K-FAC captures next to its outputs.

    Attributes:
        graph_module: the rewritten ``torch.fx.GraphModule`` (``forward`` returns
            ``(outputs, capture)``); shares parameters with the original model.
        layers: the captured layers, in graph order.
        uncaptured: ``{parameter name: reason}`` for parameters K-FAC does not precondition.
        params: for functional models, the ``{name: tensor}`` dict passed to the function.
        tracer: which tracer produced the graph (``'fx'``, ``'graph_module'``).
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        layers: list[LayerInfo],
        uncaptured: dict[str, str],
        parameters: Mapping[str, Tensor],
        functional_params: dict[str, Tensor] | None = None,
        tracer: str = "fx",
        traced: fx.GraphModule | None = None,
    ):
        super().__init__()
        self.graph_module = graph_module
        self._traced = [traced]  # the graph before the rewrite (a list: not a submodule)
        self.layers = list(layers)
        self.uncaptured = dict(uncaptured)
        self.params = functional_params
        self.tracer = tracer
        self._parameters_by_name = dict(parameters)

    def forward(self, *inputs: Any, **kwargs: Any) -> tuple[Any, Capture]:
        """Run the model; returns ``(outputs, capture)``.

        Raises:
            InputMismatchError: the forward failed with a dtype or device error and the
                inputs' dtype or device differs from the parameters' (the message names both
                and the fix).
        """
        try:
            if self.params is not None:
                return self.graph_module(*self.params.values(), *inputs, **kwargs)
            return self.graph_module(*inputs, **kwargs)
        except RuntimeError as error:
            if isinstance(error, InputMismatchError) or not _DTYPE_OR_DEVICE_ERROR.search(str(error)):
                raise
            mismatch = describe_input_mismatch(self._parameters_by_name.values(), (inputs, kwargs))
            if mismatch is None:
                raise
            raise InputMismatchError(f"{mismatch} (the forward failed with: {error})") from error

    @property
    def code(self) -> str:
        """Generated Python source of the rewritten graph."""
        return self.graph_module.code

    @property
    def traced(self) -> fx.GraphModule | None:
        """The traced graph module before the rewrite."""
        return self._traced[0]

    def to_networkx(self, example_inputs: tuple[Any, ...] | None = None):
        """The rewritten graph as a ``networkx.DiGraph`` (see :mod:`fxkfac.inspect.graph`)."""
        from fxkfac.inspect.graph import to_networkx

        return to_networkx(self, example_inputs)

    def print_summary(self, **settings: str) -> None:
        """Print rich tables of the layers and the uncaptured parameters."""
        from fxkfac.inspect.summary import print_summary

        print_summary(self, **settings)

    def named_model_parameters(self) -> dict[str, Tensor]:
        """``{qualified name: parameter}`` with the names ``layers``/``uncaptured`` use."""
        return dict(self._parameters_by_name)

    def layer(self, name: str) -> LayerInfo:
        """The :class:`LayerInfo` called ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no captured layer named {name!r}; layers: {[x.name for x in self.layers]}")

    def summary(self) -> str:
        """Plain-text table of the captured layers (with factor memory) and the uncaptured parameters.

        :meth:`print_summary` prints the same table with rich, plus the K-FAC settings.
        """
        from fxkfac.inspect.summary import (
            LAYER_COLUMNS,
            factor_bytes,
            factor_entries,
            format_bytes,
            layer_rows,
        )

        rows = [LAYER_COLUMNS, *layer_rows(self)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(LAYER_COLUMNS))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        total = sum(factor_entries(layer) for layer in self.layers)
        memory = format_bytes(sum(factor_bytes(layer, self) for layer in self.layers))
        lines.append(f"{len(self.layers)} layers captured, {total:,} factor entries ({memory})")
        if self.uncaptured:
            lines.append(f"{len(self.uncaptured)} parameters not preconditioned by K-FAC:")
            lines.extend(f"  {name}: {reason}" for name, reason in self.uncaptured.items())
        else:
            lines.append("every parameter is preconditioned by K-FAC")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        """Short description shown by ``print(kmod)``."""
        return f"layers={len(self.layers)}, uncaptured={len(self.uncaptured)}, tracer={self.tracer!r}"


def describe_input_mismatch(parameters: Iterable[Tensor], inputs: Any) -> str | None:
    """Why ``inputs`` do not fit ``parameters`` (dtype or device), or ``None`` if they do.

    Only consulted after a forward failed, so models that cast their inputs themselves (or
    run under autocast) are never second-guessed.

    Args:
        parameters: the model's parameters.
        inputs: the forward's inputs (any nesting of tuples, lists and dicts).

    Returns:
        A message naming the mismatch and the fix, or ``None``.
    """
    params = [p for p in parameters if isinstance(p, Tensor)]
    tensors = [x for x in tree_leaves(inputs) if isinstance(x, Tensor)]
    param_devices = {p.device for p in params}
    for x in tensors:
        if len(param_devices) == 1 and x.device not in param_devices:
            (device,) = param_devices
            if device.type == "meta":
                return (
                    f"the model's parameters are on the 'meta' device (no data) and the inputs on "
                    f"{x.device}: materialize the model first, e.g. model.to_empty(device='{x.device}') "
                    "and load or initialize its weights"
                )
            return (
                f"the inputs are on {x.device} but the model's parameters are on {device}: move "
                f"the inputs (x.to('{device}')) or the model (model.to('{x.device}'))"
            )
    param_dtypes = {p.dtype for p in params if p.is_floating_point()}
    for x in tensors:
        if len(param_dtypes) == 1 and x.is_floating_point() and x.dtype not in param_dtypes:
            (dtype,) = param_dtypes
            return (
                f"the inputs are {x.dtype} but the model's parameters are {dtype}: cast the inputs "
                f"(x.to({dtype})) or the model (model.to({x.dtype}))"
            )
    return None


def parameters_of(gm: nn.Module, functional_params: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """All parameters by canonical name (first name of shared parameters)."""
    named = dict(gm.named_parameters())
    if functional_params:
        named.update(functional_params)
    return named


def requires_grad_params(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The parameters an optimizer updates."""
    return {name: p for name, p in params.items() if isinstance(p, torch.Tensor) and p.requires_grad}
