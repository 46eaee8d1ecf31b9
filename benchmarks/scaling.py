"""Factor-pass cost against layer width and batch size for an MLP, with fitted exponents.

The MLP is ``784 → W → W → 10`` (ReLU). Two sweeps: width ``W`` at a fixed batch, and batch
``N`` at a fixed width. At every point the factor pass (forward + capture + loss backward
with the MC-1 backward and ``B`` in its hook + ``A``) and the plain gradient pass are timed
interleaved (medians after warm-up, threads pinned). The exponent ``p`` of ``time ∝ size^p``
is the slope of a least-squares line through ``(log size, log time)``
(``torch.linalg.lstsq``), fitted separately for both passes, over all sizes and over the
largest three (where the GEMMs dominate fixed per-call overheads).

What to expect: ``A`` and ``B`` cost ``N · D²`` per layer and the gradient ``N · D_in · D_out``,
so both grow like ``W²`` in width and ``N`` in batch once the GEMMs dominate (small sizes
are overhead-bound and fit a flatter slope).

    .venv/bin/python benchmarks/scaling.py
    .venv/bin/python benchmarks/scaling.py --widths 128 256 512 --batches 32 64 128   # quick

Writes ``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import factor_pass, gradient_pass, interleaved_medians, save

import fxkfac


def mlp(width: int) -> nn.Module:
    """``784 → width → width → 10`` with ReLU."""
    return nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def time_point(width: int, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of the gradient pass and the factor pass at one size."""
    torch.manual_seed(0)
    model = mlp(width)
    x, y = torch.randn(batch, 784), torch.randint(10, (batch,))
    loss_func = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(model, example_inputs=(x,))
    pre = fxkfac.KFACPreconditioner(kmod, loss_func, fisher_type="mc", max_factor_dim=10**9)

    passes = {
        "gradient": gradient_pass(model, x, y, loss_func),
        "factor": factor_pass(kmod, pre, x, y, loss_func),
    }
    times = interleaved_medians(passes, repeats=repeats)
    return {"width": width, "batch": batch, "gradient_s": times["gradient"], "factor_s": times["factor"]}


def exponent(sizes: list[int], seconds: list[float]) -> float:
    """Slope ``p`` of the least-squares fit ``log t = c + p log size``."""
    log_size = torch.tensor(sizes, dtype=torch.float64).log()
    design = torch.stack([torch.ones_like(log_size), log_size], dim=1)
    target = torch.tensor(seconds, dtype=torch.float64).log()[:, None]
    solution = torch.linalg.lstsq(design, target).solution
    return float(solution[1, 0])


def sweep(points: list[dict[str, float]], axis: str) -> dict:
    """Exponents of both passes along ``axis`` ('width' or 'batch')."""
    sizes = [int(p[axis]) for p in points]
    factor = [p["factor_s"] for p in points]
    gradient = [p["gradient_s"] for p in points]
    return {
        "points": points,
        "factor_exponent": exponent(sizes, factor),
        "gradient_exponent": exponent(sizes, gradient),
        "factor_exponent_largest_3": exponent(sizes[-3:], factor[-3:]),
        "gradient_exponent_largest_3": exponent(sizes[-3:], gradient[-3:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--width", type=int, default=1024, help="width of the batch sweep")
    parser.add_argument("--batch", type=int, default=256, help="batch of the width sweep")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    by_width = sweep([time_point(w, args.batch, args.repeats) for w in args.widths], "width")
    by_batch = sweep([time_point(args.width, n, args.repeats) for n in args.batches], "batch")
    for title, result, axis in (("width", by_width, "width"), ("batch", by_batch, "batch")):
        print(f"\n{title:>6} {'gradient ms':>12} {'factor ms':>10} {'ratio':>6}")
        for point in result["points"]:
            ratio = point["factor_s"] / point["gradient_s"]
            print(
                f"{int(point[axis]):>6} {point['gradient_s'] * 1e3:>12.2f} "
                f"{point['factor_s'] * 1e3:>10.2f} {ratio:>6.2f}"
            )
        print(
            f"fitted exponent vs {title}: factor pass {result['factor_exponent']:.2f}, "
            f"gradient pass {result['gradient_exponent']:.2f}; largest 3 sizes: "
            f"{result['factor_exponent_largest_3']:.2f}, {result['gradient_exponent_largest_3']:.2f}"
        )
    path = save(
        {
            "model": "mlp 784-W-W-10",
            "width_sweep": {"batch": args.batch, **by_width},
            "batch_sweep": {"width": args.width, **by_batch},
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "benchmarks/results/scaling.json",
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
