"""Find which graph nodes carry parameters, looking through transposes and views.

A parameter reaches an op as a ``get_attr`` node (traced modules), a ``placeholder``
(functional models ``fn(params, *inputs)``) or through a ``call_module`` node. Ops often
see it transposed (``W.t()``, ``W.T``, ``W.transpose(0, 1)``) or viewed to another shape
(``W.view(6, 4)``, ``W.reshape``, ``W.flatten()``, a weight stored flat):
:class:`ParamLookup` resolves a node to ``(parameter name, transposed, shape)`` so matchers
can tell ``x @ W.T`` from ``x @ W`` and know the shape the op sees. Views must come before
transposes (a view of a transposed matrix reorders its entries and is not looked through).
"""

from __future__ import annotations

import math
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
_VIEW_METHODS = {"view", "reshape", "flatten"}
_VIEW_FUNCTIONS = {
    torch.reshape,
    torch.flatten,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
}
_IDENTITY_FUNCTIONS = {aten.alias.default}


@dataclass(frozen=True)
class ParamRef:
    """A parameter as seen by one op: its qualified name and whether it arrives transposed."""

    name: str
    transposed: bool
    path: tuple[fx.Node, ...]
    """Nodes from the parameter's source node to the node the op consumes."""
    shape: tuple[int, ...] = ()
    """Shape of the parameter after the views on the path, before its transposes."""


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


def _is_view(node: fx.Node) -> bool:
    """``W.view(...)``, ``W.reshape(...)``, ``W.flatten(...)`` and their ATen forms."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def _is_transpose(node: fx.Node) -> bool:
    """A transpose of a matrix: ``W.t()``, ``W.T``, ``W.transpose(0, 1)``, ``W.permute(1, 0)``."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("T", "mT")
    return (
        node.op in ("call_method", "call_function")
        and (node.target in _TRANSPOSE_METHODS or node.target in _TRANSPOSE_FUNCTIONS)
        and _swaps_two_dims(node)
    )


def _viewed_shape(node: fx.Node, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Shape of ``node``'s output, a view of a tensor of ``shape``; ``None`` if not static."""
    numel = math.prod(shape)
    args = list(node.args[1:])
    if node.target in ("flatten", torch.flatten, aten.flatten.using_ints):
        start = args[0] if args else node.kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
        if not (isinstance(start, int) and isinstance(end, int)) or not shape:
            return None
        start, end = start % len(shape), end % len(shape)
        return (*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :])
    sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
    if not sizes:
        sizes = node.kwargs.get("shape", node.kwargs.get("size", ()))
    if not all(isinstance(size, int) for size in sizes) or list(sizes).count(-1) > 1:
        return None
    known = math.prod(size for size in sizes if size != -1)
    if known == 0 or (-1 not in sizes and known != numel) or numel % known:
        return None
    return tuple(numel // known if size == -1 else size for size in sizes)


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
        """Return the parameter a node carries (through views and transposes), if any."""
        if not isinstance(node, fx.Node):
            return None
        path: list[fx.Node] = []
        current = node
        while current not in self.source_nodes:
            if not self.is_transparent(current):
                return None
            path.append(current)
            current = current.args[0]
            if not isinstance(current, fx.Node):
                return None
        path.append(current)
        path.reverse()
        name = self.source_nodes[current]
        shape, transposed = self.shape(name), False
        for step in path[1:]:
            if _is_view(step):
                viewed = None if transposed else _viewed_shape(step, shape)
                if viewed is None:
                    return None
                shape = viewed
            elif _is_transpose(step):
                transposed = not transposed
        if transposed and len(shape) != 2:
            return None
        return ParamRef(name=name, transposed=transposed, path=tuple(path), shape=shape)

    def is_transparent(self, node: fx.Node) -> bool:
        """Whether ``node`` only re-views a parameter (a step :meth:`resolve` looks through)."""
        return _is_identity(node) or _is_transpose(node) or _is_view(node)


ADD_TARGETS = {operator.add, torch.add, "add", aten.add.Tensor}
