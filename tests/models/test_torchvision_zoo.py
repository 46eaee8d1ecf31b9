"""The 16 torchvision classification models of DESIGN.md compile with every Linear/Conv captured.

For each model (``weights=None``, eval mode, batch 1, the smallest input it comfortably takes):

* ``coverage``: ``fxkfac.compile(model, example_inputs=(x,))`` (tracer ``'auto'``) uses the
  expected tracer (``'export'`` for ``swin_t``, whose qkv/proj weights are passed into the
  wrapped ``shifted_window_attention``; ``'fx'`` for the others) and every parameter of every
  ``nn.Linear`` / ``nn.Conv*`` module and of every ``nn.MultiheadAttention`` (``in_proj``) is
  the weight or bias of a captured layer — none is listed in ``kmod.uncaptured``. No forward.
* ``outputs``: the compiled module returns the model's outputs bit for bit (``torch.equal``),
  except where the attention decomposition changes the kernel order (``vit_b_16``: its
  ``nn.MultiheadAttention`` is traced through ``F.linear`` + ``scaled_dot_product_attention``),
  where a tight ``assert_close`` is used.

The 32 checks take ~45 s on 2 cores (model construction and swin_t's torch.export trace dominate).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import fxkfac


@dataclass(frozen=True)
class Case:
    size: int = 32
    """Input height and width (the smallest size the model comfortably accepts)."""
    tracer: str = "fx"
    """The tracer ``'auto'`` is expected to pick."""
    exact: bool = True
    """``torch.equal`` outputs (``False``: ``assert_close`` with a tight tolerance)."""
    kwargs: dict[str, Any] = field(default_factory=dict)


NO_AUX = {"aux_logits": False, "init_weights": False}  # eval mode never runs the aux heads

ZOO = {
    "resnet18": Case(),
    "resnet50": Case(),
    "mobilenet_v2": Case(),
    "mobilenet_v3_small": Case(),
    "efficientnet_b0": Case(),
    "densenet121": Case(),
    "vgg11": Case(),
    "convnext_tiny": Case(),
    "regnet_x_400mf": Case(),
    "shufflenet_v2_x0_5": Case(),
    "squeezenet1_0": Case(),
    "vit_b_16": Case(size=224, exact=False),  # image_size is fixed
    "swin_t": Case(tracer="export"),
    "maxvit_t": Case(size=224),  # the window partition needs 224
    "inception_v3": Case(size=75, kwargs=NO_AUX),  # minimum input size 75
    "googlenet": Case(kwargs=NO_AUX),
}


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
    compiled.cache_clear()  # free the last model


@functools.lru_cache(maxsize=1)
def compiled(name: str) -> tuple[nn.Module, torch.Tensor, fxkfac.CompiledModule]:
    """``(model, x, kmod)``; cached so a model's coverage and output checks build it once."""
    case = ZOO[name]
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **case.kwargs).eval()
    x = torch.randn(1, 3, case.size, case.size, generator=torch.Generator().manual_seed(1))
    kmod = fxkfac.compile(model, example_inputs=(x,))
    return model, x, kmod


def linear_conv_parameters(model: nn.Module) -> list[str]:
    """Qualified names of all parameters of Linear / Conv modules and of MHA's in_proj."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)):
            prefix = f"{module_name}." if module_name else ""
            names += [f"{prefix}{short}" for short, _ in module.named_parameters(recurse=False)]
    return names


CHECKS = [
    pytest.param(name, check, id=f"{name}-{check}") for name in ZOO for check in ("coverage", "outputs")
]


@pytest.mark.parametrize(("name", "check"), CHECKS)
def test_torchvision_model(name: str, check: str):
    model, x, kmod = compiled(name)
    case = ZOO[name]
    if check == "coverage":
        assert kmod.tracer == case.tracer
        expected = linear_conv_parameters(model)
        assert expected, f"{name} has no Linear/Conv parameters?"
        uncaptured = {p: kmod.uncaptured[p] for p in expected if p in kmod.uncaptured}
        assert not uncaptured, f"{name}: {len(uncaptured)}/{len(expected)} Linear/Conv params uncaptured"
        in_layers = {layer.weight for layer in kmod.layers} | {layer.bias for layer in kmod.layers}
        missing = [p for p in expected if p not in in_layers]
        assert not missing, f"{name}: Linear/Conv params in no captured layer: {missing[:5]}"
        # nothing else is claimed as a layer parameter, and every parameter is accounted for
        assert in_layers - {None} <= set(expected)
        assert set(kmod.uncaptured) | (in_layers - {None}) == set(dict(model.named_parameters()))
        return
    with torch.no_grad():
        expected_out = model(x)
        out, cap = kmod(x)
    assert len(cap.inputs) == sum(len(layer.nodes) for layer in kmod.layers)
    assert all(inp is not None for inp in cap.inputs), "a captured layer was not recorded"
    if case.exact:
        assert torch.equal(out, expected_out), f"max abs diff {(out - expected_out).abs().max():.3g}"
    else:
        torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
