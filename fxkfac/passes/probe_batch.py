"""Where the batch lies in every layer's input and output.

K-FAC's ``kfac_approx='reduce'`` averages a layer's inputs over the positions of *one datum*
and sums its output gradients over them, so it must know which entries of ``x`` belong to
datum ``n``. The factor rules read ``x: [N, ..., D_in]`` with the batch leading; that is not
what every graph does: under ``torch.export`` ``nn.MultiheadAttention``'s ``in_proj`` sees
``[S, N, E]`` and its ``out_proj`` ``[S · N, E]``, and Swin's ``qkv`` sees
``[N · windows, tokens, C]``. This module finds out, per use of a layer:

* :func:`batch_dependent_nodes` — statically, which graph nodes depend on a model input at
  all. A layer whose input does not (swin_v2's ``cpb_mlp`` maps a parameter table to an
  attention bias broadcast over the batch) has no per-datum inputs: it is not captured.
* :func:`probe_batch_axes` — with example inputs, a :class:`~fxkfac.layers.BatchAxis`
  per use: the compiled module runs twice without gradients, the second time with datum 0
  of the inputs perturbed. Among the layouts the input shape allows (each axis but the
  feature axis, each split ``outer · N · inner`` of it), the one under which datum 0's
  entries change clearly more than any other datum's is the batch layout. Both runs use
  the same random state and the module's buffers are restored, so the probe changes nothing.

Without example inputs the layout is unknown and the rules keep the leading-axis convention
(a batch merged into the leading axis is taken datum-major); the factor driver warns when
the leading axis is not a multiple of the batch size.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from fxkfac.layers import BatchAxis, LayerInfo
from fxkfac.passes.trace import PARAM_PLACEHOLDER_META

_DOMINANT = 2.0
"""How many times the change of any other datum datum 0's change must be, to trust a layout."""

PROBE_BATCH = 4
"""Data the probe runs on: layouts do not depend on the batch size, so a slice of the example
batch suffices (the whole batch only if the model cannot run on the slice)."""


_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "type", "get_device", "element_size"})
_METADATA_FUNCTIONS = frozenset({"sym_size", "sym_numel", "sym_stride", "sym_storage_offset"})


def reads_metadata_only(node: fx.Node) -> bool:
    """Whether ``node`` reads only a tensor's metadata (shape, dtype, device), not its values.

    ``torch.arange(x.shape[1])`` has no batch axis although it is computed from ``x``.
    """
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name.split(".")[0] in _METADATA_FUNCTIONS
    return False


def batch_dependent_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose values depend on a model input (a placeholder that is not a parameter).

    Dependence through metadata alone (:func:`reads_metadata_only`) does not count.
    """
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if PARAM_PLACEHOLDER_META not in node.meta:
                dependent.add(node)
        elif not reads_metadata_only(node) and any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    return dependent


def has_model_inputs(graph: fx.Graph) -> bool:
    """Whether the graph takes any input besides parameters."""
    return any(n.op == "placeholder" and PARAM_PLACEHOLDER_META not in n.meta for n in graph.nodes)


def _candidates(shape: Sequence[int], batch: int, kind: str) -> list[BatchAxis]:
    """Layouts ``x``'s shape allows: each non-feature axis, each ``outer · N · inner`` split."""
    axes = range(1) if kind != "linear" else range(max(len(shape) - 1, 0))
    layouts = []
    for dim in axes:
        if shape[dim] % batch:
            continue
        merged = shape[dim] // batch
        for outer in range(1, merged + 1):
            if merged % outer == 0:
                layouts.append(BatchAxis(dim, outer, merged // outer))
    return layouts


def _datum_masses(change: Tensor, batch: int, layout: BatchAxis) -> Tensor:
    """``[N]``: the change each datum's entries hold if ``layout`` were the batch layout."""
    along = change.movedim(layout.dim, 0).flatten(1).sum(1)  # [outer · N · inner]
    return along.view(layout.outer, batch, layout.inner).sum((0, 2))


def choose_layout(change: Tensor, batch: int, kind: str) -> BatchAxis | None:
    """The layout under which datum 0 holds clearly the most of ``change`` (``[*x.shape]``, ≥ 0).

    Under the true layout only datum 0's entries change, or they dominate: a layer after a
    training-mode batch norm sees every datum change a little. A layout scores datum 0's
    change over the largest change of another datum; it must reach :data:`_DOMINANT`.
    """
    if change.ndim == 0 or float(change.sum()) == 0.0:
        return None
    best, best_score = None, _DOMINANT
    for layout in _candidates(change.shape, batch, kind):
        masses = _datum_masses(change, batch, layout)
        others = float(masses[1:].max())
        score = float("inf") if others == 0.0 else float(masses[0]) / others
        if score > best_score:
            best, best_score = layout, score
    return best


def _perturb_datum_zero(inputs: Sequence[Any], batch: int) -> tuple[Any, ...]:
    """Copies of ``inputs`` with datum 0 of every floating batched tensor changed."""
    generator = torch.Generator().manual_seed(0)
    perturbed = []
    for value in inputs:
        if isinstance(value, Tensor) and value.is_floating_point() and value.ndim and value.shape[0] == batch:
            noise = torch.randn(value.shape[1:], generator=generator, dtype=value.dtype).to(value.device)
            value = value.clone()
            value[0] += noise * (value[0].std() if value[0].numel() > 1 else 1.0) + noise
        perturbed.append(value)
    return tuple(perturbed)


def _slice_batch(inputs: Sequence[Any], batch: int, size: int) -> tuple[Any, ...]:
    """``inputs`` with every tensor of leading axis ``batch`` cut to its first ``size`` data."""
    return tuple(
        value[:size] if isinstance(value, Tensor) and value.ndim and value.shape[0] == batch else value
        for value in inputs
    )


def _batch_size(inputs: Sequence[Any]) -> int | None:
    for value in inputs:
        if isinstance(value, Tensor) and value.ndim:
            return value.shape[0]
    return None


def _run(module: nn.Module, inputs: Sequence[Any], devices: list[torch.device]) -> Any:
    with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
        torch.manual_seed(0)
        with torch.no_grad():
            return module(*inputs)


def _run_twice(
    compiled: nn.Module, inputs: tuple[Any, ...], batch: int, leading: Sequence[Tensor]
) -> tuple[Any, Any] | None:
    """Captures of a run on ``inputs`` and of one with datum 0 perturbed.

    Runs in eval mode (training-mode batch norm would spread datum 0's change over the small
    probe batch); ``None`` when nothing can be perturbed. Buffers and modes are restored.
    """
    perturbed = _perturb_datum_zero(inputs, batch)
    if all(a is b for a, b in zip(perturbed, inputs, strict=True)):
        return None
    state = {name: buffer.clone() for name, buffer in compiled.named_buffers()}
    modes = {module: module.training for module in compiled.modules()}
    devices = list({t.device for t in inputs if isinstance(t, Tensor)})
    compiled.eval()  # batch norm on running statistics: no datum sees another's change
    try:
        _, reference = _run(compiled, (*leading, *inputs), devices)
        _, probed = _run(compiled, (*leading, *perturbed), devices)
    finally:
        for module, training in modes.items():
            module.training = training
        with torch.no_grad():
            for name, buffer in compiled.named_buffers():
                buffer.copy_(state[name])
    return reference, probed


def probe_batch_axes(
    compiled: nn.Module,
    layers: Sequence[LayerInfo],
    example_inputs: Sequence[Any],
    leading: Sequence[Tensor] = (),
) -> list[tuple[BatchAxis | None, ...]] | None:
    """Per layer, the :class:`BatchAxis` of each use, found by perturbing datum 0.

    Args:
        compiled: the rewritten graph module for ``layers``:
            ``out, capture = compiled(*leading, *example_inputs)``.
        layers: its layers.
        example_inputs: inputs of one forward pass; the batch is the first tensor's axis 0.
            The probe runs on its first :data:`PROBE_BATCH` data.
        leading: arguments before the inputs (a functional model's parameter values).

    Returns:
        ``None`` when no layout can be probed (no floating batched input, a batch of one,
        or the forward fails); else, per layer, per use, a layout or ``None`` (unknown).
    """
    full_batch = _batch_size(example_inputs)
    if full_batch is None or full_batch < 2:
        return None
    attempts = [min(full_batch, PROBE_BATCH)] + ([full_batch] if full_batch > PROBE_BATCH else [])
    for batch in attempts:
        inputs = _slice_batch(example_inputs, full_batch, batch)
        try:
            runs = _run_twice(compiled, inputs, batch, leading)
            break
        except Exception as error:  # a model that cannot run on this batch: keep the convention
            failure = error
    else:
        warnings.warn(f"fxkfac could not probe the batch axes of the layer inputs: {failure}", stacklevel=3)
        return None
    if runs is None:
        return None
    reference, probed = runs
    layouts: list[tuple[BatchAxis | None, ...]] = []
    slot = 0
    for layer in layers:
        per_use = []
        for _ in layer.matches:
            x, y = reference.inputs[slot], probed.inputs[slot]
            slot += 1
            if x is None or y is None or x.shape != y.shape or not x.is_floating_point():
                per_use.append(None)
                continue
            change = (y.double() - x.double()).abs()
            per_use.append(choose_layout(change, batch, layer.kind))
        layouts.append(tuple(per_use))
    return layouts


def with_batch_axes(
    layers: Sequence[LayerInfo], layouts: Sequence[tuple[BatchAxis | None, ...]]
) -> list[LayerInfo]:
    """``layers`` with each use's :attr:`~fxkfac.layers.OpMatch.batch` set."""
    return [
        replace(
            layer, matches=tuple(replace(m, batch=b) for m, b in zip(layer.matches, per_use, strict=True))
        )
        for layer, per_use in zip(layers, layouts, strict=True)
    ]
