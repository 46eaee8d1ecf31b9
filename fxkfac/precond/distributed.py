"""Data-parallel K-FAC with ``torch.distributed``: reduce factors, spread the inversions.

With one shard of the batch per rank (``DistributedDataParallel``), the factors of the
whole batch are the reduction of the per-rank factors:

* ``B = (1/N) Σ g gᵀ`` averages per-datum terms: the all-reduce **averages** it;
* ``A = R Σ x̃ x̃ᵀ`` is averaged too when the loss averages (``reduction='mean'``: ``R = 1/N``),
  and **summed** when it sums (``R`` does not depend on ``N``).

This equals the single-process definition on the concatenated batch when every rank holds
the same number of data. All factors go through one flat all-reduce. Inversions are
spread over ranks (layer ``i`` on rank ``i mod world_size``, as KAISA does) and broadcast,
so every rank preconditions with identical inverses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of ranks of the default process group (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_factors(
    factors: dict[str, tuple[Tensor, Tensor]], sum_inputs: bool
) -> dict[str, tuple[Tensor, Tensor]]:
    """Reduce every layer's ``(A, B)`` across ranks with one flat all-reduce per rule."""
    names = list(factors)
    result: dict[str, list[Tensor]] = {name: list(factors[name]) for name in names}
    size = world_size()
    for position, total in ((0, sum_inputs), (1, False)):
        tensors = [result[name][position] for name in names]
        if not tensors:
            continue
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if not total:
            flat /= size
        offset = 0
        for name, tensor in zip(names, tensors, strict=True):
            result[name][position] = flat[offset : offset + tensor.numel()].view_as(tensor)
            offset += tensor.numel()
    return {name: (pair[0], pair[1]) for name, pair in result.items()}


def spread(names: list[str], compute: Callable[[str], object]) -> dict[str, object]:
    """Compute ``compute(name)`` for each name on one rank and share all results."""
    size, rank = world_size(), dist.get_rank()
    mine = {name: compute(name) for index, name in enumerate(names) if index % size == rank}
    gathered: list[dict[str, object] | None] = [None] * size
    dist.all_gather_object(gathered, mine)
    merged: dict[str, object] = {}
    for part in gathered:
        merged.update(part or {})
    return merged
