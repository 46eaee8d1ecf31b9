"""Data-parallel K-FAC with ``torch.distributed`` and ``DistributedDataParallel``.

Launch on 2 CPU processes (gloo) — or GPUs (nccl) — with torchrun::

    torchrun --nproc_per_node 2 examples/data_parallel.py --steps 20

Each rank trains on its shard of every global batch; DDP averages the gradients and
fxkfac's preconditioner averages the K-FAC factors across ranks and spreads the inversions,
so the run matches a single process on the concatenated batches (``python
examples/data_parallel.py`` runs that single process). ``--save PATH`` writes the final
parameters and factors (rank 0) for comparison; ``--smoke`` runs 3 steps.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fxkfac


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def global_batch(step: int, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, 10, generator=generator, dtype=dtype)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--fisher-type", default="type-2")
    parser.add_argument("--inverse", default="cholesky")
    parser.add_argument("--save", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    steps = 3 if args.smoke else args.steps
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by the {world} ranks")
    dtype = torch.float64
    model = build_model().to(dtype)
    kmod = fxkfac.compile(model, example_inputs=(torch.zeros(2, 10, dtype=dtype),))
    runner = DistributedDataParallel(kmod) if distributed else kmod
    loss_func = nn.CrossEntropyLoss()
    optimizer = fxkfac.KFAC(
        kmod,
        loss_func,
        lr=0.2,
        damping=1e-2,
        fisher_type=args.fisher_type,
        inverse=args.inverse,
        inverse_every=2,
        factor_decay=0.9,
    )
    shard = args.global_batch // world
    for step in range(steps):
        x, y = global_batch(step, args.global_batch, dtype)
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        out, cap = runner(x)
        loss = loss_func(out, y)
        optimizer.zero_grad()
        loss.backward()
        stats = optimizer.step(cap, loss=loss)
        if rank == 0 and (step % 5 == 0 or step == steps - 1):
            print(
                f"step {step:3d}  loss (rank 0 shard) {float(loss.detach()):.4f}  ΔF {stats['delta_f']:.4g}"
            )
    if rank == 0 and args.save:
        torch.save(
            {
                "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "factors": optimizer.preconditioner.factors,
                "world_size": world,
            },
            args.save,
        )
        print(f"saved {args.save}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
