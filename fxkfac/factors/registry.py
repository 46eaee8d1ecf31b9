"""Registry: layer kind -> :class:`FactorRule`.

A rule reshapes what one use of a layer saw into a common layout, so the driver computes
expand/reduce factors, groups and tied weights once for every kind:

* ``input_features(x, layer, use)`` -> ``[N, S, G, D_in (+1)]``: per datum ``n``, shared
  position ``s`` (sequence entries, conv output pixels; ``S = 1`` without weight sharing),
  group ``g``; with a trailing 1 when the layer has a bias;
* ``output_gradients(g, layer)`` for ``g: [K, *z.shape]`` -> ``[K, N, S, G, D_out / G]``.

Add a kind with ``register_factor_rule("mykind", MyRule())``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from fxkfac.capture.layer import LayerInfo, OpMatch


class FactorRule(Protocol):
    """How one layer kind exposes inputs and output gradients to the factor driver."""

    def input_features(self, layer_input: Tensor, layer: LayerInfo, use: OpMatch) -> Tensor:
        """``[N, S, G, D_in (+1)]`` input features x̃ of one use."""
        ...

    def output_gradients(self, grads: Tensor, layer: LayerInfo) -> Tensor:
        """``[K, N, S, G, D_out / G]`` from gradients ``[K, *z.shape]`` of one use."""
        ...


FACTOR_RULES: dict[str, FactorRule] = {}


def register_factor_rule(kind: str, rule: FactorRule) -> None:
    """Register the :class:`FactorRule` for layers of ``kind``."""
    FACTOR_RULES[kind] = rule


def factor_rule(kind: str) -> FactorRule:
    """The rule of ``kind``; ``KeyError`` naming the registered kinds otherwise."""
    try:
        return FACTOR_RULES[kind]
    except KeyError:
        raise KeyError(
            f"no factor rule for layer kind {kind!r}; registered: {sorted(FACTOR_RULES)}"
        ) from None


def append_ones(features: Tensor) -> Tensor:
    """``[..., D] -> [..., D + 1]`` with a trailing 1 (the bias input)."""
    return torch.cat([features, features.new_ones((*features.shape[:-1], 1))], dim=-1)
