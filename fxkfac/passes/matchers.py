"""Matchers: one small function per op form, each turning a graph node into an :class:`OpMatch`.

New op kinds are added by registering a matcher, not by editing a chain of ``if``s::

    register_module_matcher(MyLinear, my_matcher)      # call_module nodes, by module type
    register_function_matcher(my_op, my_matcher)        # call_function / call_method nodes

A matcher returns ``None`` when the node does not fit (for example ``x @ y`` with no
parameter operand); the verifier then explains the parameter uses it left over.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxkfac.layers import ConvParams, OpMatch
from fxkfac.passes.param_lookup import ADD_TARGETS, ParamLookup

ModuleMatcher = Callable[[fx.Node, nn.Module, ParamLookup], "OpMatch | None"]
FunctionMatcher = Callable[[fx.Node, ParamLookup], "OpMatch | None"]

MODULE_MATCHERS: dict[type[nn.Module], ModuleMatcher] = {}
FUNCTION_MATCHERS: dict[Any, FunctionMatcher] = {}


def register_module_matcher(module_type: type[nn.Module], matcher: ModuleMatcher) -> None:
    """Register ``matcher`` for ``call_module`` nodes whose module is a ``module_type``."""
    MODULE_MATCHERS[module_type] = matcher


def register_function_matcher(target: Any, matcher: FunctionMatcher) -> None:
    """Register ``matcher`` for ``call_function`` nodes of ``target`` (or a method name)."""
    FUNCTION_MATCHERS[target] = matcher


def match_node(node: fx.Node, root: nn.Module, lookup: ParamLookup) -> OpMatch | None:
    """Return the :class:`OpMatch` for ``node`` or ``None`` when no matcher applies."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        for cls in type(module).__mro__:
            if cls in MODULE_MATCHERS:
                return MODULE_MATCHERS[cls](node, module, lookup)
        return None
    if node.op in ("call_function", "call_method"):
        try:
            matcher = FUNCTION_MATCHERS.get(node.target)
        except TypeError:  # unhashable target
            return None
        return matcher(node, lookup) if matcher is not None else None
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call node, given positionally at ``index`` or as keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tuple(value: Any, ndim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    return tuple(int(v) for v in value)


def _fused_bias(node: fx.Node, lookup: ParamLookup, out_features: int) -> tuple[str, fx.Node] | None:
    """A bias added right after a bias-free linear op (``x @ W.T + b``): ``(name, add node)``."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.op not in ("call_function", "call_method") or user.target not in ADD_TARGETS:
        return None
    if len(user.args) != 2 or user.kwargs:
        return None
    other = user.args[1] if user.args[0] is node else user.args[0]
    ref = lookup.resolve(other)
    if ref is None or ref.transposed or ref.shape != (out_features,):
        return None
    return ref.name, user


def _linear(
    node: fx.Node,
    lookup: ParamLookup,
    input_node: Any,
    weight_node: Any,
    bias_node: Any,
    *,
    weight_transposed_means_out_in: bool,
    call_form: str = "function",
) -> OpMatch | None:
    """Common tail of the functional linear matchers."""
    weight = lookup.resolve(weight_node)
    if weight is None or not isinstance(input_node, fx.Node) or lookup.resolve(input_node):
        return None
    if len(weight.shape) != 2:
        return None
    out_in = weight.transposed == weight_transposed_means_out_in
    layout = "out_in" if out_in else "in_out"
    shape = weight.shape
    out_features = shape[0] if out_in else shape[1]
    output, op_nodes, bias_name = node, (node,), None
    if bias_node is not None:
        bias = lookup.resolve(bias_node)
        if bias is None or bias.transposed or bias.shape != (out_features,):
            return None
        bias_name = bias.name
    else:
        fused = _fused_bias(node, lookup, out_features)
        if fused is not None:
            bias_name, output = fused
            op_nodes = (node, output)
    return OpMatch(
        kind="linear",
        node=output,
        input=input_node,
        weight=weight.name,
        bias=bias_name,
        call_form=call_form,
        weight_layout=layout,
        op_nodes=op_nodes,
        weight_shape=weight.shape,
    )


def match_f_linear(node: fx.Node, lookup: ParamLookup) -> OpMatch | None:
    """``F.linear(x, W, b)``: ``W`` is ``[D_out, D_in]``."""
    return _linear(
        node,
        lookup,
        _arg(node, 0, "input"),
        _arg(node, 1, "weight"),
        _arg(node, 2, "bias"),
        weight_transposed_means_out_in=False,
        call_form=_call_form(node),
    )


def _call_form(node: fx.Node) -> str:
    """``'aten'`` for ATen operator overloads (``torch.export`` graphs), else ``'function'``."""
    return "aten" if isinstance(node.target, torch._ops.OpOverload) else "function"


def match_matmul(node: fx.Node, lookup: ParamLookup) -> OpMatch | None:
    """``x @ W`` (``W`` is ``[D_in, D_out]``) and ``x @ W.T`` (``W`` is ``[D_out, D_in]``)."""
    left, right = _arg(node, 0, "input"), _arg(node, 1, "other")
    if node.op == "call_method":
        left, right = node.args[0], _arg(node, 1, "other")
    return _linear(
        node, lookup, left, right, None, weight_transposed_means_out_in=True, call_form=_call_form(node)
    )


def match_addmm(node: fx.Node, lookup: ParamLookup) -> OpMatch | None:
    """``torch.addmm(b, x, W)`` with ``beta = alpha = 1`` (``W`` is ``[D_in, D_out]``)."""
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    return _linear(
        node,
        lookup,
        _arg(node, 1, "mat1"),
        _arg(node, 2, "mat2"),
        _arg(node, 0, "input"),
        weight_transposed_means_out_in=True,
        call_form=_call_form(node),
    )


def _functional_conv(ndim: int | None, call_form: str = "function") -> FunctionMatcher:
    """Matcher of ``F.conv{ndim}d``-style calls; ``ndim=None`` reads it from the weight."""

    def match(node: fx.Node, lookup: ParamLookup) -> OpMatch | None:
        input_node = _arg(node, 0, "input")
        weight = lookup.resolve(_arg(node, 1, "weight"))
        if weight is None or weight.transposed or not isinstance(input_node, fx.Node):
            return None
        dims = len(weight.shape) - 2 if ndim is None else ndim
        if len(weight.shape) != dims + 2 or dims not in (1, 2, 3):
            return None
        bias_node = _arg(node, 2, "bias")
        bias_name = None
        if bias_node is not None:
            bias = lookup.resolve(bias_node)
            if bias is None:
                return None
            bias_name = bias.name
        padding = _arg(node, 4, "padding", 0)
        groups = _arg(node, 8 if ndim is None else 6, "groups", 1)
        if ndim is None and (_arg(node, 6, "transposed", False) or any(_arg(node, 7, "output_padding", ()))):
            return None
        conv = ConvParams(
            stride=_tuple(_arg(node, 3, "stride", 1), dims),
            padding=padding if isinstance(padding, str) else _tuple(padding, dims),
            dilation=_tuple(_arg(node, 5, "dilation", 1), dims),
            groups=int(groups),
        )
        if any(isinstance(v, fx.Node) for v in (conv.stride, conv.dilation, conv.groups)):
            return None
        return OpMatch(
            kind=f"conv{dims}d",
            node=node,
            input=input_node,
            weight=weight.name,
            bias=bias_name,
            call_form=call_form,
            conv=conv,
            op_nodes=(node,),
            weight_shape=weight.shape,
        )

    return match


def match_linear_module(node: fx.Node, module: nn.Module, lookup: ParamLookup) -> OpMatch:
    """``nn.Linear`` module calls (and subclasses)."""
    return OpMatch(
        kind="linear",
        node=node,
        input=_arg(node, 0, "input"),
        weight=f"{node.target}.weight",
        bias=f"{node.target}.bias" if module.bias is not None else None,
        call_form="module",
        op_nodes=(node,),
    )


def match_conv_module(node: fx.Node, module: nn.Module, lookup: ParamLookup) -> OpMatch | None:
    """``nn.Conv1d/2d/3d`` module calls, including non-zero padding modes."""
    ndim = len(module.kernel_size)
    if getattr(module, "transposed", False):
        return None
    explicit_pad = None
    padding = module.padding
    if module.padding_mode != "zeros":
        explicit_pad = tuple(module._reversed_padding_repeated_twice)
        padding = (0,) * ndim
    conv = ConvParams(
        stride=tuple(module.stride),
        padding=padding if isinstance(padding, str) else tuple(padding),
        dilation=tuple(module.dilation),
        groups=module.groups,
        padding_mode=module.padding_mode,
        explicit_pad=explicit_pad,
    )
    return OpMatch(
        kind=f"conv{ndim}d",
        node=node,
        input=_arg(node, 0, "input"),
        weight=f"{node.target}.weight",
        bias=f"{node.target}.bias" if module.bias is not None else None,
        call_form="module",
        conv=conv,
        op_nodes=(node,),
    )


register_module_matcher(nn.Linear, match_linear_module)
for _conv_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_module_matcher(_conv_type, match_conv_module)
aten = torch.ops.aten
for _target in (F.linear, aten.linear.default):
    register_function_matcher(_target, match_f_linear)
for _target in (
    torch.matmul,
    operator.matmul,
    torch.mm,
    "matmul",
    "mm",
    aten.matmul.default,
    aten.mm.default,
):
    register_function_matcher(_target, match_matmul)
for _target in (torch.addmm, aten.addmm.default):
    register_function_matcher(_target, match_addmm)
for _ndim, _fn in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d)):
    register_function_matcher(_fn, _functional_conv(_ndim))
for _ndim, _packet in ((1, aten.conv1d), (2, aten.conv2d), (3, aten.conv3d)):
    for _overload in ("default", "padding"):
        register_function_matcher(getattr(_packet, _overload), _functional_conv(_ndim, "aten"))
register_function_matcher(aten.convolution.default, _functional_conv(None, "aten"))
