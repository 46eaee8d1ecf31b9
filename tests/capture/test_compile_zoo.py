"""Compiler core: a zoo of small models, each with hand-written expected layers.

Every case is one line of ``ZOO``: a builder, an input shape and the layers (and uncaptured
parameters) a person expects after reading the model. For each case the tests check

* ``kmod.layers`` against the hand-written expectation (names, kinds, parameters, call form,
  weight layout, tied uses, convolution hyper-parameters) and ``kmod.uncaptured`` reasons;
* the rewritten module against the original: identical outputs and parameter gradients;
* the capture: one recorded input and one gradient edge per use, and — independently of the
  library's factor code — that captured inputs and output gradients reproduce each layer's
  parameter gradient (which fails if an input, an edge, a layout or a conv setting is wrong);
* the generated graph (lint, ``tap`` nodes) and the summary.

Separate tests cover trace errors, leaf modules, bad arguments and in-place ops after a layer.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

import fxkfac
from fxkfac import ConvParams, FxKfacError, TraceError
from fxkfac.capture import tap

DTYPE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny ops are ~100x slower with intra-op threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _param(*shape: int, scale: float = 0.5) -> nn.Parameter:
    return nn.Parameter(scale * torch.randn(*shape, dtype=DTYPE))


# ---------------------------------------------------------------------------------------------
# the zoo: models
# ---------------------------------------------------------------------------------------------


class NestedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.ReLU())
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.head(self.body(x))


def sequence_mlp() -> nn.Module:
    """Linear layers on ``[N, S, D]`` inputs (weight sharing over S)."""
    return nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 2))


def cnn1d() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            strided=nn.Conv1d(2, 4, 3, stride=2, padding=1),
            act=nn.ReLU(),
            circular=nn.Conv1d(
                4, 4, 3, padding="same", dilation=2, groups=2, padding_mode="circular", bias=False
            ),
            flat=nn.Flatten(),
            fc=nn.Linear(20, 3),
        )
    )


def cnn2d() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            c0=nn.Conv2d(3, 4, 3, padding=1),
            a0=nn.ReLU(),
            depthwise=nn.Conv2d(4, 4, 3, padding="same", groups=4),
            c2=nn.Conv2d(4, 6, (2, 3), stride=(2, 1), padding="valid", dilation=(1, 2)),
            a2=nn.Tanh(),
            reflect=nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect", groups=2),
            replicate=nn.Conv2d(6, 2, (2, 3), padding="same", padding_mode="replicate", bias=False),
            flat=nn.Flatten(),
            fc=nn.Linear(32, 3),
        )
    )


def cnn3d() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            same=nn.Conv3d(2, 3, 3, padding="same"),
            act=nn.ReLU(),
            grouped=nn.Conv3d(3, 3, 2, stride=2, groups=3, bias=False),
            replicate=nn.Conv3d(3, 2, (1, 2, 2), padding=(0, 1, 1), padding_mode="replicate"),
        )
    )


class MixedLinear(nn.Module):
    """nn.Linear next to F.linear / F.conv2d on the module's own parameters."""

    def __init__(self):
        super().__init__()
        self.kernel = _param(4, 2, 3, 3)
        self.kernel_bias = _param(4)
        self.depthwise = _param(4, 1, 3, 3)
        self.proj = nn.Linear(4, 6)
        self.w = _param(3, 6)
        self.b = _param(3)

    def forward(self, x):  # x: [N, 2, 5, 5]
        h = F.conv2d(x, self.kernel, self.kernel_bias, 1, 1)
        h = F.conv2d(F.pad(h, (1, 1, 1, 1), mode="circular"), self.depthwise, groups=4)
        h = torch.relu(h).mean(dim=(2, 3))
        h = self.proj(h)
        return F.linear(torch.tanh(h), self.w, bias=self.b)


class FunctionalConv1d(nn.Module):
    """F.conv1d with keyword and positional hyper-parameters (a string padding)."""

    def __init__(self):
        super().__init__()
        self.k1 = _param(3, 2, 3)
        self.k1_bias = _param(3)
        self.k2 = _param(2, 3, 3)

    def forward(self, x):  # x: [N, 2, 9]
        h = torch.tanh(F.conv1d(x, self.k1, bias=self.k1_bias, stride=2, padding=1))
        return F.conv1d(h, self.k2, None, 1, "same", 2)


class MatmulZoo(nn.Module):
    """Every matmul spelling on parameters, chained: 4 -> 5 -> 3 -> 4 -> 5 -> 3 -> 4 -> 2."""

    def __init__(self):
        super().__init__()
        self.w_t = _param(5, 4)
        self.w = _param(5, 3)
        self.w_fused = _param(4, 3)
        self.b_fused = _param(4)
        self.w_addmm = _param(4, 5)
        self.b_addmm = _param(5)
        self.w_addmm_t = _param(3, 5)
        self.b_addmm_t = _param(3)
        self.w_matmul = _param(3, 4)
        self.w_transpose = _param(2, 4)

    def forward(self, x):
        h = torch.tanh(x @ self.w_t.T)
        h = torch.tanh(h @ self.w)
        h = torch.tanh(h @ self.w_fused.T + self.b_fused)
        h = torch.tanh(torch.addmm(self.b_addmm, h, self.w_addmm))
        h = torch.tanh(torch.addmm(self.b_addmm_t, h, self.w_addmm_t.t()))
        h = torch.tanh(torch.matmul(h, self.w_matmul))
        return h @ self.w_transpose.transpose(0, 1)


class MatmulZoo2(nn.Module):
    """More spellings: reversed bias add, method calls, torch.mm, permute, .mT, .add(b)."""

    def __init__(self):
        super().__init__()
        self.w_in_out = _param(4, 5)
        self.b_in_out = _param(5)
        self.w_method = _param(3, 5)
        self.w_mm = _param(4, 3)
        self.w_permute = _param(3, 4)
        self.b_permute = _param(3)
        self.w_flinear_t = _param(3, 4)
        self.w_mt = _param(2, 4)

    def forward(self, x):
        h = torch.tanh(self.b_in_out + x @ self.w_in_out)
        h = torch.tanh(h.matmul(self.w_method.T))
        h = torch.tanh(torch.mm(h, self.w_mm.t()))
        h = torch.tanh((h @ self.w_permute.permute(1, 0)).add(self.b_permute))
        h = torch.tanh(F.linear(h, self.w_flinear_t.T))
        return h @ self.w_mt.mT


FUNCTIONAL_PARAM_SHAPES = {
    "fc1.weight": (6, 4),
    "fc1.bias": (6,),
    "fc2.weight": (5, 6),
    "fc2.bias": (5,),
    "out.w": (5, 3),
    "out.bias": (3,),
    "temperature": (),
    "unused": (2,),
}


def functional_mlp(params: dict[str, Tensor], x: Tensor) -> Tensor:
    h = torch.tanh(F.linear(x, params["fc1.weight"], params["fc1.bias"]))
    h = torch.relu(h @ params["fc2.weight"].T + params["fc2.bias"])
    h = torch.addmm(params["out.bias"], h, params["out.w"])
    return h * params["temperature"]


def functional_model() -> tuple[Callable[..., Tensor], dict[str, Tensor]]:
    params = {
        name: (0.5 * torch.randn(shape, dtype=DTYPE)).requires_grad_()
        for name, shape in FUNCTIONAL_PARAM_SHAPES.items()
    }
    return functional_mlp, params


def functional_cnn(params: dict[str, Tensor], x: Tensor) -> Tensor:
    h = torch.relu(F.conv2d(x, params["conv"], params["conv_bias"], stride=2, padding=1))
    return F.linear(h.flatten(1), params["head"])


def functional_cnn_model() -> tuple[Callable[..., Tensor], dict[str, Tensor]]:
    params = {
        "conv": 0.5 * torch.randn(3, 2, 3, 3, dtype=DTYPE),
        "conv_bias": 0.5 * torch.randn(3, dtype=DTYPE),
        "head": 0.5 * torch.randn(2, 27, dtype=DTYPE),
    }
    return functional_cnn, {name: p.requires_grad_() for name, p in params.items()}


class AddmmScaled(nn.Module):
    """``addmm`` with ``alpha != 1`` is not a plain linear layer."""

    def __init__(self):
        super().__init__()
        self.w = _param(4, 3)
        self.b = _param(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.tanh(torch.addmm(self.b, x, self.w, alpha=0.5)))


class InplaceAfterLayers(nn.Module):
    """In-place ops right after a functional layer (fused bias) and after a module."""

    def __init__(self):
        super().__init__()
        self.w = _param(5, 4)
        self.b = _param(5)
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(x @ self.w.T + self.b, inplace=True)
        return self.lin(h).tanh_()


def inplace_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.ReLU(inplace=True),
        nn.Linear(6, 5),
        nn.ReLU(inplace=True),
        nn.Linear(5, 2),
    )


class UncapturableModules(nn.Module):
    """Modules with parameters but no K-FAC rule: cross-attention (stays a leaf), transposed conv."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.up = nn.ConvTranspose1d(4, 2, 2)

    def forward(self, x):  # x: [N, S, 3]
        h = self.inp(x)
        h = self.attn(h, 2 * h, 2 * h)[0]  # query is not key: no decomposition
        return self.up(h.transpose(1, 2))


class SelfAttention(nn.Module):
    """nn.MultiheadAttention self-attention: decomposed so in_proj and out_proj are captured."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


class TiedModuleAndFunction(nn.Module):
    """An nn.Linear called as a module and its parameters reused through F.linear."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return F.linear(h, self.lin.weight, self.lin.bias)


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc2(self.ln(self.fc1(x))))))


def conv_bn() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(2, 3, 3, bias=False),
            bn=nn.BatchNorm2d(3),
            act=nn.ReLU(inplace=True),
            flat=nn.Flatten(),
            fc=nn.Linear(12, 2),
        )
    )


class TiedModule(nn.Module):
    """The same nn.Linear called twice."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        h = torch.tanh(self.lin(h))
        return self.out(h)


class AliasedModule(nn.Module):
    """One nn.Linear registered under two attribute names, called through both."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.again = self.enc

    def forward(self, x):
        return self.again(torch.tanh(self.enc(x)))


class TiedParameterModules(nn.Module):
    """Two nn.Linear modules sharing one weight Parameter (no biases)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class TiedFunctional(nn.Module):
    """The same Parameter used by two F.linear calls."""

    def __init__(self):
        super().__init__()
        self.w = _param(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w))
        h = torch.tanh(F.linear(h, self.w))
        return self.head(h)


class TiedInconsistentLayout(nn.Module):
    """A weight used once as ``x @ W`` and once as ``F.linear(x, W)``."""

    def __init__(self):
        super().__init__()
        self.w = _param(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(x @ self.w)
        h = torch.tanh(F.linear(h, self.w))
        return self.fc(h)


class TiedInconsistentBias(nn.Module):
    """Encoder and decoder share a weight but each has its own bias."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


class UnsupportedOp(nn.Module):
    """A parameter used by an elementwise product."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=DTYPE))

    def forward(self, x):
        return self.lin(x) * self.scale


class WeightReused(nn.Module):
    """A layer's weight also used outside the layer (a penalty term in the forward)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.lin(x))) + self.lin.weight.sum()


class ParamOnTheLeft(nn.Module):
    """``W @ x.T``: the parameter is the left operand, which no linear pattern covers."""

    def __init__(self):
        super().__init__()
        self.w = _param(3, 4)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.w @ x.T).T)


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass whose forward rescales the weight: not a plain linear layer."""

    def forward(self, x):
        return F.linear(x, self.weight * 0.5, self.bias)


class WithScaledLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaled = ScaledLinear(4, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.scaled(x)))


class BufferMask(nn.Module):
    """A buffer (not a parameter) next to a functional layer."""

    def __init__(self):
        super().__init__()
        self.w = _param(3, 4)
        self.register_buffer("mask", torch.tensor([1.0, 0.0, 2.0], dtype=DTYPE))

    def forward(self, x):
        return F.linear(x, self.w) * self.mask


class SharedBiasFunctional(nn.Module):
    """Two F.linear layers with different weights but one shared bias Parameter."""

    def __init__(self):
        super().__init__()
        self.w1 = _param(3, 3)
        self.w2 = _param(3, 3)
        self.b = _param(3)

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.w1, self.b)), self.w2, self.b)


class SharedBiasModules(nn.Module):
    """Two nn.Linear modules with their own weights sharing one bias Parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.c = nn.Linear(3, 3)
        self.c.bias = self.a.bias

    def forward(self, x):
        return self.c(torch.tanh(self.a(x)))


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.spare = nn.Linear(3, 3)
        self.extra = nn.Parameter(torch.zeros(2, dtype=DTYPE))

    def forward(self, x):
        return self.lin(x)


class Gate(nn.Module):
    """Data-dependent Python control flow: symbolic tracing cannot go through it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return torch.tanh(self.lin(x))
        return self.lin(x)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.gate = Gate()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.gate(self.inp(x)))


class Flagged(nn.Module):
    """A Python flag argument: needs ``concrete_args``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, double=False):
        h = self.lin(x)
        if double:
            return 2 * h
        return h


def traced_mlp() -> fx.GraphModule:
    return fx.symbolic_trace(NestedMLP())


def traced_matmul_zoo() -> fx.GraphModule:
    return fx.symbolic_trace(MatmulZoo())


def traced_tied_parameter_modules() -> fx.GraphModule:
    return fx.symbolic_trace(TiedParameterModules())


# ---------------------------------------------------------------------------------------------
# the zoo: expectations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class L:
    """A layer as a person reading the model expects it."""

    name: str
    kind: str
    weight: str
    bias: str | None
    call_form: str = "module"
    layout: str = "out_in"
    uses: int = 1
    conv: ConvParams | None = None


def lin(name: str, bias: bool = True, **kwargs: Any) -> L:
    """An ``nn.Linear``-style layer ``name`` with ``name.weight`` / ``name.bias``."""
    return L(name, "linear", f"{name}.weight", f"{name}.bias" if bias else None, **kwargs)


def fn_lin(weight: str, bias: str | None = None, layout: str = "out_in", **kwargs: Any) -> L:
    """A functional linear op on a bare parameter ``weight`` (the layer name is the weight)."""
    return L(weight, "linear", weight, bias, call_form="function", layout=layout, **kwargs)


def conv(name: str, ndim: int, conv_params: ConvParams, bias: bool = True, call_form: str = "module") -> L:
    return L(
        name,
        f"conv{ndim}d",
        f"{name}.weight",
        f"{name}.bias" if bias else None,
        call_form=call_form,
        conv=conv_params,
    )


def cp(stride, padding, dilation, groups=1, padding_mode="zeros", explicit_pad=None) -> ConvParams:
    return ConvParams(
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
        explicit_pad=explicit_pad,
    )


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], Any]
    input_shape: tuple[int, ...]
    layers: tuple[L, ...]
    uncaptured: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """``{parameter: substrings its reason must contain}``."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``fxkfac.compile`` arguments."""


NESTED_MLP_LAYERS = (lin("body.0"), lin("body.2"), lin("head", bias=False))
MATMUL_ZOO_LAYERS = (
    fn_lin("w_t"),
    fn_lin("w", layout="in_out"),
    fn_lin("w_fused", "b_fused"),
    fn_lin("w_addmm", "b_addmm", layout="in_out"),
    fn_lin("w_addmm_t", "b_addmm_t"),
    fn_lin("w_matmul", layout="in_out"),
    fn_lin("w_transpose"),
)
NOT_USED = ("not used in the traced forward",)

# fmt: off
ZOO = [
    Case("mlp", NestedMLP, (3, 5), NESTED_MLP_LAYERS),
    Case("sequence_mlp", sequence_mlp, (2, 3, 4), (lin("0"), lin("2"))),
    Case("cnn1d", cnn1d, (2, 2, 9), (
        conv("strided", 1, cp((2,), (1,), (1,))),
        conv("circular", 1, cp((1,), (0,), (2,), 2, "circular", (2, 2)), bias=False),
        lin("fc"),
    )),
    Case("cnn2d", cnn2d, (2, 3, 8, 8), (
        conv("c0", 2, cp((1, 1), (1, 1), (1, 1))),
        conv("depthwise", 2, cp((1, 1), "same", (1, 1), groups=4)),
        conv("c2", 2, cp((2, 1), "valid", (1, 2))),
        conv("reflect", 2, cp((1, 1), (0, 0), (1, 1), 2, "reflect", (1, 1, 1, 1))),
        conv("replicate", 2, cp((1, 1), (0, 0), (1, 1), 1, "replicate", (1, 1, 0, 1)),
             bias=False),
        lin("fc"),
    )),
    Case("cnn3d", cnn3d, (2, 2, 4, 4, 4), (
        conv("same", 3, cp((1, 1, 1), "same", (1, 1, 1))),
        conv("grouped", 3, cp((2, 2, 2), (0, 0, 0), (1, 1, 1), groups=3), bias=False),
        conv("replicate", 3,
             cp((1, 1, 1), (0, 0, 0), (1, 1, 1), 1, "replicate", (1, 1, 1, 1, 0, 0))),
    )),
    Case("mixed_module_functional", MixedLinear, (2, 2, 5, 5), (
        L("kernel", "conv2d", "kernel", "kernel_bias", "function",
          conv=cp((1, 1), (1, 1), (1, 1))),
        L("depthwise", "conv2d", "depthwise", None, "function",
          conv=cp((1, 1), (0, 0), (1, 1), groups=4)),
        lin("proj"),
        fn_lin("w", "b"),
    )),
    Case("functional_conv1d", FunctionalConv1d, (2, 2, 9), (
        L("k1", "conv1d", "k1", "k1_bias", "function", conv=cp((2,), (1,), (1,))),
        L("k2", "conv1d", "k2", None, "function", conv=cp((1,), "same", (2,))),
    )),
    Case("matmul_zoo", MatmulZoo, (3, 4), MATMUL_ZOO_LAYERS),
    Case("matmul_zoo_2", MatmulZoo2, (3, 4), (
        fn_lin("w_in_out", "b_in_out", layout="in_out"),
        fn_lin("w_method"),
        fn_lin("w_mm"),
        fn_lin("w_permute", "b_permute"),
        fn_lin("w_flinear_t", layout="in_out"),
        fn_lin("w_mt"),
    )),
    Case("addmm_scaled", AddmmScaled, (3, 4), (lin("fc"),),
         {"w": ("addmm",), "b": ("addmm",)}),
    Case("functional_fn", functional_model, (3, 4), (
        L("fc1", "linear", "fc1.weight", "fc1.bias", "function"),
        L("fc2", "linear", "fc2.weight", "fc2.bias", "function"),
        fn_lin("out.w", "out.bias", layout="in_out"),
    ), {"temperature": ("mul",), "unused": NOT_USED}),
    Case("functional_cnn_fn", functional_cnn_model, (2, 2, 6, 6), (
        L("conv", "conv2d", "conv", "conv_bias", "function", conv=cp((2, 2), (1, 1), (1, 1))),
        fn_lin("head"),
    )),
    Case("norms", Norms, (4, 4), (lin("fc1"), lin("fc2"), lin("out")), {
        "ln.weight": ("layer_norm",), "ln.bias": ("layer_norm",),
        "bn.weight": ("batch_norm",), "bn.bias": ("batch_norm",),
    }),
    Case("conv_bn_inplace_relu", conv_bn, (3, 2, 4, 4), (
        conv("conv", 2, cp((1, 1), (0, 0), (1, 1)), bias=False), lin("fc"),
    ), {"bn.weight": ("batch_norm",), "bn.bias": ("batch_norm",)}),
    Case("inplace_after_layers", InplaceAfterLayers, (3, 4),
         (fn_lin("w", "b"), lin("lin"))),
    Case("inplace_mlp", inplace_mlp, (4, 4), (lin("0"), lin("2"), lin("4"))),
    Case("uncapturable_modules", UncapturableModules, (2, 3, 3), (lin("inp"),), {
        **{f"attn.{p}": ("multihead_attention", "module attn") for p in (
            "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")},
        "up.weight": ("conv_transpose1d",), "up.bias": ("conv_transpose1d",),
    }),
    Case("mha_self_attention", SelfAttention, (2, 3, 4), (
        L("attn.in_proj_weight", "linear", "attn.in_proj_weight", "attn.in_proj_bias", call_form="function"),
        L("attn.out_proj", "linear", "attn.out_proj.weight", "attn.out_proj.bias", call_form="function"),
        lin("head"),
    )),
    Case("tied_module", TiedModule, (3, 4), (lin("lin", uses=2), lin("out"))),
    Case("aliased_module", AliasedModule, (3, 4), (lin("enc", uses=2),)),
    Case("tied_parameter_modules", TiedParameterModules, (3, 4),
         (lin("a", bias=False, uses=2),)),
    Case("tied_module_and_function", TiedModuleAndFunction, (3, 4), (lin("lin", uses=2),)),
    Case("tied_functional", TiedFunctional, (3, 4), (fn_lin("w", uses=2), lin("head"))),
    Case("tied_inconsistent_layout", TiedInconsistentLayout, (3, 4), (lin("fc"),),
         {"w": ("tied", "weight_layout")}),
    Case("tied_inconsistent_bias", TiedInconsistentBias, (3, 4), (lin("fc"),), {
        "enc.weight": ("tied", "bias"), "enc.bias": ("tied", "bias"),
        "dec.bias": ("tied", "bias"),
    }),
    Case("unsupported_op", UnsupportedOp, (3, 4), (lin("lin"),), {"scale": ("mul",)}),
    Case("weight_reused", WeightReused, (3, 4), (lin("fc"),), {
        "lin.weight": ("sum",), "lin.bias": ("sum", "not preconditioned"),
    }),
    Case("param_on_the_left", ParamOnTheLeft, (3, 4), (lin("fc"),), {"w": ("matmul",)}),
    Case("scaled_linear_subclass", WithScaledLinear, (3, 4), (lin("fc"),),
         {"scaled.weight": ("mul",), "scaled.bias": ("linear",)}),
    Case("buffer_mask", BufferMask, (3, 4), (fn_lin("w"),)),
    Case("unused", Unused, (3, 4), (lin("lin"),),
         {"spare.weight": NOT_USED, "spare.bias": NOT_USED, "extra": NOT_USED}),
    Case("leaf_module_type", Gated, (3, 3), (lin("inp"), lin("out")),
         {"gate.lin.weight": ("Gate", "module gate"), "gate.lin.bias": ("Gate", "module gate")},
         {"leaf_modules": [Gate]}),
    Case("leaf_module_name", Gated, (3, 3), (lin("inp"), lin("out")),
         {"gate.lin.weight": ("module gate",), "gate.lin.bias": ("module gate",)},
         {"leaf_modules": ["gate"]}),
    Case("concrete_args", Flagged, (3, 3), (lin("lin"),), {},
         {"concrete_args": {"double": False}}),
    Case("traced_graph_module", traced_mlp, (3, 5), NESTED_MLP_LAYERS),
    Case("traced_matmul_zoo", traced_matmul_zoo, (3, 4), MATMUL_ZOO_LAYERS),
    Case("traced_tied_parameter_modules", traced_tied_parameter_modules, (3, 4),
         (lin("a", bias=False, uses=2),)),
]
# fmt: on


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@dataclass
class Instance:
    kmod: fxkfac.CompiledModule
    reference: Callable[[Tensor], Any]
    params: dict[str, Tensor]
    model: nn.Module | None
    x: Tensor


def instantiate(case: Case) -> Instance:
    """Build the case's model, an input, and compile it."""
    torch.manual_seed(0)
    built = case.build()
    x = torch.randn(case.input_shape, dtype=DTYPE)
    if isinstance(built, tuple):
        fn, params = built
        kmod = fxkfac.compile(fn, params=params, example_inputs=(x,), **case.kwargs)
        return Instance(kmod, lambda inp: fn(params, inp), params, None, x)
    model = built.to(DTYPE)
    kmod = fxkfac.compile(model, example_inputs=(x,), **case.kwargs)
    return Instance(kmod, model, dict(model.named_parameters()), model, x)


def scalar_loss(out: Tensor) -> Tensor:
    """A loss whose gradient differs per output entry."""
    weights = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (out * weights).sum() + 0.5 * (out**2).sum()


def grads(loss: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor | None]:
    values = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return dict(zip(params, values, strict=True))


def reconstruct_output(layer: fxkfac.LayerInfo, x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """The op output ``z`` recomputed from a captured input and the layer description."""
    weight = params[layer.weight]
    bias = params[layer.bias] if layer.bias is not None else None
    if layer.kind == "linear":
        canonical = weight.T if layer.weight_layout == "in_out" else weight
        return F.linear(x, canonical, bias)
    conv_params = layer.conv
    assert conv_params is not None
    if conv_params.explicit_pad is not None:
        x = F.pad(x, conv_params.explicit_pad, mode=conv_params.padding_mode)
    conv_fn = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[layer.kind]
    return conv_fn(
        x,
        weight,
        bias,
        conv_params.stride,
        conv_params.padding,
        conv_params.dilation,
        conv_params.groups,
    )


def tap_nodes(kmod: fxkfac.CompiledModule) -> list[fx.Node]:
    return [n for n in kmod.graph_module.graph.nodes if n.op == "call_function" and n.target is tap]


# ---------------------------------------------------------------------------------------------
# tests over the zoo
# ---------------------------------------------------------------------------------------------

zoo = pytest.mark.parametrize("case", ZOO, ids=[case.id for case in ZOO])


def test_zoo_ids_are_unique():
    assert len({case.id for case in ZOO}) == len(ZOO)


@zoo
def test_layers_match_hand_written_expectation(case: Case):
    inst = instantiate(case)
    found = [
        L(
            layer.name,
            layer.kind,
            layer.weight,
            layer.bias,
            layer.call_form,
            layer.weight_layout,
            len(layer.nodes),
            layer.conv,
        )
        for layer in inst.kmod.layers
    ]
    expected = list(case.layers)
    assert found == expected
    for layer, exp in zip(inst.kmod.layers, expected, strict=True):
        assert layer.tied == (exp.uses > 1)
        assert len(set(layer.nodes)) == exp.uses
        assert layer.node == layer.nodes[0]
        assert layer.weight_shape == tuple(inst.params[layer.weight].shape)


@zoo
def test_uncaptured_parameters_and_reasons(case: Case):
    inst = instantiate(case)
    uncaptured = inst.kmod.uncaptured
    assert set(uncaptured) == set(case.uncaptured), uncaptured
    for name, needles in case.uncaptured.items():
        for needle in needles:
            assert needle in uncaptured[name], (name, uncaptured[name])
    # every parameter is either in exactly one layer or uncaptured, never both
    in_layers = [p for layer in inst.kmod.layers for p in (layer.weight, layer.bias) if p]
    assert len(in_layers) == len(set(in_layers))
    assert not set(in_layers) & set(uncaptured)
    assert set(in_layers) | set(uncaptured) == set(inst.params)


@zoo
def test_outputs_equal_original_model(case: Case):
    inst = instantiate(case)
    expected = inst.reference(inst.x)
    out, cap = inst.kmod(inst.x)
    assert isinstance(cap, fxkfac.Capture)
    assert out.shape == expected.shape
    assert torch.equal(out, expected)
    assert torch.equal(cap.prediction, expected)
    _, cap_again = inst.kmod(inst.x)
    assert cap_again is not cap  # a fresh capture per forward pass


@zoo
def test_parameter_gradients_equal_original_model(case: Case):
    inst = instantiate(case)
    expected = grads(scalar_loss(inst.reference(inst.x)), inst.params)
    out, _ = inst.kmod(inst.x)
    actual = grads(scalar_loss(out), inst.params)
    assert any(g is not None for g in expected.values())
    for name, grad in expected.items():
        if grad is None:
            assert actual[name] is None, name
        else:
            torch.testing.assert_close(actual[name], grad, rtol=1e-13, atol=1e-14, msg=name)


@zoo
def test_capture_records_one_input_and_edge_per_use(case: Case):
    inst = instantiate(case)
    kmod = inst.kmod
    module_inputs: dict[str, list[Tensor]] = {}
    handles = []
    if inst.model is not None:
        for layer in kmod.layers:
            if any(use.call_form != "module" for use in layer.matches):
                continue
            records = module_inputs.setdefault(layer.name, [])
            weight = inst.params[layer.weight]
            for module in inst.model.modules():  # every module holding the (tied) weight
                if getattr(module, "weight", None) is weight:
                    handles.append(
                        module.register_forward_pre_hook(lambda m, args, r=records: r.append(args[0]))
                    )
    try:
        _, cap = kmod(inst.x)
    finally:
        for handle in handles:
            handle.remove()

    total_uses = sum(len(layer.nodes) for layer in kmod.layers)
    assert len(cap.inputs) == total_uses
    assert len(cap.output_edges) == total_uses
    assert all(x is not None for x in cap.inputs)
    assert all(edge is not None for edge in cap.output_edges)
    for index, layer in enumerate(kmod.layers):
        slots = cap.slots_of(index)
        assert len(slots) == len(layer.nodes)
        for slot in slots:
            x = cap.inputs[slot]
            if layer.kind == "linear":
                assert x.shape[-1] == layer.in_features
            else:
                assert x.ndim == int(layer.kind[4]) + 2
                assert x.shape[1] == layer.weight_shape[1] * layer.groups
            # the op output recomputed from the captured input has the recorded shape
            z = reconstruct_output(layer, x, inst.params)
            assert tuple(z.shape) == tuple(cap.output_shapes[slot])
        if layer.name in module_inputs:  # module calls: the exact tensors the module received
            recorded = module_inputs[layer.name]
            assert len(recorded) == len(slots)
            for slot, x in zip(slots, recorded, strict=True):
                assert torch.equal(cap.inputs[slot], x)


@zoo
def test_captured_inputs_and_output_grads_reproduce_parameter_gradients(case: Case):
    """dL/dW = Σ_uses (dL/dz)ᵀ x: wrong inputs, edges, layouts or conv settings break it."""
    inst = instantiate(case)
    expected = grads(scalar_loss(inst.reference(inst.x)), inst.params)
    out, cap = inst.kmod(inst.x)
    output_grads = torch.autograd.grad(scalar_loss(out), cap.output_edges)
    for index, layer in enumerate(inst.kmod.layers):
        names = [layer.weight] + ([layer.bias] if layer.bias else [])
        leaves = {n: inst.params[n].detach().clone().requires_grad_() for n in names}
        slots = cap.slots_of(index)
        outputs = [reconstruct_output(layer, cap.inputs[s].detach(), leaves) for s in slots]
        slot_grads = [output_grads[s] for s in slots]
        recomputed = torch.autograd.grad(outputs, list(leaves.values()), slot_grads)
        for name, grad in zip(names, recomputed, strict=True):
            torch.testing.assert_close(grad, expected[name], rtol=1e-12, atol=1e-13, msg=name)


@zoo
def test_rewritten_graph_lints_and_taps_every_use(case: Case):
    inst = instantiate(case)
    kmod = inst.kmod
    kmod.graph_module.graph.lint()
    assert isinstance(kmod.code, str)
    assert "tap" in kmod.code
    taps = tap_nodes(kmod)
    assert len(taps) == sum(len(layer.nodes) for layer in kmod.layers)
    assert sorted(node.args[3] for node in taps) == list(range(len(taps)))


@zoo
def test_summary_mentions_layers_and_uncaptured(case: Case):
    inst = instantiate(case)
    summary = inst.kmod.summary()
    first_words = [line.split()[0] for line in summary.splitlines() if line.strip()]
    for layer in inst.kmod.layers:
        assert layer.name in first_words, (layer.name, summary)
    for name, reason in inst.kmod.uncaptured.items():
        assert f"{name}: {reason}" in summary
    assert f"{len(inst.kmod.layers)} layers captured" in summary
    assert summary.splitlines()[0].split()[-2:] == ["factor", "memory"]


@zoo
def test_compiled_module_shares_parameters(case: Case):
    inst = instantiate(case)
    shared = inst.kmod.named_model_parameters()
    for layer in inst.kmod.layers:
        for name in filter(None, (layer.weight, layer.bias)):
            assert shared[name] is inst.params[name]
    # an in-place update of the original parameters is seen by the compiled module
    with torch.no_grad():
        for p in inst.params.values():
            p.mul_(0.5)
    out, _ = inst.kmod(inst.x)
    if case.id.startswith("mha"):  # decomposed attention: same maths, other kernel order
        torch.testing.assert_close(out, inst.reference(inst.x), rtol=1e-12, atol=1e-12)
    else:
        assert torch.equal(out, inst.reference(inst.x))


# ---------------------------------------------------------------------------------------------
# graph modules, trace errors, leaf modules, bad arguments
# ---------------------------------------------------------------------------------------------


def test_graph_module_is_compiled_without_retracing_and_left_untouched():
    gm = fx.symbolic_trace(NestedMLP().to(DTYPE))
    code_before = gm.code
    nodes_before = len(gm.graph.nodes)
    kmod = fxkfac.compile(gm)
    assert kmod.tracer == "graph_module"
    assert gm.code == code_before
    assert len(gm.graph.nodes) == nodes_before
    assert "tap" not in gm.code
    assert len(kmod.graph_module.graph.nodes) > nodes_before


def test_data_dependent_control_flow_raises_trace_error_naming_the_line():
    lines, start = inspect.getsourcelines(Gate.forward)
    offset = next(i for i, line in enumerate(lines) if "if x.sum() > 0:" in line)
    with pytest.raises(TraceError) as info:
        fxkfac.compile(Gated().to(DTYPE), example_inputs=(torch.randn(3, 3, dtype=DTYPE),))
    message = str(info.value)
    assert "if x.sum() > 0:" in message
    assert f"test_compile_zoo.py:{start + offset}" in message
    assert "leaf_modules" in message
    assert "concrete_args" in message
    assert isinstance(info.value, fxkfac.FxKfacError)


def branchy_fn(params: dict[str, Tensor], x: Tensor) -> Tensor:
    h = F.linear(x, params["w"])
    if h.mean() > 0:
        return torch.tanh(h)
    return h


def test_functional_model_control_flow_raises_trace_error_naming_the_line():
    params = {"w": torch.randn(2, 3, dtype=DTYPE, requires_grad=True)}
    with pytest.raises(TraceError) as info:
        fxkfac.compile(branchy_fn, params=params, example_inputs=(torch.randn(4, 3),))
    message = str(info.value)
    assert "if h.mean() > 0:" in message
    assert "branchy_fn" in message
    assert "leaf_modules" in message and "concrete_args" in message


def test_python_flag_raises_trace_error_without_concrete_args():
    with pytest.raises(TraceError, match="concrete_args"):
        fxkfac.compile(Flagged().to(DTYPE))


def test_concrete_args_fix_the_traced_branch():
    torch.manual_seed(0)
    model = Flagged().to(DTYPE)
    x = torch.randn(3, 3, dtype=DTYPE)
    kmod = fxkfac.compile(model, concrete_args={"double": True})
    out, _ = kmod(x, True)  # torch.fx keeps the fixed argument, asserting its value
    assert torch.equal(out, model(x, double=True))
    assert not torch.equal(out, model(x))


@pytest.mark.parametrize("leaf", [Gate, "gate"], ids=["type", "name"])
def test_leaf_module_runs_its_control_flow_eagerly(leaf):
    torch.manual_seed(0)
    model = Gated().to(DTYPE)
    kmod = fxkfac.compile(model, leaf_modules=[leaf])
    assert [layer.name for layer in kmod.layers] == ["inp", "out"]
    assert set(kmod.uncaptured) == {"gate.lin.weight", "gate.lin.bias"}
    x = torch.randn(3, 3, dtype=DTYPE)
    for sign in (1.0, -1.0):  # both branches of the leaf's `if` are taken at run time
        inputs = sign * x.abs() * 10
        out, _ = kmod(inputs)
        assert torch.equal(out, model(inputs))


def test_functional_model_input_count_from_signature():
    torch.manual_seed(0)
    fn, params = functional_model()
    kmod = fxkfac.compile(fn, params=params)  # no example_inputs: fn(params, x) has one input
    x = torch.randn(3, 4, dtype=DTYPE)
    out, cap = kmod(x)
    assert torch.equal(out, fn(params, x))
    assert [layer.name for layer in kmod.layers] == ["fc1", "fc2", "out.w"]
    assert len(cap.inputs) == 3


def test_functional_model_with_varargs_needs_example_inputs():
    def fn(params, *inputs):
        return F.linear(inputs[0], params["w"])

    params = {"w": torch.randn(2, 3, dtype=DTYPE, requires_grad=True)}
    with pytest.raises(FxKfacError, match="example_inputs"):
        fxkfac.compile(fn, params=params)


def test_layer_names_are_unique_or_rejected():
    def fn(params, x):
        return F.linear(torch.tanh(F.linear(x, params["fc"])), params["fc.weight"])

    params = {
        "fc": torch.randn(3, 3, dtype=DTYPE, requires_grad=True),
        "fc.weight": torch.randn(2, 3, dtype=DTYPE, requires_grad=True),
    }
    x = torch.randn(4, 3, dtype=DTYPE)
    try:
        kmod = fxkfac.compile(fn, params=params, example_inputs=(x,))
    except FxKfacError:
        return  # refusing the ambiguous names is a fix too
    names = [layer.name for layer in kmod.layers]
    assert len(kmod.layers) == 2
    assert len(set(names)) == 2, names
    _, cap = kmod(x)
    factors = cap.factors(nn.MSELoss(), torch.randn(4, 2, dtype=DTYPE))
    assert len(factors) == 2


@pytest.mark.parametrize(("build", "shared"), [(SharedBiasFunctional, "b"), (SharedBiasModules, "a.bias")])
def test_shared_bias_is_not_preconditioned_twice(build, shared):
    torch.manual_seed(0)
    kmod = fxkfac.compile(build().to(DTYPE))
    biases = [layer.bias for layer in kmod.layers if layer.bias is not None]
    assert len(biases) == len(set(biases)), kmod.layers  # no parameter in two layers
    assert shared in kmod.uncaptured


def test_trace_error_only_suggests_tracers_that_exist():
    with pytest.raises(TraceError) as info:
        fxkfac.compile(Gated().to(DTYPE))
    suggested = re.findall(r"tracer=['\"](\w+)['\"]", str(info.value))
    for tracer in suggested:
        try:
            fxkfac.compile(Gated().to(DTYPE), tracer=tracer)
        except FxKfacError as error:
            assert "unknown tracer" not in str(error), (tracer, str(error))


def test_functional_model_without_params_is_rejected():
    with pytest.raises(FxKfacError, match="params"):
        fxkfac.compile(functional_mlp, example_inputs=(torch.randn(3, 4, dtype=DTYPE),))


def test_functional_params_must_be_tensors():
    with pytest.raises(FxKfacError, match="tensor"):
        fxkfac.compile(functional_mlp, params={"fc1.weight": 3.0})


def test_module_with_params_argument_is_rejected():
    model = NestedMLP().to(DTYPE)
    with pytest.raises(FxKfacError, match="params"):
        fxkfac.compile(model, params=dict(model.named_parameters()))


def test_non_callable_is_rejected():
    with pytest.raises(FxKfacError, match="int"):
        fxkfac.compile(42)


def test_unknown_tracer_is_rejected():
    with pytest.raises(FxKfacError, match="no_such_tracer"):
        fxkfac.compile(NestedMLP(), tracer="no_such_tracer")


# ---------------------------------------------------------------------------------------------
# in-place ops after a layer: gradient edges, not output tensors
# ---------------------------------------------------------------------------------------------


def _inplace_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    inplace = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).to(DTYPE)
    plain = copy.deepcopy(inplace)
    plain[1] = nn.ReLU()
    return inplace, plain


def test_inplace_relu_after_layer_gives_preactivation_gradient_factor():
    inplace, plain = _inplace_pair()
    x = torch.randn(8, 4, dtype=DTYPE)
    y = torch.randn(8, 3, dtype=DTYPE)
    loss_func = nn.MSELoss()

    # independent reference: empirical B = 1/N Σ_n g_n g_nᵀ, g_n = ∂(½‖f_n − y_n‖²)/∂z_n
    z = plain[0](x)
    z.retain_grad()
    relu_out = plain[1](z)
    relu_out.retain_grad()
    f = plain[2](relu_out)
    (0.5 * ((f - y) ** 2).sum()).backward()
    g = z.grad
    b_reference = g.T @ g / x.shape[0]
    g_post = relu_out.grad  # gradient w.r.t. the ReLU output: what a naive capture would see
    b_naive = g_post.T @ g_post / x.shape[0]
    assert (z < 0).any()  # the ReLU masks something, so the naive factor differs
    assert not torch.allclose(b_naive, b_reference)

    kmod = fxkfac.compile(inplace)
    out, cap = kmod(x)
    assert torch.equal(out, plain(x))
    factors = cap.factors(loss_func, y, fisher_type="empirical")
    _, b_inplace = factors["0"]
    torch.testing.assert_close(b_inplace, b_reference, rtol=1e-12, atol=1e-14)

    # and the same as the non-inplace model through fxkfac
    _, cap_plain = fxkfac.compile(plain)(x)
    factors_plain = cap_plain.factors(loss_func, y, fisher_type="empirical")
    for name in ("0", "2"):
        torch.testing.assert_close(factors[name][0], factors_plain[name][0], rtol=0, atol=0)
        torch.testing.assert_close(factors[name][1], factors_plain[name][1], rtol=1e-12, atol=1e-14)


def test_inplace_relu_after_layer_input_factor():
    inplace, _ = _inplace_pair()
    x = torch.randn(8, 4, dtype=DTYPE)
    y = torch.randn(8, 3, dtype=DTYPE)
    _, cap = fxkfac.compile(inplace)(x)
    factors = cap.factors(nn.MSELoss(), y, fisher_type="empirical")
    x_tilde = torch.cat([x, torch.ones(8, 1, dtype=DTYPE)], dim=1)
    reduction = 2.0 / y.numel()  # MSELoss(mean): loss = 2/(N C) Σ ½‖f − y‖²
    torch.testing.assert_close(factors["0"][0], reduction * x_tilde.T @ x_tilde)
    h = torch.relu(inplace[0](x)).detach()
    h_tilde = torch.cat([h, torch.ones(8, 1, dtype=DTYPE)], dim=1)
    torch.testing.assert_close(factors["2"][0], reduction * h_tilde.T @ h_tilde)
