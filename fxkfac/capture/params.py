"""Find which graph nodes carry parameters, looking through transposes and views.

A parameter reaches an op as a ``get_attr`` node (traced modules), a ``placeholder``
(functional models ``fn(params, *inputs)``) or through a ``call_module`` node. Ops often
see it transposed (``W.t()``, ``W.T``, ``W.transpose(0, 1)``): :class:`ParamLookup` resolves
a node to ``(parameter name, transposed)`` so matchers can tell ``x @ W.T`` from ``x @ W``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten
_T = {"t", torch.t, aten.t.default}
_PERMUTE = {"permute", torch.permute, aten.permute.default}
_TRANSPOSE = {"transpose", torch.transpose, aten.transpose.int}
_TRANSPOSE_FUNCTIONS = {
    torch.t,
    torch.transpose,
    torch.permute,
    aten.t.default,
    aten.transpose.int,
    aten.permute.default,
}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}
_IDENTITY_METHODS = {"contiguous"}
_IDENTITY_FUNCTIONS = {aten.alias.default}


@dataclass(frozen=True)
class ParamRef:
    """A parameter as seen by one op: its qualified name and whether it arrives transposed."""

    name: str
    transposed: bool
    path: tuple[fx.Node, ...]
    """Nodes from the parameter's source node to the node the op consumes."""


def _swaps_two_dims(node: fx.Node) -> bool:
    """Whether a transpose/permute node swaps the two dims of a matrix."""
    target = node.target
    if target in _T:
        return True
    args = list(node.args[1:]) + list(node.kwargs.values())
    if target in _PERMUTE:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return list(dims) in ([1, 0], [-1, -2], [1, -2], [-1, 0])
    if target in _TRANSPOSE:
        return len(args) == 2 and {int(a) % 2 for a in args if isinstance(a, int)} == {0, 1}
    return False


def _is_identity(node: fx.Node) -> bool:
    """``x.contiguous()`` or ``aten.alias(x)``: the same values under another name."""
    if node.op == "call_method":
        return node.target in _IDENTITY_METHODS
    return node.op == "call_function" and node.target in _IDENTITY_FUNCTIONS


class ParamLookup:
    """Maps graph nodes to the parameters they carry.

    Args:
        source_nodes: ``{node: parameter name}`` for the nodes that introduce parameters
            (``get_attr`` of a parameter, placeholders of a functional model).
        params: ``{parameter name: tensor}``, used for shapes.
    """

    def __init__(self, source_nodes: dict[fx.Node, str], params: dict[str, torch.Tensor]):
        self.source_nodes = source_nodes
        self.params = params

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a parameter."""
        return tuple(self.params[name].shape)

    def resolve(self, node: object) -> ParamRef | None:
        """Return the parameter a node carries (through transposes of matrices), if any."""
        if not isinstance(node, fx.Node):
            return None
        path: list[fx.Node] = []
        transposed = False
        current = node
        while current not in self.source_nodes:
            path.append(current)
            if _is_identity(current):
                current = current.args[0]
            elif (
                current.op in ("call_method", "call_function")
                and (current.target in _TRANSPOSE_METHODS or current.target in _TRANSPOSE_FUNCTIONS)
                and _swaps_two_dims(current)
            ) or (
                current.op == "call_function" and current.target is getattr and current.args[1] in ("T", "mT")
            ):
                transposed = not transposed
                current = current.args[0]
            else:
                return None
            if not isinstance(current, fx.Node):
                return None
        path.append(current)
        name = self.source_nodes[current]
        if transposed and len(self.shape(name)) != 2:
            return None
        return ParamRef(name=name, transposed=transposed, path=tuple(reversed(path)))

    def is_transparent(self, node: fx.Node) -> bool:
        """Whether ``node`` only re-views a parameter (a step :meth:`resolve` looks through)."""
        if _is_identity(node):
            return True
        if node.op in ("call_method", "call_function") and (
            node.target in _TRANSPOSE_METHODS or node.target in _TRANSPOSE_FUNCTIONS
        ):
            return _swaps_two_dims(node)
        return node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT")


ADD_TARGETS = {operator.add, torch.add, "add", aten.add.Tensor}
