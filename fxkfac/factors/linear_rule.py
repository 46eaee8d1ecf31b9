"""Factor rule for linear ops: ``z = x Wᵀ + b`` on inputs ``[N, ..., D_in]``.

Dimensions between the batch and the feature axis (sequence positions, heads, ...) are
weight-sharing positions ``S`` (Eschenhagen et al., 2023). The weight may be stored
``[D_out, D_in]`` (``F.linear``, ``x @ W.T``) or transposed (``x @ W``): the factors are the
same, they always refer to the canonical ``[D_out, D_in]`` orientation.
"""

from __future__ import annotations

from torch import Tensor

from fxkfac.factors.rules import register_factor_rule
from fxkfac.layers import LayerInfo, OpMatch


class LinearRule:
    """Inputs ``[N, ..., D_in]`` -> ``[N, S, 1, D_in]``; grads likewise for ``D_out``."""

    def input_features(self, layer_input: Tensor, layer: LayerInfo, use: OpMatch) -> Tensor:
        """``[N, S, 1, D_in]``."""
        x = layer_input if layer_input.ndim > 1 else layer_input.unsqueeze(0)
        x = x.reshape(x.shape[0], -1, 1, x.shape[-1])
        return x

    def output_gradients(self, grads: Tensor, layer: LayerInfo) -> Tensor:
        """``[K, N, ..., D_out]`` -> ``[K, N, S, 1, D_out]``."""
        if grads.ndim == 2:  # unbatched layer output
            grads = grads.unsqueeze(1)
        return grads.reshape(grads.shape[0], grads.shape[1], -1, 1, grads.shape[-1])


register_factor_rule("linear", LinearRule())
