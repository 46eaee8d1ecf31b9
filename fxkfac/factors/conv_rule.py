"""Factor rule for convolutions: patches (unfolded inputs) and per-pixel output gradients.

A convolution is a linear layer applied at every output position ``s`` to the input patch
``x_s`` ``[C_in / G · Π kernel]`` (Grosse & Martens, 2016); output positions are the
weight-sharing axis. Stride, padding (including ``'same'`` and non-zero padding modes),
dilation and groups are honoured. With ``G`` groups, each group has its own factor pair
(the curvature of ``rvec(W̃)`` is block-diagonal over groups, whose rows are contiguous).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fxkfac.factors.rules import register_factor_rule
from fxkfac.layers import ConvParams, LayerInfo, OpMatch


def _pad_for_string(padding: str, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    """``F.pad`` amounts (last dim first) for ``padding='same'``/``'valid'``."""
    if padding == "valid":
        return (0,) * (2 * len(kernel))
    pads: list[int] = []
    for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def extract_patches(x: Tensor, kernel: tuple[int, ...], conv: ConvParams) -> Tensor:
    """Unfold ``x: [N, C_in, *spatial]`` into patches ``[N, C_in · Π kernel, L]``.

    Rows are ordered channel-major ``(c, k_1, ..., k_d)``, matching ``W.reshape(C_out, -1)``.
    """
    ndim = len(kernel)
    padding = conv.padding
    if conv.explicit_pad is not None:
        x = F.pad(x, conv.explicit_pad, mode=conv.padding_mode)
    if isinstance(padding, str):
        x = F.pad(x, _pad_for_string(padding, kernel, conv.dilation))
        padding = (0,) * ndim
    if ndim == 1:
        x = x.unsqueeze(2)
        kernel, padding = (1, *kernel), (0, *padding)
        stride, dilation = (1, *conv.stride), (1, *conv.dilation)
    else:
        stride, dilation = conv.stride, conv.dilation
    if len(kernel) == 2:
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    # 3d: a depthwise convolution with one-hot kernels picks each kernel offset
    channels = x.shape[1]
    offsets = int(torch.tensor(kernel).prod())
    one_hot = torch.eye(offsets, dtype=x.dtype, device=x.device).reshape(offsets, 1, *kernel)
    one_hot = one_hot.repeat(channels, 1, *([1] * ndim))
    patches = F.conv3d(x, one_hot, stride=stride, padding=padding, dilation=dilation, groups=channels)
    return patches.reshape(x.shape[0], channels * offsets, -1)


class ConvRule:
    """Patches ``[N, L, G, C_in/G · Π k]`` and grads ``[K, N, L, G, C_out/G]``."""

    def input_features(self, layer_input: Tensor, layer: LayerInfo, use: OpMatch) -> Tensor:
        """Unfolded input patches of one use, split by group."""
        kernel = tuple(layer.weight_shape[2:])
        patches = extract_patches(layer_input, kernel, use.conv)  # [N, C_in k, L]
        batch, _, positions = patches.shape
        groups = layer.groups
        features = patches.reshape(batch, groups, -1, positions).permute(0, 3, 1, 2)
        return features

    def output_gradients(self, grads: Tensor, layer: LayerInfo) -> Tensor:
        """``[K, N, C_out, *spatial]`` -> ``[K, N, L, G, C_out / G]``."""
        k, batch, channels = grads.shape[:3]
        grads = grads.reshape(k, batch, layer.groups, channels // layer.groups, -1)
        return grads.permute(0, 1, 4, 2, 3)


for _kind in ("conv1d", "conv2d", "conv3d"):
    register_factor_rule(_kind, ConvRule())
