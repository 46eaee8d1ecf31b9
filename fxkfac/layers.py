"""Records of matched operations: :class:`OpMatch` (one graph node) and :class:`LayerInfo`.

A matcher turns one graph node into an :class:`OpMatch`; module calls (``nn.Linear``) and
functional calls (``F.linear``, ``x @ W.T``, ``torch.addmm``) end in the same record, so
everything downstream handles one shape. Matches that share a weight (tied weights) are
merged into one :class:`LayerInfo`, the unit K-FAC keeps one factor pair for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch.fx as fx

LayerKind = Literal["linear", "conv1d", "conv2d", "conv3d"]
CallForm = Literal["module", "function", "aten"]
WeightLayout = Literal["out_in", "in_out"]
"""``out_in``: the parameter is stored ``[D_out, D_in, *kernel]`` (``nn.Linear``, ``F.linear``,
``x @ W.T``). ``in_out``: stored transposed, ``[D_in, D_out]`` (``x @ W``, ``addmm(b, x, W)``)."""


@dataclass(frozen=True)
class ConvParams:
    """Hyper-parameters of a convolution, normalized to tuples of length ``ndim``."""

    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"
    explicit_pad: tuple[int, ...] | None = None
    """``F.pad`` amounts applied before the convolution (non-zero padding modes)."""


@dataclass(frozen=True)
class BatchAxis:
    """Where the batch lies in a layer's input ``x`` and output ``z`` (same leading axes).

    Axis ``dim`` has size ``outer · N · inner`` and its index is ``(o · N + n) · inner + i``
    for datum ``n``: ``outer = inner = 1`` is a plain batch axis (``[N, S, E]`` has
    ``dim=0``, ``nn.MultiheadAttention``'s sequence-first ``[S, N, E]`` has ``dim=1``);
    ``inner > 1`` is the batch merged with a following axis, datum-major (Swin's windows,
    ``[N · windows, tokens, C]``); ``outer > 1`` merged with a preceding axis
    (``[S · N, E]``). The remaining entries of all axes but the feature axis are the
    datum's weight-sharing positions.
    """

    dim: int = 0
    outer: int = 1
    inner: int = 1

    @property
    def merged(self) -> int:
        """How many rows of axis ``dim`` belong to one datum."""
        return self.outer * self.inner


@dataclass(frozen=True)
class OpMatch:
    """One linear or convolution operation found in the graph.

    Attributes:
        kind: ``'linear'`` or ``'conv{1,2,3}d'``.
        node: the node whose value is the op's output ``z`` (a fused bias add when the bias
            is added by a separate node, as in ``x @ W.T + b``).
        input: the node holding the op's input ``x`` (``[N, ..., D_in]`` or ``[N, C_in, *S]``).
        weight: qualified parameter name of the weight.
        bias: qualified parameter name of the bias, or ``None``.
        call_form: how the op is written in the model.
        weight_layout: storage orientation of the weight (see :data:`WeightLayout`).
        conv: convolution hyper-parameters (``None`` for linear ops).
        op_nodes: every node that belongs to the op (the op itself, a fused bias add).
        weight_shape: shape of the weight as the op sees it, when the op consumes a view of
            the parameter (``F.linear(x, W.view(6, 4))``); ``None``: the stored shape.
        batch: where the batch lies in the op's input and output (see :class:`BatchAxis`);
            ``None`` when unknown.
    """

    kind: LayerKind
    node: fx.Node
    input: fx.Node
    weight: str
    bias: str | None
    call_form: CallForm
    weight_layout: WeightLayout = "out_in"
    conv: ConvParams | None = None
    op_nodes: tuple[fx.Node, ...] = ()
    weight_shape: tuple[int, ...] | None = None
    batch: BatchAxis | None = None


@dataclass(frozen=True)
class LayerInfo:
    """A parameter (weight, optional bias) that K-FAC preconditions with one factor pair.

    Attributes:
        name: layer name, the key of ``cap.factors(...)``; the weight's name without a
            trailing ``.weight``.
        kind: ``'linear' | 'conv1d' | 'conv2d' | 'conv3d'``.
        weight: qualified weight parameter name.
        bias: qualified bias parameter name or ``None``.
        call_form: ``'module' | 'function' | 'aten'`` (of the first use).
        node: name of the (first) graph node computing the layer's output.
        nodes: names of all nodes using the weight (more than one: tied weights).
        weight_layout: ``'out_in'`` or ``'in_out'`` (the parameter is stored transposed).
        weight_shape: shape of the weight as the op uses it: the stored shape, or the
            shape the parameter is viewed to before the op (``W.view(6, 4)``).
        conv: convolution hyper-parameters of the first use (``None`` for linear).
        stored_shape: the parameter's own shape when it differs from ``weight_shape``
            (a viewed weight), else ``None``.
    """

    name: str
    kind: LayerKind
    weight: str
    bias: str | None
    call_form: CallForm
    node: str
    nodes: tuple[str, ...]
    weight_layout: WeightLayout
    weight_shape: tuple[int, ...]
    conv: ConvParams | None = None
    matches: tuple[OpMatch, ...] = field(default=(), repr=False, compare=False)
    stored_shape: tuple[int, ...] | None = None

    @property
    def tied(self) -> bool:
        """Whether the weight is used by several ops (tied weights)."""
        return len(self.nodes) > 1

    @property
    def groups(self) -> int:
        """Number of convolution groups (1 for linear layers)."""
        return self.conv.groups if self.conv is not None else 1

    @property
    def out_features(self) -> int:
        """``D_out``: output features (channels) of the layer."""
        return self.weight_shape[1] if self.weight_layout == "in_out" else self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """``D_in`` of the canonical weight ``W.reshape(D_out, -1)`` (per group for convs)."""
        if self.weight_layout == "in_out":
            return self.weight_shape[0]
        numel = 1
        for size in self.weight_shape[1:]:
            numel *= size
        return numel

    @property
    def input_factor_dim(self) -> int:
        """Size of the input-based factor ``A`` (per group): ``D_in`` (+1 with a bias)."""
        return self.in_features + (self.bias is not None)

    @property
    def output_factor_dim(self) -> int:
        """Size of the gradient-based factor ``B`` (per group): ``D_out / groups``."""
        return self.out_features // self.groups

    def describe(self) -> dict[str, Any]:
        """Plain-dict view used by summaries and the CLI."""
        return {
            "name": self.name,
            "kind": self.kind,
            "call_form": self.call_form,
            "weight": self.weight,
            "bias": self.bias,
            "weight_shape": tuple(self.weight_shape),
            "A": self.input_factor_dim,
            "B": self.output_factor_dim,
            "groups": self.groups,
            "uses": len(self.nodes),
        }
