"""Account for every use of every parameter: captured by a matched op, or explained.

:func:`find_layers` runs the matchers over the graph, merges matches that share a weight
(tied weights) into :class:`LayerInfo` records and returns, for every parameter no layer
covers, a reason a user understands ("LayerNorm weight: no K-FAC rule for layer_norm",
"passed into wrapped function shifted_window_attention"). Nothing is dropped silently: a
layer whose weight or bias is also used elsewhere is not preconditioned, and says why.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace

import torch
import torch.fx as fx
from torch import nn

from fxkfac.layers import LayerInfo, OpMatch
from fxkfac.passes.matchers import match_node
from fxkfac.passes.param_lookup import ParamLookup
from fxkfac.passes.probe_batch import batch_dependent_nodes, has_model_inputs


def _snake(name: str) -> str:
    """``LayerNorm`` -> ``layer_norm``, ``BatchNorm2d`` -> ``batch_norm2d``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    return getattr(target, "__name__", str(target))


def _is_wrapped_user_function(node: fx.Node) -> bool:
    """A ``call_function`` of a non-torch Python function (``torch.fx.wrap``-ed)."""
    module = getattr(node.target, "__module__", "") or ""
    torch_module = module == "torch" or module.startswith(("torch.", "torch._"))
    return node.op == "call_function" and not (torch_module or module in ("_operator", "builtins", "math"))


def _reason_for_use(node: fx.Node, param: str, root: nn.Module) -> str:
    """Why the use of ``param`` by ``node`` is not captured."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        kind = type(module).__name__
        short = param[len(node.target) + 1 :] if param.startswith(f"{node.target}.") else param
        return f"{kind} {short}: no K-FAC rule for {_snake(kind)} (module {node.target})"
    if node.op == "output":
        return "returned as a model output"
    if _is_wrapped_user_function(node):
        return f"passed into wrapped function {_target_name(node)} (node {node.name})"
    name = _target_name(node)
    return f"used by {name} (node {node.name}): no K-FAC rule for {name}"


def _canonical_names(root: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for every parameter name (shared modules/params have aliases)."""
    first: dict[int, str] = {}
    canonical: dict[str, str] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        canonical[name] = first.setdefault(id(param), name)
    return canonical


def parameter_sources(gm: fx.GraphModule, canonical: dict[str, str]) -> dict[fx.Node, str]:
    """Nodes that introduce parameters: ``get_attr`` of a parameter, functional placeholders."""
    from fxkfac.passes.trace import PARAM_PLACEHOLDER_META

    sources = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in canonical:
            sources[node] = canonical[node.target]
        elif node.op == "placeholder" and PARAM_PLACEHOLDER_META in node.meta:
            sources[node] = node.meta[PARAM_PLACEHOLDER_META]
    return sources


def _layer_name(weight: str) -> str:
    return weight[: -len(".weight")] if weight.endswith(".weight") else weight


def _unique_names(layers: list[LayerInfo]) -> list[LayerInfo]:
    """Fall back to the full weight name where stripping ``.weight`` makes names collide."""
    counts: dict[str, int] = defaultdict(int)
    for layer in layers:
        counts[layer.name] += 1
    return [replace(layer, name=layer.weight) if counts[layer.name] > 1 else layer for layer in layers]


def _merge(matches: list[OpMatch], shape: tuple[int, ...]) -> LayerInfo | str:
    """Merge the matches of one weight into a :class:`LayerInfo`, or say why they can't be."""
    first = matches[0]
    for other in matches[1:]:
        for attribute in ("kind", "weight_layout", "bias"):
            if getattr(other, attribute) != getattr(first, attribute):
                return (
                    f"tied weight used by {first.node.name} and {other.node.name} with "
                    f"different {attribute} ({getattr(first, attribute)} vs "
                    f"{getattr(other, attribute)}): no single Kronecker factor pair fits both"
                )
        if (other.weight_shape or shape) != (first.weight_shape or shape):
            return (
                f"tied weight viewed to different shapes by {first.node.name} and "
                f"{other.node.name}: no single Kronecker factor pair fits both"
            )
        if (first.conv and first.conv.groups) != (other.conv and other.conv.groups):
            return f"tied weight used by convolutions with different groups ({first.node.name})"
    return LayerInfo(
        name=_layer_name(first.weight),
        kind=first.kind,
        weight=first.weight,
        bias=first.bias,
        call_form=first.call_form,
        node=first.node.name,
        nodes=tuple(m.node.name for m in matches),
        weight_layout=first.weight_layout,
        weight_shape=first.weight_shape or shape,
        conv=first.conv,
        matches=tuple(matches),
        stored_shape=shape if first.weight_shape not in (None, shape) else None,
    )


def find_layers(
    gm: fx.GraphModule, params: dict[str, torch.Tensor] | None = None
) -> tuple[list[LayerInfo], dict[str, str]]:
    """Match every linear/conv op of ``gm`` and explain every other parameter use.

    Args:
        gm: the traced graph module.
        params: ``{name: tensor}`` of a functional model's parameters (placeholders);
            ``None`` for module parameters (``get_attr``/``call_module``).

    Returns:
        ``(layers, uncaptured)``: layers in graph order; ``{parameter: reason}``.
    """
    canonical = _canonical_names(gm)
    all_params: dict[str, torch.Tensor] = dict(gm.named_parameters())
    if params:
        all_params.update(params)
        canonical.update({name: name for name in params})
    lookup = ParamLookup(parameter_sources(gm, canonical), all_params)

    matches: list[OpMatch] = []
    captured_uses: set[tuple[fx.Node, str]] = set()
    for node in gm.graph.nodes:
        match = match_node(node, gm, lookup)
        if match is None:
            continue
        match = replace(
            match,
            weight=canonical.get(match.weight, match.weight),
            bias=canonical.get(match.bias, match.bias) if match.bias else None,
        )
        matches.append(match)
        captured_uses.add((match.op_nodes[0], match.weight))
        if match.bias is not None:
            captured_uses.add((match.op_nodes[-1], match.bias))

    uses: dict[str, list[fx.Node]] = defaultdict(list)
    for source, name in lookup.source_nodes.items():
        stack = list(source.users)
        while stack:
            user = stack.pop()
            if lookup.is_transparent(user):
                stack.extend(user.users)
            else:
                uses[name].append(user)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            for short, _ in module.named_parameters(remove_duplicate=False):
                full = f"{node.target}.{short}"
                uses[canonical.get(full, full)].append(node)

    uncaptured: dict[str, str] = {}
    for name, users in uses.items():
        for user in users:
            if (user, name) not in captured_uses:
                uncaptured.setdefault(name, _reason_for_use(user, name, gm))
    if has_model_inputs(gm.graph):
        dependent = batch_dependent_nodes(gm.graph)
        for match in matches:
            if match.input not in dependent:
                uncaptured.setdefault(
                    match.weight,
                    f"the input of {match.node.name} does not depend on the model inputs: it has "
                    "no batch axis (computed from parameters, buffers and input shapes only, then broadcast "
                    "over the batch), so there are no per-datum inputs and output gradients",
                )

    by_weight: dict[str, list[OpMatch]] = defaultdict(list)
    for match in matches:
        by_weight[match.weight].append(match)
    bias_owners: dict[str, set[str]] = defaultdict(set)
    for match in matches:
        if match.bias is not None:
            bias_owners[match.bias].add(match.weight)
    for bias, owners in bias_owners.items():
        if len(owners) > 1:
            uncaptured.setdefault(
                bias,
                f"bias shared by layers with different weights ({', '.join(sorted(owners))}): "
                "one factor pair cannot cover it",
            )
    layers: list[LayerInfo] = []
    for weight, weight_matches in by_weight.items():
        bias = weight_matches[0].bias
        blocker = uncaptured.get(weight) or (uncaptured.get(bias) if bias else None)
        merged = _merge(weight_matches, lookup.shape(weight)) if not blocker else None
        if isinstance(merged, LayerInfo):
            layers.append(merged)
            continue
        reason = blocker or merged
        for name in filter(None, {m.weight for m in weight_matches} | {m.bias for m in weight_matches}):
            uncaptured.setdefault(name, f"{reason}; so its layer is not preconditioned")
    layers = _unique_names(layers)
    layer_params = {layer.weight for layer in layers} | {layer.bias for layer in layers}
    for name in all_params:
        if canonical.get(name, name) == name and name not in uses and name not in layer_params:
            uncaptured[name] = "not used in the traced forward"
    return layers, {name: uncaptured[name] for name in all_params if name in uncaptured}
