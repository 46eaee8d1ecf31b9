"""Rewrite pass: ``GraphModule -> GraphModule`` returning ``(outputs, capture)``.

For every use of every matched layer it inserts a :func:`~fxkfac.capture.tap` node
after the op's output and routes the op's users through it; the graph's output becomes
``(outputs, capture)``. The pass lints the graph and recompiles; the original graph module
is left untouched.
"""

from __future__ import annotations

import copy

import torch.fx as fx

from fxkfac.capture import CaptureFactory, finish, tap
from fxkfac.layers import LayerInfo

CAPTURE_MODULE = "fxkfac_capture"


def insert_captures(gm: fx.GraphModule, layers: list[LayerInfo]) -> fx.GraphModule:
    """Return a copy of ``gm`` whose forward returns ``(outputs, capture)``.

    Args:
        gm: traced graph module (not modified; parameters are shared, not copied).
        layers: layers found by :func:`~fxkfac.passes.find_layers.find_layers` on ``gm``.
    """
    graph = copy.deepcopy(gm.graph)
    node_by_name = {node.name: node for node in graph.nodes}
    slot_layers = []
    uses = []
    for layer_index, layer in enumerate(layers):
        for match in layer.matches:
            slot_layers.append(layer_index)
            uses.append((node_by_name[match.node.name], node_by_name[match.input.name]))

    # the new module shares the submodules, parameters and constants of ``gm``
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            value = gm
            for atom in node.target.split("."):
                value = getattr(value, atom)
            root[node.target] = value
    root[CAPTURE_MODULE] = CaptureFactory(tuple(layers), tuple(slot_layers))

    first_compute = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first_compute):
        capture = graph.call_module(CAPTURE_MODULE, ())
        capture.name = "capture"
    for slot, (output_node, input_node) in enumerate(uses):
        with graph.inserting_after(output_node):
            tapped = graph.call_function(tap, (output_node, input_node, capture, slot))
        output_node.replace_all_uses_with(tapped, delete_user_cb=lambda user, t=tapped: user is not t)

    output = graph.output_node()
    (original,) = output.args
    with graph.inserting_before(output):
        finished = graph.call_function(finish, (capture, original))
    output.args = ((original, finished),)
    graph.lint()
    rewritten = fx.GraphModule(root, graph, gm.__class__.__name__)
    rewritten.recompile()
    return rewritten
