"""``fxkfac.compile``: trace, match, verify, rewrite — one entry point for every model form."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from fxkfac.compiled_module import CompiledModule, parameters_of
from fxkfac.errors import FxKfacError, TraceError
from fxkfac.passes.find_layers import find_layers
from fxkfac.passes.probe_batch import probe_batch_axes, with_batch_axes
from fxkfac.passes.rewrite import CAPTURE_MODULE, insert_captures
from fxkfac.passes.trace import trace_export, trace_function, trace_module

TRACERS = ("auto", "fx", "export")


def compile(
    model: nn.Module | Callable[..., Any],
    *,
    example_inputs: Sequence[Any] | None = None,
    params: Mapping[str, Tensor] | None = None,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: Mapping[str, Any] | None = None,
    tracer: str = "auto",
) -> CompiledModule:
    """Compile a model into a module that returns ``(outputs, capture)``.

    Args:
        model: an ``nn.Module``, an already traced ``torch.fx.GraphModule``, or a function
            ``fn(params: dict[str, Tensor], *inputs)``.
        example_inputs: inputs of one forward pass (a tuple). For functional models they
            fix the number of inputs (otherwise read from ``fn``'s signature).
        params: the parameter dict of a functional model (required for functions).
        leaf_modules: module types or qualified names not to trace into; their
            parameters are listed in ``kmod.uncaptured``.
        concrete_args: forward arguments fixed while tracing (``torch.fx`` semantics).
        tracer: ``'fx'`` (symbolic tracing), ``'export'`` (``torch.export``, non-strict,
            ATen-level; needs ``example_inputs``) or ``'auto'``: fx, and export when fx
            fails and example inputs are given. ``kmod.tracer`` says which one was used.

    With ``example_inputs`` the compiled module runs twice more (no gradients) to find
    where the batch lies in every layer's input (:mod:`fxkfac.passes.probe_batch`), which
    ``kfac_approx='reduce'`` needs for inputs like ``[S, N, E]`` or ``[N · windows, T, C]``.

    Returns:
        A :class:`CompiledModule` sharing the model's parameters.

    Raises:
        TraceError: the model cannot be traced (names the failing line and the fixes).
    """
    if tracer not in TRACERS:
        raise FxKfacError(f"unknown tracer {tracer!r}; choose one of {', '.join(TRACERS)}")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    functional_params = None
    if isinstance(model, fx.GraphModule):
        gm, tracer_used = model, "graph_module"
        if params is not None:
            raise FxKfacError("params= is only for functional models fn(params, *inputs)")
    elif isinstance(model, nn.Module):
        if params is not None:
            raise FxKfacError(
                "params= is only for functional models fn(params, *inputs); an nn.Module "
                "brings its own parameters"
            )
        gm, tracer_used = _trace_module(model, tracer, example_inputs, leaf_modules, concrete_args)
    elif callable(model):
        if params is None:
            raise FxKfacError(
                "a functional model needs its parameters: "
                "fxkfac.compile(fn, params={'w': w, ...}, example_inputs=(x,))"
            )
        if not all(isinstance(p, Tensor) for p in params.values()):
            raise FxKfacError("params must map parameter names to tensors")
        functional_params = dict(params)
        gm, tracer_used = (
            trace_function(model, functional_params, _num_inputs(model, example_inputs)),
            "fx",
        )
    else:
        raise FxKfacError(
            f"cannot compile a {type(model).__name__}: pass an nn.Module, a "
            "torch.fx.GraphModule, or a function fn(params, *inputs) with params="
        )
    layers, uncaptured = find_layers(gm, functional_params)
    if (
        tracer == "auto"
        and tracer_used == "fx"
        and example_inputs is not None
        and _hidden_by_wrapping(uncaptured)
    ):
        # parameters passed into wrapped functions (swin_t's attention): torch.export sees inside
        try:
            exported = trace_export(model, tuple(example_inputs))
        except TraceError:
            exported = None
        if exported is not None:
            export_layers, export_uncaptured = find_layers(exported, None)
            if len(export_uncaptured) < len(uncaptured):
                gm, tracer_used, layers, uncaptured = exported, "export", export_layers, export_uncaptured
    if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule):
        for name, _ in model.named_parameters():
            if name not in uncaptured and not any(name in (x.weight, x.bias) for x in layers):
                uncaptured.setdefault(name, "not used in the traced forward")
        all_params = dict(model.named_parameters())
    else:
        all_params = parameters_of(gm, functional_params)
    rewritten = insert_captures(gm, layers)
    if example_inputs is not None and layers:
        leading = tuple(functional_params.values()) if functional_params is not None else ()
        layouts = probe_batch_axes(rewritten, layers, tuple(example_inputs), leading)
        if layouts is not None:
            layers = with_batch_axes(layers, layouts)
            rewritten.get_submodule(CAPTURE_MODULE).layers = tuple(layers)
    return CompiledModule(
        rewritten, layers, uncaptured, all_params, functional_params, tracer_used, traced=gm
    )


def _hidden_by_wrapping(uncaptured: Mapping[str, str]) -> bool:
    return any("wrapped function" in reason for reason in uncaptured.values())


def _trace_module(
    model: nn.Module,
    tracer: str,
    example_inputs: Sequence[Any] | None,
    leaf_modules: Iterable[type[nn.Module] | str],
    concrete_args: Mapping[str, Any] | None,
) -> tuple[fx.GraphModule, str]:
    """Trace an ``nn.Module`` with the requested tracer; ``(graph module, tracer used)``."""
    if tracer == "export":
        if example_inputs is None:
            raise FxKfacError("tracer='export' needs example_inputs=(x, ...)")
        return trace_export(model, tuple(example_inputs)), "export"
    try:
        return trace_module(model, leaf_modules, concrete_args), "fx"
    except TraceError as fx_error:
        if tracer == "fx" or example_inputs is None:
            raise
        try:
            return trace_export(model, tuple(example_inputs)), "export"
        except TraceError as export_error:
            raise TraceError(f"{fx_error} torch.export failed too: {export_error}") from export_error


def _num_inputs(fn: Callable[..., Any], example_inputs: Sequence[Any] | None) -> int:
    if example_inputs is not None:
        return len(example_inputs)
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise FxKfacError("pass example_inputs=(x,) to compile a functional model") from exc
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        raise FxKfacError("fn takes *args: pass example_inputs=(x, ...) to fix the input count")
    return len(parameters) - 1


__all__ = ["compile"]
_ = torch
