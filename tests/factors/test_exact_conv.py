"""Exact K-FAC cases for convolutions.

* expand: a convolution followed only by (optionally) a pointwise 1x1 convolution with the
  same groups, MSE over the whole output. Every output pixel is a separate loss term and the
  output gradients do not depend on the datum or pixel, so KFAC-expand type-2 == GGN; the
  test exercises the patch extraction (stride, padding incl. 'same' and padding modes,
  dilation, groups, depthwise) against autodiff.
* reduce: convolution -> global average pool -> linear (no nonlinearity), MSE:
  KFAC-reduce type-2 == GGN.
* cross-entropy with extra dims ``[N, C, d1, ...]`` on a pointwise layer whose logits do
  not depend on the datum or position (so the loss Hessian is shared and K-FAC is exact)
  while its inputs do.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxkfac

from .references import (
    assert_matrix_close,
    exact_blocks,
    ggn_block,
    kfac_matrix,
    module_fn,
    relative_error,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (7,), 2: (6, 5), 3: (4, 4, 3)}

# (ndim, C_in, C_out, conv kwargs)
CONFIGS = {
    "1d": (1, 2, 3, dict(kernel_size=3)),
    "1d-stride-pad": (1, 2, 3, dict(kernel_size=3, stride=2, padding=2)),
    "1d-dilation-same": (1, 2, 3, dict(kernel_size=2, dilation=2, padding="same")),
    "1d-groups": (1, 4, 6, dict(kernel_size=2, groups=2)),
    "1d-circular": (1, 2, 3, dict(kernel_size=3, padding=1, padding_mode="circular")),
    "2d": (2, 2, 3, dict(kernel_size=3)),
    "2d-stride": (2, 2, 3, dict(kernel_size=3, stride=2)),
    "2d-padding": (2, 2, 3, dict(kernel_size=3, padding=1)),
    "2d-asymmetric": (2, 2, 3, dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0))),
    "2d-dilation": (2, 2, 3, dict(kernel_size=2, dilation=(2, 3))),
    "2d-same": (2, 2, 3, dict(kernel_size=3, padding="same")),
    "2d-same-even": (2, 2, 3, dict(kernel_size=(2, 3), dilation=(1, 2), padding="same")),
    "2d-valid": (2, 2, 3, dict(kernel_size=2, padding="valid")),
    "2d-circular": (2, 2, 3, dict(kernel_size=3, padding=1, padding_mode="circular")),
    "2d-reflect": (2, 2, 3, dict(kernel_size=3, padding=(1, 2), padding_mode="reflect")),
    "2d-replicate": (2, 2, 3, dict(kernel_size=2, padding=1, padding_mode="replicate")),
    "2d-groups": (2, 4, 4, dict(kernel_size=3, groups=2)),
    "2d-groups-stride-pad": (2, 4, 6, dict(kernel_size=3, groups=2, stride=2, padding=1)),
    "2d-depthwise": (2, 3, 6, dict(kernel_size=3, groups=3, padding=1)),
    "3d": (3, 2, 3, dict(kernel_size=2)),
    "3d-stride-pad": (3, 2, 3, dict(kernel_size=2, stride=2, padding=1)),
    "3d-same": (3, 2, 2, dict(kernel_size=(3, 2, 1), padding="same")),
    "3d-groups": (3, 2, 4, dict(kernel_size=2, groups=2)),
    "3d-circular": (3, 1, 2, dict(kernel_size=2, padding=1, padding_mode="circular")),
}
CONFIG = pytest.mark.parametrize("config", list(CONFIGS))
BIAS = pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])


def conv_net(config: str, bias: bool, pointwise: bool, seed: int = 1) -> nn.Sequential:
    """The convolution of ``config``, optionally followed by a 1x1 conv with the same groups."""
    ndim, c_in, c_out, kwargs = CONFIGS[config]
    torch.manual_seed(seed)
    layers = [CONV[ndim](c_in, c_out, bias=bias, **kwargs)]
    if pointwise:
        groups = kwargs.get("groups", 1)
        layers.append(CONV[ndim](c_out, 2 * groups, kernel_size=1, groups=groups, bias=bias))
    return nn.Sequential(*layers)


def conv_input(config: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    ndim, c_in, _, _ = CONFIGS[config]
    return torch.rand(batch, c_in, *SPATIAL[ndim], generator=torch.Generator().manual_seed(seed))


def names_of(model: nn.Module, name: str) -> tuple[str, str | None]:
    has_bias = model.get_submodule(name).bias is not None
    return f"{name}.weight", (f"{name}.bias" if has_bias else None)


def check_against_ggn(model, x, y, loss_func, factors, layers):
    fn, params = module_fn(model)
    for name in layers:
        A, B = factors[name]
        blocks = exact_blocks(fn, params, (x,), y, loss_func, *names_of(model, name))
        for order in ("rvec", "cvec"):
            assert_matrix_close(kfac_matrix(A, B, order), blocks.ggn(order), name=f"{name} {order}")


@pytest.mark.parametrize(
    ("bias", "reduction"), [(True, "mean"), (False, "sum")], ids=["bias-mean", "nobias-sum"]
)
@pytest.mark.parametrize("pointwise", [False, True], ids=["single", "pointwise"])
@CONFIG
def test_expand_type2_equals_ggn(config, pointwise, bias, reduction):
    model = conv_net(config, bias, pointwise)
    x = conv_input(config)
    out = model(x)
    y = torch.rand(out.shape, generator=torch.Generator().manual_seed(3))
    loss_func = nn.MSELoss(reduction=reduction)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    _, cap = kmod(x)
    factors = cap.factors(loss_func, y, fisher_type="type-2")
    layers = ["0", "1"] if pointwise else ["0"]
    assert sorted(factors) == layers

    conv = model[0]
    groups = conv.groups
    d_a = conv.weight[0].numel() + bias
    d_b = conv.out_channels // groups
    A, B = factors["0"]
    expected = (d_a, d_a) if groups == 1 else (groups, d_a, d_a)
    assert A.shape == expected, (A.shape, expected)
    assert B.shape == ((*expected[:-2], d_b, d_b))
    # orders: cvec of a grouped layer is only a re-indexing of rvec; one check suffices there
    check_against_ggn(model, x, y, loss_func, factors, layers)


def test_grouped_ggn_is_block_diagonal():
    """Sanity check of the reference: the exact GGN of a grouped conv (MSE, pointwise grouped
    head) has zero blocks between groups, so stacked factors can be exact."""
    model = conv_net("2d-groups", True, True)
    x = conv_input("2d-groups")
    y = torch.rand(model(x).shape)
    fn, params = module_fn(model)
    ggn = ggn_block(fn, params, (x,), y, nn.MSELoss(), "0.weight", "0.bias")
    half = ggn.shape[0] // 2
    assert ggn[:half, half:].abs().max() == 0
    assert ggn[:half, :half].abs().max() > 0


class GlobalAveragePool(nn.Module):
    def __init__(self, ndim: int):
        super().__init__()
        self.dims = tuple(range(2, 2 + ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.dims, keepdim=True)


REDUCE_CONFIGS = [
    "1d",
    "1d-stride-pad",
    "2d",
    "2d-padding",
    "2d-asymmetric",
    "2d-circular",
    "2d-same-even",
    "2d-groups",
    "2d-depthwise",
    "3d-stride-pad",
    "3d-groups",
]


def reduce_net(config: str, bias: bool, seed: int = 2) -> nn.Sequential:
    """conv -> global average pool -> 1x1 conv (same groups) -> flatten -> linear."""
    ndim, _, c_out, kwargs = CONFIGS[config]
    groups = kwargs.get("groups", 1)
    torch.manual_seed(seed)
    first = CONV[ndim](CONFIGS[config][1], c_out, bias=bias, **kwargs)
    if groups == 1:
        return nn.Sequential(first, GlobalAveragePool(ndim), nn.Flatten(), nn.Linear(c_out, 3, bias=bias))
    # a linear head would couple the groups; a grouped 1x1 conv on the pooled map keeps the
    # GGN block-diagonal over groups
    return nn.Sequential(
        first,
        GlobalAveragePool(ndim),
        CONV[ndim](c_out, 2 * groups, kernel_size=1, groups=groups, bias=bias),
        nn.Flatten(),
    )


@pytest.mark.parametrize(
    ("bias", "reduction"), [(True, "mean"), (False, "sum")], ids=["bias-mean", "nobias-sum"]
)
@pytest.mark.parametrize("config", REDUCE_CONFIGS)
def test_reduce_type2_equals_ggn(config, bias, reduction):
    model = reduce_net(config, bias)
    x = conv_input(config, batch=3)
    y = torch.rand(model(x).shape, generator=torch.Generator().manual_seed(4))
    loss_func = nn.MSELoss(reduction=reduction)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(loss_func, y, fisher_type="type-2", kfac_approx="reduce")
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d,
              nn.Conv2d, nn.Conv3d))]  # fmt: skip
    assert sorted(factors) == sorted(layers)
    check_against_ggn(model, x, y, loss_func, factors, layers)


def test_reduce_case_discriminates():
    """Expand is not exact in the reduce case (so the reduce test is not vacuous)."""
    model = reduce_net("2d-padding", True)
    x = conv_input("2d-padding", batch=3)
    y = torch.rand(model(x).shape)
    loss_func = nn.MSELoss()
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(loss_func, y, kfac_approx="expand")
    fn, params = module_fn(model)
    ggn = ggn_block(fn, params, (x,), y, loss_func, "0.weight", "0.bias")
    assert relative_error(kfac_matrix(*factors["0"]), ggn) > 0.05


@pytest.mark.parametrize("config", ["2d-groups", "1d-stride-pad"])
def test_expand_mc_converges_to_ggn(config):
    """Every pixel adds samples: M = 400 labels per datum already give a few percent."""
    model = conv_net(config, True, True)
    x = conv_input(config)
    y = torch.rand(model(x).shape)
    loss_func = nn.MSELoss()
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(
        loss_func, y, fisher_type="mc", mc_samples=400, generator=torch.Generator().manual_seed(0)
    )
    fn, params = module_fn(model)
    for name in ("0", "1"):
        ggn = ggn_block(fn, params, (x,), y, loss_func, *names_of(model, name))
        error = relative_error(kfac_matrix(*factors[name]), ggn)
        assert error < 0.06, f"{name}: {error:.3g}"


# ---------------------------------------------------------------------------------------------
# cross-entropy with extra dims [N, C, d1, ...]

CLASSES = 4


class PositionsLast(nn.Module):
    """``[N, d1, C]`` -> ``[N, C, d1]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def ce_model(kind: str, c_in: int, bias: bool, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(c_in, CLASSES, bias=bias), PositionsLast())
        layer = model[0]
    else:
        ndim = int(kind[-2])
        model = nn.Sequential(CONV[ndim](c_in, CLASSES, kernel_size=1, bias=bias))
        layer = model[0]
    with torch.no_grad():
        # only input channel 0 reaches the logits ...
        layer.weight[:, 1:] = 0.0
    return model


def ce_input(kind: str, c_in: int, batch: int) -> torch.Tensor:
    """... and it is constant, while the other channels vary over data and positions."""
    positions = {"linear": (5,), "conv1d": (5,), "conv2d": (3, 2)}[kind]
    x = torch.rand(batch, c_in, *positions, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0.7
    return x.transpose(1, 2) if kind == "linear" else x


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@BIAS
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_cross_entropy_extra_dims_type2_equals_ggn(kind, bias, reduction):
    c_in, batch = 3, 2
    model = ce_model(kind, c_in, bias)
    x = ce_input(kind, c_in, batch)
    logits = model(x)
    assert logits.shape[:2] == (batch, CLASSES) and logits.ndim >= 3
    # the logits are shared by all data and positions, but are not uniform
    flat = logits.movedim(1, -1).reshape(-1, CLASSES)
    assert torch.allclose(flat, flat[:1].expand_as(flat)) and flat[0].std() > 0.1
    y = torch.randint(0, CLASSES, (batch, *logits.shape[2:]), generator=torch.Generator())
    loss_func = nn.CrossEntropyLoss(reduction=reduction)
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    factors = cap.factors(loss_func, y, fisher_type="type-2")
    check_against_ggn(model, x, y, loss_func, factors, ["0"])


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_cross_entropy_extra_dims_probability_targets(kind):
    """Soft (probability) targets take the same type-2 path: still exact."""
    model = ce_model(kind, 3, True)
    x = ce_input(kind, 3, 2)
    logits = model(x)
    y = torch.rand(logits.shape).softmax(dim=1)
    loss_func = nn.CrossEntropyLoss()
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    check_against_ggn(model, x, y, loss_func, cap.factors(loss_func, y), ["0"])


# ---------------------------------------------------------------------------------------------
# functional convolutions

FUNCTIONAL = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
FUNCTIONAL_CONFIGS = [
    name for name, (_, _, _, kw) in CONFIGS.items() if kw.get("padding_mode", "zeros") == "zeros"
]


@pytest.mark.parametrize("keywords", [False, True], ids=["positional", "keywords"])
@pytest.mark.parametrize("config", FUNCTIONAL_CONFIGS)
def test_functional_conv_expand_type2_equals_ggn(config, keywords):
    """``F.convNd(x, w, b, stride, padding, dilation, groups)`` in a functional model."""
    ndim, _c_in, _c_out, kwargs = CONFIGS[config]
    module = conv_net(config, True, True)
    params = {name: p.detach().clone().requires_grad_() for name, p in module.named_parameters()}
    conv = FUNCTIONAL[ndim]
    hyper = dict(
        stride=kwargs.get("stride", 1),
        padding=kwargs.get("padding", 0),
        dilation=kwargs.get("dilation", 1),
        groups=kwargs.get("groups", 1),
    )

    def fn(p, x):
        if keywords:
            h = conv(x, p["0.weight"], bias=p["0.bias"], **hyper)
        else:
            h = conv(x, p["0.weight"], p["0.bias"], *hyper.values())
        return conv(h, p["1.weight"], p["1.bias"], groups=hyper["groups"])

    x = conv_input(config)
    y = torch.rand(module(x).shape, generator=torch.Generator().manual_seed(3))
    loss_func = nn.MSELoss()
    kmod = fxkfac.compile(fn, params=params, example_inputs=(x,))
    assert [(layer.name, layer.kind) for layer in kmod.layers] == [
        ("0", f"conv{ndim}d"),
        ("1", f"conv{ndim}d"),
    ]
    _, cap = kmod(x)
    factors = cap.factors(loss_func, y)
    for name in ("0", "1"):
        blocks = exact_blocks(fn, params, (x,), y, loss_func, f"{name}.weight", f"{name}.bias")
        assert_matrix_close(kfac_matrix(*factors[name]), blocks.ggn(), name=name)
    # and the module form gives the same factors
    _, cap_module = fxkfac.compile(module, example_inputs=(x,))(x)
    for name, pair in cap_module.factors(loss_func, y).items():
        for a, b in zip(pair, factors[name], strict=True):
            assert_matrix_close(a, b, name=f"module vs functional {name}")


@pytest.mark.parametrize("padding_mode", ["circular", "reflect", "replicate"])
def test_same_padding_with_padding_mode(padding_mode):
    """``padding='same'`` combined with a non-zero padding mode (even kernel: asymmetric)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=(2, 3), padding="same", padding_mode=padding_mode),
        nn.Conv2d(3, 2, kernel_size=1),
    )
    x = torch.rand(2, 2, 4, 5)
    y = torch.rand(model(x).shape)
    loss_func = nn.MSELoss()
    _, cap = fxkfac.compile(model, example_inputs=(x,))(x)
    check_against_ggn(model, x, y, loss_func, cap.factors(loss_func, y), ["0", "1"])
