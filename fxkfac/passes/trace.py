"""Trace models into ``torch.fx`` graphs: modules, functional models and traced graphs.

* :func:`trace_module` — an ``nn.Module`` through :class:`KFACTracer`, an ``fx.Tracer``
  whose leaves are the standard leaves plus the user's ``leaf_modules``. Linear and
  convolution modules stay leaves so that their calls are matched as module calls.
* :func:`trace_function` — ``fn(params: dict[str, Tensor], *inputs)``; each parameter
  becomes a graph placeholder, so the graph is a pure function of parameters and inputs.
  ``torch.func.functional_call(module, params, inputs)`` inside ``fn`` is traced through
  (:mod:`fxkfac.passes.functional_call`).

A failed trace raises :class:`~fxkfac.errors.TraceError` naming the model line that failed
and the ways out (leaf modules, concrete arguments).
"""

from __future__ import annotations

import inspect
import linecache
import os
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxkfac.errors import TraceError
from fxkfac.passes.decompositions import MODULE_DECOMPOSITIONS
from fxkfac.passes.functional_call import proxy_functional_call

PARAM_PLACEHOLDER_META = "fxkfac_param"
"""``node.meta`` key naming the parameter a functional model's placeholder carries."""

_LIBRARY_DIRS = (
    os.path.dirname(torch.__file__),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
)


class KFACTracer(fx.Tracer):
    """``fx.Tracer`` that also keeps the user's ``leaf_modules`` (types or names) as leaves."""

    def __init__(self, leaf_modules: Iterable[type[nn.Module] | str] = ()):
        super().__init__()
        leaves = tuple(leaf_modules)
        self.leaf_types = tuple(m for m in leaves if isinstance(m, type))
        self.leaf_names = {m for m in leaves if isinstance(m, str)}

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Trace supported modules through a decomposition (e.g. ``nn.MultiheadAttention``).

        A module built at run time (``nn.Sequential(self.a, nn.Tanh(), self.b)(x)``) is not
        installed on the model, so it has no qualified name: it is traced through (inlined),
        and the installed modules it calls keep their names. Such a module with parameters
        or buffers of its own raises :class:`~fxkfac.errors.TraceError` (they would be
        constants of the graph, invisible to K-FAC and the optimizer).
        """
        if not self._is_installed(m):
            own = [name for name, _ in m.named_parameters(recurse=False)]
            own += [name for name, _ in m.named_buffers(recurse=False)]
            if own:
                raise TraceError(
                    f"{type(m).__name__} is created in forward (not installed on the model) and "
                    f"holds its own tensors {own}: install it as a submodule in __init__"
                )
            return forward(*args, **kwargs)
        decomposition = MODULE_DECOMPOSITIONS.get(type(m))
        qualified_name = self.path_of_module(m)
        user_leaf = isinstance(m, self.leaf_types) or qualified_name in self.leaf_names
        if decomposition is not None and not user_leaf:
            result = decomposition(m, *args, **kwargs)
            if result is not None:
                return result
        return super().call_module(m, forward, args, kwargs)

    def _is_installed(self, m: nn.Module) -> bool:
        """Whether ``m`` is the root or one of its submodules (has a qualified name)."""
        try:
            self.path_of_module(m)
        except NameError:
            return False
        return True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Standard leaves, plus user leaves given by type or qualified name."""
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _failing_user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost frame outside torch and fxkfac, if any."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_LIBRARY_DIRS):
            code = frame.line or linecache.getline(frame.filename, frame.lineno).strip()
            return f"{frame.filename}:{frame.lineno} in {frame.name}: `{code}`"
    return ""


def trace_error(exc: BaseException, what: str) -> TraceError:
    """Turn a tracing exception into a :class:`TraceError` with location and fixes."""
    where = _failing_user_frame(exc)
    location = f" at {where}" if where else ""
    return TraceError(
        f"torch.fx could not trace {what}{location}: {type(exc).__name__}: {exc}. "
        "Fixes: mark the submodule that holds this code as a leaf "
        "(compile(..., leaf_modules=[MyBlock])) — its Linear/Conv parameters are then "
        "listed in kmod.uncaptured; fix non-tensor arguments with "
        "compile(..., concrete_args={'flag': True}); or trace with torch.export: "
        "compile(..., tracer='export', example_inputs=(x,))."
    )


def trace_module(
    model: nn.Module,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace an ``nn.Module``.

    Args:
        model: the model.
        leaf_modules: extra module types or qualified names not to trace into.
        concrete_args: forward arguments fixed to concrete values while tracing.

    Returns:
        A ``GraphModule`` sharing the model's parameters.
    """
    tracer = KFACTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as exc:  # fx raises many exception types
        raise trace_error(exc, type(model).__name__) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def trace_export(
    model: nn.Module, example_inputs: tuple[Any, ...], example_kwargs: Mapping[str, Any] | None = None
) -> fx.GraphModule:
    """Trace with ``torch.export`` (non-strict) at the ATen level.

    Parameters stay shared with ``model`` and appear as ``get_attr`` nodes under their
    qualified names, so layer names match the ``torch.fx`` path. The graph is specialized
    to the example inputs' shapes where the model branches on them. A single-tensor
    output is returned as the tensor; other outputs as the tuple of their leaves.
    """
    try:
        program = torch.export.export(model, tuple(example_inputs), dict(example_kwargs or {}), strict=False)
    except Exception as exc:
        raise trace_error(exc, f"{type(model).__name__} with torch.export").with_traceback(None) from exc
    gm = program.module()
    out_spec = getattr(gm, "_out_spec", None)
    gm.graph._codegen = fx.graph.CodeGen()  # plain signature and outputs; no pytree codegen
    output = gm.graph.output_node()
    leaves = output.args[0]
    if out_spec is not None and out_spec.is_leaf() and isinstance(leaves, (tuple, list)) and len(leaves) == 1:
        output.args = (leaves[0],)
    gm.recompile()
    return gm


def trace_function(
    fn: Callable[..., Any],
    params: Mapping[str, torch.Tensor],
    num_inputs: int,
) -> fx.GraphModule:
    """Trace ``fn(params, *inputs)``; parameters become the graph's first placeholders.

    Args:
        fn: the functional model.
        params: ``{name: tensor}`` passed as ``fn``'s first argument.
        num_inputs: how many positional inputs follow ``params``.

    Returns:
        A ``GraphModule`` whose ``forward(*param_values, *inputs)`` calls ``fn``; each
        parameter placeholder has ``node.meta["fxkfac_param"]`` set to its name.
    """
    tracer = fx.Tracer()
    tracer.root = nn.Module()
    tracer.graph = fx.Graph(tracer_cls=fx.Tracer)
    tracer.tensor_attrs = {}
    proxies = {}
    for index, name in enumerate(params):
        proxy = tracer.create_proxy("placeholder", f"param_{index}", (), {})
        proxy.node.meta[PARAM_PLACEHOLDER_META] = name
        proxies[name] = proxy
    try:
        signature = inspect.signature(fn)
        arg_names = [p for p in signature.parameters][1 : 1 + num_inputs]
    except (TypeError, ValueError):
        arg_names = []
    arg_names += [f"input_{i}" for i in range(len(arg_names), num_inputs)]
    inputs = [tracer.create_proxy("placeholder", name, (), {}) for name in arg_names]
    try:
        with proxy_functional_call():
            output = fn(proxies, *inputs)
        tracer.create_node("output", "output", (tracer.create_arg(output),), {})
    except TraceError:  # already names the problem and its fix
        raise
    except Exception as exc:
        name = getattr(fn, "__name__", type(fn).__name__)
        raise trace_error(exc, f"function {name}") from exc
    return fx.GraphModule(tracer.root, tracer.graph, getattr(fn, "__name__", "functional"))
