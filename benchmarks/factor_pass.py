"""Factor pass and amortized K-FAC step against plain gradient / SGD steps, measured side by side.

Figures (ratios of medians, interleaved runs, threads pinned):
1. factor pass (forward + capture + MC-1 backward + A and B) / plain forward+backward;
2. amortized K-FAC step (factors every 10 steps, inverses every 100) / SGD step;
3. peak memory of the factor pass / gradient pass (torch profiler, CPU allocations).

Run: ``python benchmarks/factor_pass.py --model resnet18 --batch 64 --threads 2``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, peak_memory_bytes, save

import fxkfac
from fxkfac.factors.compute import KFACApprox, input_factors


def build(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=10), (3, 32, 32), 10
    if name == "vit":
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(32, 4, 4, 4, 128, 256, num_classes=10), (3, 32, 32), 10
    if name == "mlp":
        return (
            nn.Sequential(
                nn.Flatten(),
                nn.Linear(784, 512),
                nn.ReLU(),
                nn.Linear(512, 512),
                nn.ReLU(),
                nn.Linear(512, 10),
            ),
            (1, 28, 28),
            10,
        )
    raise SystemExit(f"unknown model {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "vit", "mlp"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, shape, classes = build(args.model)
    x = torch.randn(args.batch, *shape)
    y = torch.randint(classes, (args.batch,))
    loss_func = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(model, example_inputs=(x,))
    pre = fxkfac.KFACPreconditioner(kmod, loss_func, fisher_type="mc", factor_every=1)

    def gradient_pass():
        model.zero_grad(set_to_none=True)
        loss_func(model(x), y).backward()

    def factor_pass():
        model.zero_grad(set_to_none=True)
        pre.steps = 0  # every call updates the factors: hooks armed
        out, cap = kmod(x)
        loss_func(out, y).backward()
        reduction = pre.loss_rule.reduction_factor(cap.prediction)
        input_factors(cap, reduction, KFACApprox.EXPAND)
        assert cap.grad_factors is not None

    sgd = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    kfac = fxkfac.KFAC(
        kmod, loss_func, lr=1e-4, damping=1e-3, momentum=0.9, factor_every=10, inverse_every=100
    )

    def sgd_step():
        out = model(x)
        sgd.zero_grad()
        loss_func(out, y).backward()
        sgd.step()

    def kfac_steps(count: int = 100):
        for _ in range(count):
            out, cap = kmod(x)
            kfac.zero_grad()
            loss_func(out, y).backward()
            kfac.step(cap)

    times = interleaved_medians(
        {"gradient pass": gradient_pass, "factor pass": factor_pass}, repeats=args.repeats
    )
    sgd_time = (
        interleaved_medians({"sgd": lambda: [sgd_step() for _ in range(10)]}, repeats=3, warmup=1)["sgd"] / 10
    )
    import time

    kfac_steps(2)  # warm-up (first inverses)
    start = time.perf_counter()
    kfac_steps(100)
    amortized = (time.perf_counter() - start) / 100
    memory_gradient = peak_memory_bytes(gradient_pass)
    memory_factor = peak_memory_bytes(factor_pass)
    results = {
        "model": args.model,
        "batch": args.batch,
        "gradient_pass_s": times["gradient pass"],
        "factor_pass_s": times["factor pass"],
        "factor_over_gradient": times["factor pass"] / times["gradient pass"],
        "sgd_step_s": sgd_time,
        "kfac_amortized_step_s": amortized,
        "kfac_over_sgd": amortized / sgd_time,
        "peak_memory_gradient_mb": memory_gradient / 2**20,
        "peak_memory_factor_mb": memory_factor / 2**20,
        "memory_ratio": memory_factor / memory_gradient,
    }
    for key, value in results.items():
        print(f"{key:>26}: {value:.4g}" if isinstance(value, float) else f"{key:>26}: {value}")
    path = save(results, args.out or f"benchmarks/results/factor_pass_{args.model}.json")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
