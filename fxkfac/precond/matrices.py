"""Convert between a layer's parameter tensors and its gradient matrix ``[G, D_B, D_A]``.

The matrix is ``W̃ = [W.reshape(D_out, -1) | b]`` in the canonical orientation (a weight
stored transposed, ``x @ W``, is transposed back), split into ``G`` groups of rows. A weight
stored in another shape and viewed before its op (``F.linear(x, W.view(6, 4))``) is read in
the viewed shape ``layer.weight_shape`` and written back in its stored shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxkfac.layers import LayerInfo


def to_matrix(layer: LayerInfo, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[G, D_out / G, D_in (+1)]`` from tensors shaped like the weight and bias."""
    if layer.stored_shape is not None:
        weight = weight.reshape(layer.weight_shape)
    matrix = weight.T if layer.weight_layout == "in_out" else weight.reshape(weight.shape[0], -1)
    if layer.bias is not None:
        matrix = torch.cat([matrix, bias.reshape(-1, 1)], dim=1)
    return matrix.reshape(layer.groups, layer.output_factor_dim, -1)


def from_matrix(layer: LayerInfo, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`to_matrix`: ``(weight-shaped, bias-shaped or None)``."""
    matrix = matrix.reshape(layer.out_features, -1)
    bias = None
    if layer.bias is not None:
        matrix, bias = matrix[:, :-1], matrix[:, -1]
    weight = matrix.T.contiguous() if layer.weight_layout == "in_out" else matrix.reshape(layer.weight_shape)
    if layer.stored_shape is not None:
        weight = weight.reshape(layer.stored_shape)
    return weight, bias
