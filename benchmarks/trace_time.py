"""Trace + rewrite time of ``fxkfac.compile`` on torchvision models (design target: ResNet-50 ≤ 1 s).

For each model (``weights=None``, eval mode, built once) ``fxkfac.compile(model)`` — no example
inputs, so the fx tracer only — runs ``--repeats`` times; the median wall time is the figure.
The same repeats also time the three phases separately (symbolic trace, matching + parameter
verification, graph rewrite + recompile) with the library's internal functions, to show
where the time goes.

    .venv/bin/python benchmarks/trace_time.py                      # resnet50, resnet18, vit_b_16
    .venv/bin/python benchmarks/trace_time.py --models resnet50 --repeats 9

Writes ``benchmarks/results/trace_time.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision

import fxkfac
from fxkfac.passes.find_layers import find_layers
from fxkfac.passes.rewrite import insert_captures
from fxkfac.passes.trace import trace_module

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "trace_time.json"
TARGET_S = {"resnet50": 1.0}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    compile_s, trace_s, match_s, rewrite_s = [], [], [], []
    layers = 0
    for _ in range(repeats):
        seconds, kmod = timed(lambda: fxkfac.compile(model))
        compile_s.append(seconds)
        layers = len(kmod.layers)
        seconds, gm = timed(lambda: trace_module(model))
        trace_s.append(seconds)
        seconds, (found, _) = timed(lambda gm=gm: find_layers(gm))
        match_s.append(seconds)
        seconds, _ = timed(lambda gm=gm, found=found: insert_captures(gm, found))
        rewrite_s.append(seconds)
    median = statistics.median(compile_s)
    return {
        "model": name,
        "layers": layers,
        "nodes": len(trace_module(model).graph.nodes),
        "compile_median_s": median,
        "compile_s": compile_s,
        "phases_median_s": {
            "trace": statistics.median(trace_s),
            "match_verify": statistics.median(match_s),
            "rewrite_recompile": statistics.median(rewrite_s),
        },
        "target_s": TARGET_S.get(name),
        "meets_target": None if name not in TARGET_S else median <= TARGET_S[name],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet18", "vit_b_16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(name, args.repeats) for name in args.models]
    print(f"{'model':<12} {'layers':>6} {'nodes':>6} {'compile (median)':>17}  trace / match / rewrite  runs")
    for row in rows:
        phases = row["phases_median_s"]
        target = ""
        if row["target_s"] is not None:
            verdict = "ok" if row["meets_target"] else "MISSED"
            target = f"  target ≤ {row['target_s']:.1f} s: {verdict}"
        print(
            f"{row['model']:<12} {row['layers']:>6} {row['nodes']:>6} {row['compile_median_s']:>15.3f} s  "
            f"{phases['trace']:.3f} / {phases['match_verify']:.3f} / {phases['rewrite_recompile']:.3f} s  "
            + " ".join(f"{s:.3f}" for s in row["compile_s"])
            + target
        )
    if not args.no_write:
        meta = {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
            "threads": args.threads,
            "repeats": args.repeats,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_average": list(getattr(__import__("os"), "getloadavg", lambda: ())()),
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"meta": meta, "models": rows}, indent=1))
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
