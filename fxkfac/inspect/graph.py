"""The rewritten graph as a ``networkx.DiGraph``, with GraphML and DOT export.

Node attributes: ``op`` (fx opcode), ``target`` (what it calls), ``shape`` (when example
inputs were given to propagate shapes), ``layer`` (captured layer the node computes or
taps, else ``""``), ``role`` (``"op"``, ``"tap"``, ``"capture"`` or ``""``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from fxkfac.capture import finish, tap

if TYPE_CHECKING:
    from fxkfac.compiled_module import CompiledModule


def _target_text(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def _propagate_shapes(kmod: CompiledModule, example_inputs: tuple[Any, ...]) -> None:
    """Annotate node shapes; in eval mode and without gradients, so no state changes."""
    gm = kmod.graph_module
    modes = {module: module.training for module in gm.modules()}
    inputs = (*kmod.params.values(), *example_inputs) if kmod.params else example_inputs
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    finally:
        for module, training in modes.items():
            module.training = training


def to_networkx(kmod: CompiledModule, example_inputs: tuple[Any, ...] | None = None) -> nx.DiGraph:
    """Directed graph of ``kmod.graph_module`` (edges follow data flow)."""
    gm = kmod.graph_module
    if example_inputs is not None:
        _propagate_shapes(kmod, tuple(example_inputs))
    op_layer = {}
    for layer in kmod.layers:
        for name in layer.nodes:
            op_layer[name] = layer.name
    graph = nx.DiGraph(name=type(gm).__name__)
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shape = "x".join(map(str, meta.shape)) if hasattr(meta, "shape") else ""
        role, layer = "", op_layer.get(node.name, "")
        if node.op == "call_function" and node.target is tap:
            role, layer = "tap", op_layer.get(node.args[0].name, "")
        elif (node.op == "call_function" and node.target is finish) or node.name == "capture":
            role = "capture"
        elif layer:
            role = "op"
        graph.add_node(node.name, op=node.op, target=_target_text(node), shape=shape, layer=layer, role=role)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def write_graph(graph: nx.DiGraph, path: str | Path) -> Path:
    """Write ``graph`` as GraphML (``.graphml``) or Graphviz DOT (``.dot``/``.gv``)."""
    path = Path(path)
    if path.suffix == ".graphml":
        nx.write_graphml(graph, path)
    elif path.suffix in (".dot", ".gv"):
        path.write_text(to_dot(graph))
    else:
        raise ValueError(f"unknown graph format {path.suffix!r}: use .graphml or .dot")
    return path


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT text; captured ops and taps are filled (networkx's own DOT writer needs pydot)."""
    colors = {"op": "lightblue", "tap": "orange", "capture": "lightgray"}

    def quote(text: str) -> str:
        return '"' + text.replace('"', '\\"') + '"'

    lines = [f"digraph {quote(graph.graph.get('name', 'fxkfac'))} {{", "  node [shape=box, fontsize=10];"]
    for name, data in graph.nodes(data=True):
        label = f"{name}\\n{data['target']}" + (f"\\n[{data['shape']}]" if data["shape"] else "")
        style = f", style=filled, fillcolor={colors[data['role']]}" if data["role"] in colors else ""
        lines.append(f"  {quote(name)} [label={quote(label)}{style}];")
    lines.extend(f"  {quote(u)} -> {quote(v)};" for u, v in graph.edges)
    lines.append("}")
    return "\n".join(lines) + "\n"
