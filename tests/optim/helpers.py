"""Exact references for the optimizer tests (autodiff in float64, nothing from fxkfac).

A layer is described by ``(weight name, bias name or None, layout)``; its canonical matrix
is ``W̃ = [W | b]`` (``[Wᵀ | b]`` for a weight stored ``[D_in, D_out]``, ``layout='in_out'``),
flattened row-major (rvec), the order of the GGN blocks of :mod:`factors.references`.
"""

from __future__ import annotations

import copy

import torch
from factors.references import ggn_block, module_fn
from torch import Tensor, nn
from torch.func import functional_call, grad

import fxkfac

Layer = tuple[str, str | None, str]


def linear_layers(model: nn.Module) -> dict[str, Layer]:
    """``{layer name: (weight, bias, 'out_in')}`` of every ``nn.Linear`` submodule."""
    return {
        name: (f"{name}.weight", f"{name}.bias" if m.bias is not None else None, "out_in")
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


def canonical(params: dict[str, Tensor], layer: Layer) -> Tensor:
    """``W̃ = [W | b]`` (``[D_out, D_in (+1)]``) from parameter-shaped tensors."""
    weight, bias, layout = layer
    w = params[weight]
    matrix = w.T if layout == "in_out" else w.reshape(w.shape[0], -1)
    if bias is not None:
        matrix = torch.cat([matrix, params[bias].reshape(-1, 1)], dim=1)
    return matrix


def loss_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_func: nn.Module) -> dict[str, Tensor]:
    """``∇_θ loss`` of every parameter, by ``torch.func`` (independent of ``.grad``)."""
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return grad(lambda p: loss_func(functional_call(model, p, (x,)), y))(params)


def exact_natural_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_func: nn.Module,
    layers: dict[str, Layer],
    extra: dict[str, Tensor] | None = None,
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """``{layer: (G⁻¹ ĝ, ĝ, G)}``: canonical matrices and ``G``, the exact per-layer GGN block.

    ``ĝ = ∇ loss + extra`` (``extra``: parameter-shaped additions, e.g. ``wd · θ``).
    """
    fn, params = module_fn(model)
    grads = loss_gradient(model, x, y, loss_func)
    if extra is not None:
        grads = {name: g + extra[name] for name, g in grads.items()}
    result = {}
    for name, layer in layers.items():
        weight, bias, layout = layer
        ggn = ggn_block(fn, params, (x,), y, loss_func, weight, bias, layout=layout)
        g = canonical(grads, layer)
        natural = torch.linalg.solve(ggn, g.flatten()).reshape(g.shape)
        result[name] = (natural, g, ggn)
    return result


def parameters_of(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def canonical_change(before: dict[str, Tensor], after: dict[str, Tensor], layer: Layer) -> Tensor:
    """``W̃_before − W̃_after`` of one layer."""
    return canonical(before, layer) - canonical(after, layer)


def train_step(kmod, opt, loss_func, x, y, **step_kwargs):
    """The loop users write, one iteration; returns the stats of ``opt.step``."""
    out, cap = kmod(x)
    loss = loss_func(out, y)
    opt.zero_grad()
    loss.backward()
    return opt.step(cap, **step_kwargs)


def compiled_copy(model: nn.Module, x: Tensor) -> tuple[nn.Module, fxkfac.CompiledModule]:
    """A deep copy of ``model`` and its compiled module (no optimizer attached)."""
    clone = copy.deepcopy(model)
    return clone, fxkfac.compile(clone, example_inputs=(x,))


def snapshot(model: nn.Module, opt: fxkfac.KFAC) -> dict:
    """Copies of everything a K-FAC step may change: parameters, factors, inverses, state."""
    pre = opt.preconditioner
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "factors": copy.deepcopy(pre.factors),
        "inverses": {n: {k: v.clone() for k, v in inv.tensors.items()} for n, inv in pre.inverses.items()},
        "steps": pre.steps,
        "state": copy.deepcopy({id(p): dict(s) for p, s in opt.state.items()}),
        "damping": pre.damping,
    }


def assert_same(a: dict, b: dict) -> None:
    """Two :func:`snapshot` s are bit-identical."""
    assert a["steps"] == b["steps"]
    assert a["damping"] == b["damping"]
    for name, p in a["params"].items():
        assert torch.equal(p, b["params"][name]), name
    assert a["factors"].keys() == b["factors"].keys()
    for name, factors in a["factors"].items():
        for key, value in factors.items():
            assert torch.equal(value, b["factors"][name][key]), (name, key)
    assert a["inverses"].keys() == b["inverses"].keys()
    for name, tensors in a["inverses"].items():
        for key, value in tensors.items():
            assert torch.equal(value, b["inverses"][name][key]), (name, key)
    assert a["state"].keys() == b["state"].keys()
    for key, state in a["state"].items():
        for entry, value in state.items():
            other = b["state"][key][entry]
            assert torch.equal(value, other) if isinstance(value, Tensor) else value == other, entry
