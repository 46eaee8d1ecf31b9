"""Where the factor pass goes: stage timings and the torch.profiler operator table.

Stages of one factor pass (forward + capture, loss backward, MC-1 backward to the layer
outputs + ``B``, ``A``), each timed on its own (medians of interleaved repeats, threads
pinned), then one factor pass under ``torch.profiler`` grouped by operator (self CPU time),
then ``A`` per layer (the largest term on convolutional nets).

    .venv/bin/python benchmarks/profile_factor_pass.py --model resnet18 --batch 64

Writes ``benchmarks/results/profile_<model>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import factor_pass, gradient_pass, interleaved_medians, save
from factor_pass import build

import fxkfac
from fxkfac.factors import compute
from fxkfac.factors.compute import (
    FisherType,
    KFACApprox,
    backpropagated_vectors,
    grad_factors,
    input_factors,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "vit", "mlp"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, shape, classes = build(args.model)
    x = torch.randn(args.batch, *shape)
    y = torch.randint(classes, (args.batch,))
    loss_func = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(model, example_inputs=(x,))
    pre = fxkfac.KFACPreconditioner(kmod, loss_func, fisher_type="mc", factor_every=1)
    rule = pre.loss_rule
    load_before = os.getloadavg()

    def forward() -> None:
        with torch.no_grad():
            kmod(x)

    out, cap = kmod(x)  # a capture kept alive for the stage timings below
    kmod.graph_module.fxkfac_capture.callbacks.clear()  # stages timed without the hook
    reduction = rule.reduction_factor(out)

    def mc_backward_and_B() -> None:
        vectors = backpropagated_vectors(rule, FisherType.MC, out, None, 1, None)
        grad_factors(cap, out, vectors, KFACApprox.EXPAND)

    def input_factor_A() -> None:
        input_factors(cap, reduction, KFACApprox.EXPAND)

    stages = interleaved_medians(
        {
            "forward (no grad)": forward,
            "gradient pass (forward + backward)": gradient_pass(model, x, y, loss_func),
            "MC-1 backward + B": mc_backward_and_B,
            "A (input factors)": input_factor_A,
        },
        repeats=args.repeats,
    )
    unit = stages["gradient pass (forward + backward)"]
    print(f"{'stage':<36} {'ms':>9} {'/ gradient pass':>16}")
    for name, seconds in stages.items():
        print(f"{name:<36} {seconds * 1e3:>9.1f} {seconds / unit:>16.2f}")

    # one armed factor pass under the profiler
    kmod.graph_module.fxkfac_capture.callbacks.append(pre._arm)

    armed_factor_pass = factor_pass(kmod, pre, x, y, loss_func)
    armed_factor_pass()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        armed_factor_pass()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    print(table)
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    ops = [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total_us}
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]
    ]

    # A per layer
    per_layer = {}
    for index, layer in enumerate(cap.layers):

        def one_layer(index: int = index) -> None:
            with mock.patch.object(compute, "layer_indices", lambda capture, index=index: [index]):
                input_factors(cap, reduction, KFACApprox.EXPAND)

        per_layer[layer.name] = {
            "D_A": layer.input_factor_dim,
            "ms": interleaved_medians({"a": one_layer}, repeats=3, warmup=1)["a"] * 1e3,
        }
    print(f"{'layer':<24} {'D_A':>6} {'A ms':>8}")
    for name, row in sorted(per_layer.items(), key=lambda item: -item[1]["ms"]):
        print(f"{name:<24} {row['D_A']:>6} {row['ms']:>8.1f}")
    path = save(
        {
            "model": args.model,
            "batch": args.batch,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "stages_s": stages,
            "top_ops_self_cpu": ops,
            "A_per_layer": per_layer,
        },
        f"benchmarks/results/profile_{args.model}.json",
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
