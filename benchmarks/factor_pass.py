"""Factor pass and amortized K-FAC step against plain gradient / SGD steps, measured side by side.

Figures (ratios of medians, interleaved runs, threads pinned):

1. factor pass (forward + capture + loss backward + MC-1 backward + A and B) / plain
   forward + backward — the factor pass is what a K-FAC step costs when it updates factors
   (``B`` is computed by the preconditioner's hook inside ``loss.backward()``);
2. amortized K-FAC step (``fxkfac.KFAC``: factors every 10 steps, inverses every 100) / SGD
   step (momentum): 100 K-FAC steps in blocks of 10, each block interleaved with a block of
   10 SGD steps; the ratio is total K-FAC time / total SGD time (so the inversion at step 0
   of the 100 is included once, as in training);
3. peak memory of the factor pass / gradient pass: the increase of resident memory
   (``VmHWM`` after resetting it, Linux) during one pass, each pass in a fresh process
   (after a warm-up at batch 2), so memory cached by earlier passes cannot hide it —
   activations, gradients, captures and factors, not the parameters. The torch-profiler
   replay of CPU allocations is reported too (``profiled_*``); it misses frees of blocks
   allocated before the profiler started, which distorts it.

Each figure uses its own compiled module, so the preconditioner timed in figure 1 and the
optimizer of figure 2 never arm each other's backward hooks.

Run::

    .venv/bin/python benchmarks/factor_pass.py --model resnet18 --batch 64 --threads 2
    .venv/bin/python benchmarks/factor_pass.py --model vit
    .venv/bin/python benchmarks/factor_pass.py --model mlp

Writes ``benchmarks/results/factor_pass_<model>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    factor_pass,
    gradient_pass,
    in_fresh_process,
    interleaved_medians,
    peak_memory_bytes,
    rss_peak_increase_bytes,
    save,
)

import fxkfac
from fxkfac.factors.compute import KFACApprox

TARGETS = {"factor_over_gradient": 2.0, "kfac_over_sgd": 1.3, "memory_ratio": 1.3}


def build(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    """Model, input shape (without batch) and number of classes."""
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=10), (3, 32, 32), 10
    if name == "vit":
        from torchvision.models.vision_transformer import VisionTransformer

        # 32×32 images, 4×4 patches (64 tokens), 4 layers, 4 heads, width 128, MLP 256
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


def memory_child(name: str, batch: int, which: str, threads: int, approx: str = "expand") -> int:
    """Peak resident-memory increase of one gradient or factor pass (run in a fresh process).

    Everything is built and warmed up with a batch of 2 first (kernel caches, autograd
    threads), then the pass runs once at full batch.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, shape, classes = build(name)
    loss_func = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(model, example_inputs=(torch.randn(2, *shape),))
    pre = fxkfac.KFACPreconditioner(
        kmod, loss_func, fisher_type="mc", max_factor_dim=10**9, kfac_approx=approx
    )

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        if which == "gradient":
            gradient_pass(model, x, y, loss_func)()
        else:
            factor_pass(kmod, pre, x, y, loss_func, KFACApprox(approx))()

    run(torch.randn(2, *shape), torch.randint(classes, (2,)))
    model.zero_grad(set_to_none=True)
    x, y = torch.randn(batch, *shape), torch.randint(classes, (batch,))
    return rss_peak_increase_bytes(lambda: run(x, y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "vit", "mlp"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--amortized-steps", type=int, default=100, help="K-FAC steps of figure 2 (0: skip figure 2)"
    )
    parser.add_argument("--kfac-approx", default="expand", choices=["expand", "reduce"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    approx = KFACApprox(args.kfac_approx)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, shape, classes = build(args.model)
    x = torch.randn(args.batch, *shape)
    y = torch.randint(classes, (args.batch,))
    loss_func = nn.CrossEntropyLoss()
    load_before = os.getloadavg()

    # -- figures 1 and 3: factor pass vs gradient pass --------------------------------
    kmod = fxkfac.compile(model, example_inputs=(x,))
    pre = fxkfac.KFACPreconditioner(kmod, loss_func, fisher_type="mc", factor_every=1, kfac_approx=approx)

    passes = {
        "gradient pass": gradient_pass(model, x, y, loss_func),
        "factor pass": factor_pass(kmod, pre, x, y, loss_func, approx),
    }

    times = interleaved_medians(passes, repeats=args.repeats)
    profiled_gradient = peak_memory_bytes(passes["gradient pass"])
    profiled_factor = peak_memory_bytes(passes["factor pass"])
    rss = {
        which: in_fresh_process(memory_child, args.model, args.batch, which, args.threads, approx.value)
        for which in ("gradient", "factor")
    }
    kmod.graph_module.fxkfac_capture.callbacks.clear()  # disarm `pre`

    # -- figure 2: amortized K-FAC step vs SGD step -------------------------------------
    torch.manual_seed(0)
    model_sgd, _, _ = build(args.model)
    model_kfac, _, _ = build(args.model)
    model_kfac.load_state_dict(model_sgd.state_dict())
    kmod_kfac = fxkfac.compile(model_kfac, example_inputs=(x,))
    sgd = torch.optim.SGD(model_sgd.parameters(), lr=1e-4, momentum=0.9)
    kfac = fxkfac.KFAC(
        kmod_kfac,
        loss_func,
        lr=1e-4,
        damping=1e-3,
        momentum=0.9,
        factor_every=10,
        inverse_every=100,
        kfac_approx=approx,
    )

    def sgd_steps(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            out = model_sgd(x)
            sgd.zero_grad()
            loss_func(out, y).backward()
            sgd.step()
        return time.perf_counter() - start

    def kfac_steps(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            out, cap = kmod_kfac(x)
            kfac.zero_grad()
            loss_func(out, y).backward()
            kfac.step(cap)
        return time.perf_counter() - start

    # warm-up: one full K-FAC cycle start (factors + first inverses), some SGD steps; then
    # realign so the timed window starts at an inverse step, like every 100th training step
    if args.amortized_steps:
        sgd_steps(3)
        kfac_steps(3)
    kfac.preconditioner.steps = 0
    block = 10
    sgd_total = kfac_total = 0.0
    for _ in range(args.amortized_steps // block):
        sgd_total += sgd_steps(block)
        kfac_total += kfac_steps(block)
    steps = block * (args.amortized_steps // block)
    sgd_time, amortized = (sgd_total / steps, kfac_total / steps) if steps else (float("nan"),) * 2

    results = {
        "model": args.model,
        "batch": args.batch,
        "kfac_approx": approx.value,
        "repeats": args.repeats,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "gradient_pass_s": times["gradient pass"],
        "factor_pass_s": times["factor pass"],
        "factor_over_gradient": times["factor pass"] / times["gradient pass"],
        "sgd_step_s": sgd_time,
        "kfac_amortized_step_s": amortized,
        "kfac_over_sgd": amortized / sgd_time,
        "peak_rss_gradient_mb": rss["gradient"] / 2**20,
        "peak_rss_factor_mb": rss["factor"] / 2**20,
        "memory_ratio": rss["factor"] / rss["gradient"],
        "profiled_peak_gradient_mb": profiled_gradient / 2**20,
        "profiled_peak_factor_mb": profiled_factor / 2**20,
        "profiled_memory_ratio": profiled_factor / profiled_gradient,
        "targets": TARGETS,
    }
    for key, value in results.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        verdict = ""
        if key in TARGETS and value == value:  # not NaN (figure skipped)
            verdict = f"  (target ≤ {TARGETS[key]}: {'met' if value <= TARGETS[key] else 'NOT met'})"
        if key != "targets":
            print(f"{key:>26}: {text}{verdict}")
    suffix = "" if approx is KFACApprox.EXPAND else f"_{approx.value}"
    path = save(results, args.out or f"benchmarks/results/factor_pass_{args.model}{suffix}.json")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
