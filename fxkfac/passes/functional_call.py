"""Trace ``torch.func.functional_call`` inside functional models ``fn(params, *inputs)``.

``fn(params, x) = torch.func.functional_call(module, params, (x,))`` swaps the module's
parameters for the entries of ``params`` while the module runs. Under
:func:`~fxkfac.passes.trace.trace_function` those entries are ``torch.fx`` proxies, which
torch's swap rejects. :func:`proxy_functional_call` replaces the swap, for the duration of a
trace, by one that accepts proxies: the module then computes with the parameter placeholders
(``nn.Linear`` becomes ``F.linear(x, params['0.weight'], params['0.bias'])``), so its layers
are captured under the dict's keys. Calls without proxies use torch's own swap.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch.fx as fx
import torch.nn.utils.stateless as stateless
from torch import nn

from fxkfac.errors import TraceError


def _aliases(module: nn.Module) -> dict[str, list[str]]:
    """``{name: every name of the same tensor}`` over the module's parameters and buffers."""
    by_id: dict[int, list[str]] = {}
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        by_id.setdefault(id(tensor), []).append(name)
    return {name: by_id[id(tensor)] for name, tensor in named}


@contextmanager
def _swap_in_proxies(
    module: nn.Module,
    parameters_and_buffers: Mapping[str, Any],
    tie_weights: bool = True,
    strict: bool = False,
    stack_weights: bool = False,
) -> Iterator[None]:
    """Swap the module's tensors named in ``parameters_and_buffers`` for the given values.

    The signature mirrors ``torch.nn.utils.stateless._reparametrize_module``; with
    ``tie_weights`` a value also replaces the other names of a shared tensor.
    """
    if not any(isinstance(value, fx.Proxy) for value in parameters_and_buffers.values()):
        with _TORCH_REPARAMETRIZE(
            module,
            parameters_and_buffers,
            tie_weights=tie_weights,
            strict=strict,
            stack_weights=stack_weights,
        ):
            yield
        return
    aliases = _aliases(module)
    unknown = [name for name in parameters_and_buffers if name not in aliases]
    if unknown:
        raise TraceError(
            f"functional_call: {unknown} are not parameters or buffers of {type(module).__name__}"
        )
    values = dict(parameters_and_buffers)
    if tie_weights:
        for name, value in parameters_and_buffers.items():
            for alias in aliases[name]:
                values.setdefault(alias, value)
    missing = [name for name, _ in module.named_parameters(remove_duplicate=False) if name not in values]
    if missing:
        raise TraceError(
            f"functional_call({type(module).__name__}, params, ...): the module's parameters "
            f"{missing} are not in params. Pass every parameter of the module in "
            "fxkfac.compile(fn, params=...) (e.g. dict(module.named_parameters())), or make the "
            "missing ones buffers if they are constants"
        )
    saved: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for name, value in values.items():
            owner_name, _, attribute = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            store = owner._parameters if attribute in owner._parameters else owner._buffers
            saved.append((store, attribute, store[attribute]))
            store[attribute] = value
        yield
    finally:
        for store, attribute, original in reversed(saved):
            store[attribute] = original


_TORCH_REPARAMETRIZE = stateless._reparametrize_module


@contextmanager
def proxy_functional_call() -> Iterator[None]:
    """While active, ``torch.func.functional_call`` accepts ``torch.fx`` proxies as tensors."""
    stateless._reparametrize_module = _swap_in_proxies
    try:
        yield
    finally:
        stateless._reparametrize_module = _TORCH_REPARAMETRIZE
