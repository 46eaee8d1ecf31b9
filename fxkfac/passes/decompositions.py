"""Traceable decompositions of modules that hide linear layers from ``torch.fx``.

``nn.MultiheadAttention`` is a leaf for ``torch.fx`` (tracing into it fails on control
flow) and uses its ``in_proj_weight`` and ``out_proj`` inside
``F.multi_head_attention_forward``. The tracer replaces supported calls with
:func:`multihead_attention`, which writes the same computation with ``F.linear`` (so both
projections are captured) and ``F.scaled_dot_product_attention``. Unsupported
configurations return ``None`` and the module stays a leaf, its parameters listed in
``kmod.uncaptured``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Decomposition = Callable[..., Any]

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def multihead_attention(module: nn.MultiheadAttention, *args: Any, **kwargs: Any) -> Any:
    """Self-attention ``module(x, x, x, ...)`` with packed ``in_proj`` as ``F.linear`` calls.

    Supported: the same tensor as query, key and value; ``attn_mask``,
    ``key_padding_mask``, ``bias_k``/``bias_v`` and ``add_zero_attn`` unset; ``is_causal``
    either way. Shapes: ``[N, S, E]`` (``batch_first``) or ``[S, N, E]``.

    Returns:
        ``(output, attention weights or None)`` like the module, or ``None`` when the
        configuration is not supported.
    """
    bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    query = a["query"]
    if not (
        query is a["key"] is a["value"]
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
        and a["attn_mask"] is None
        and a["key_padding_mask"] is None
    ):
        return None
    heads, head_dim = module.num_heads, module.head_dim
    x = query if module.batch_first else query.transpose(0, 1)  # [N, S, E]
    qkv = F.linear(x, module.in_proj_weight, module.in_proj_bias)
    chunks = qkv.chunk(3, dim=-1)
    q, k, v = (chunks[i].unflatten(-1, (heads, head_dim)).transpose(1, 2) for i in range(3))
    dropout = module.dropout if module.training else 0.0
    weights = None
    if a["need_weights"]:
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        if a["is_causal"]:
            future = scores.new_ones(scores.shape[-2:], dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        weights = scores.softmax(dim=-1)
        out = F.dropout(weights, dropout, training=module.training) @ v
        if a["average_attn_weights"]:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=a["is_causal"])
    out = F.linear(out.transpose(1, 2).flatten(2), module.out_proj.weight, module.out_proj.bias)
    if not module.batch_first:
        out = out.transpose(0, 1)
    return out, weights


MODULE_DECOMPOSITIONS: dict[type[nn.Module], Decomposition] = {
    nn.MultiheadAttention: multihead_attention,
}


def register_decomposition(module_type: type[nn.Module], decomposition: Decomposition) -> None:
    """Trace calls of ``module_type`` through ``decomposition(module, *args, **kwargs)``.

    The decomposition returns the module's output, or ``None`` to keep the module a leaf.
    """
    MODULE_DECOMPOSITIONS[module_type] = decomposition
