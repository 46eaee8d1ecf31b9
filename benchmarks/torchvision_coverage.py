"""Coverage of every torchvision classification model: tracer, captured layers, outputs.

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (``weights=None``,
eval mode, batch 1) a worker subprocess (isolated memory, killed after ``--timeout`` seconds)

1. builds the model and finds an input size it accepts (``--sizes``, default 64 then 224),
   running one forward under ``torch.no_grad`` as the reference output;
2. times ``fxkfac.compile(model, example_inputs=(x,))`` (tracer ``'auto'``: fx, torch.export
   when fx fails or hides parameters in wrapped functions) — trace + match + rewrite;
3. counts the captured layers, the ``nn.Linear`` / ``nn.Conv*`` / ``nn.MultiheadAttention``
   parameters that are *not* captured (should be 0) and the other uncaptured parameters
   (norm layers, embeddings, ... — expected, K-FAC does not precondition them);
4. compares the compiled module's output with the reference (``torch.equal``, else the max
   absolute difference).

``inception_v3`` and ``googlenet`` are built with ``aux_logits=False``: their auxiliary heads
never run in eval mode, so their parameters would be "not used in the traced forward".

    .venv/bin/python benchmarks/torchvision_coverage.py                       # all 80 models
    .venv/bin/python benchmarks/torchvision_coverage.py --models resnet18 swin_t

Results: a rich table on stdout, ``benchmarks/results/torchvision_coverage.json`` and the
table as markdown in ``docs/torchvision_coverage.md`` (with the command that produced it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "torchvision_coverage.json"
DOCS = ROOT / "docs" / "torchvision_coverage.md"
MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "inception_v3": {"aux_logits": False, "init_weights": False},
    "googlenet": {"aux_logits": False, "init_weights": False},
}


# -- worker (one model, in a subprocess) -----------------------------------------------------


def linear_conv_parameters(model) -> list[str]:
    """Qualified names of the parameters of Linear / Conv / MultiheadAttention modules."""
    from torch import nn

    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)):
            prefix = f"{module_name}." if module_name else ""
            names += [f"{prefix}{short}" for short, _ in module.named_parameters(recurse=False)]
    return names


def run_worker(name: str, sizes: list[int], threads: int) -> dict[str, Any]:
    import warnings

    import torch
    import torchvision

    import fxkfac

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    row: dict[str, Any] = {"model": name, "status": "error"}
    start = time.perf_counter()
    model = torchvision.models.get_model(name, weights=None, **MODEL_KWARGS.get(name, {})).eval()
    row["build_s"] = time.perf_counter() - start
    row["parameters"] = sum(p.numel() for p in model.parameters())
    x = reference = None
    errors = []
    for size in sizes:
        candidate = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        try:
            with torch.no_grad():
                reference = model(candidate)
        except Exception as exc:  # the model rejects this size
            errors.append(f"{size}: {type(exc).__name__}: {exc}")
            continue
        x, row["input_size"] = candidate, size
        break
    if x is None:
        row["error"] = "no input size accepted: " + " | ".join(errors)
        return row
    start = time.perf_counter()
    try:
        kmod = fxkfac.compile(model, example_inputs=(x,))
    except Exception as exc:
        row["compile_s"] = time.perf_counter() - start
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return row
    row["compile_s"] = time.perf_counter() - start
    row["tracer"] = kmod.tracer
    row["layers"] = len(kmod.layers)
    row["tied_layers"] = sum(layer.tied for layer in kmod.layers)
    linear_conv = linear_conv_parameters(model)
    row["linear_conv_params"] = len(linear_conv)
    missed = {p: kmod.uncaptured[p] for p in linear_conv if p in kmod.uncaptured}
    row["linear_conv_uncaptured"] = missed
    row["other_uncaptured"] = len(kmod.uncaptured) - len(missed)
    row["other_uncaptured_kinds"] = sorted({reason.split(":")[0] for reason in kmod.uncaptured.values()})
    start = time.perf_counter()
    with torch.no_grad():
        out, _ = kmod(x)
    row["forward_s"] = time.perf_counter() - start
    row["outputs_equal"] = bool(torch.equal(out, reference))
    row["max_abs_diff"] = float((out - reference).abs().max())
    row["status"] = "ok"
    return row


# -- driver --------------------------------------------------------------------------------


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--sizes",
        *map(str, args.sizes),
        "--threads",
        str(args.threads),
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "timeout", "error": f"killed after {args.timeout} s"}
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"model": name, "status": "crash", "error": " / ".join(tail)[:2000], "wall_s": wall}
    row = json.loads(lines[-1])
    row["wall_s"] = wall
    return row


def outputs_cell(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return "-"
    if row["outputs_equal"]:
        return "yes"
    return f"no ({row['max_abs_diff']:.2g})"


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    cells = []
    for row in rows:
        ok = row.get("status") == "ok"
        cells.append(
            [
                row["model"],
                str(row.get("input_size", "-")),
                row.get("tracer", row["status"]),
                str(row["layers"]) if ok else "-",
                f"{len(row['linear_conv_uncaptured'])}/{row['linear_conv_params']}" if ok else "-",
                str(row["other_uncaptured"]) if ok else "-",
                f"{row['compile_s']:.2f}" if "compile_s" in row else "-",
                outputs_cell(row),
            ]
        )
    return cells


HEADER = [
    "model",
    "input",
    "tracer",
    "layers",
    "Linear/Conv uncaptured",
    "other uncaptured",
    "trace+rewrite s",
    "outputs equal",
]


def summary(rows: list[dict[str, Any]]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    full = [r for r in ok if not r["linear_conv_uncaptured"]]
    equal = [r for r in ok if r["outputs_equal"]]
    close = [r for r in ok if not r["outputs_equal"] and r["max_abs_diff"] <= 1e-4]
    tracers = {t: sum(r["tracer"] == t for r in ok) for t in sorted({r["tracer"] for r in ok})}
    failed = [f"{r['model']} ({r['status']})" for r in rows if r.get("status") != "ok"]
    parts = [
        f"{len(ok)}/{len(rows)} models compiled",
        f"{len(full)}/{len(ok)} with 100 % Linear/Conv capture",
        f"{len(equal)}/{len(ok)} with bitwise-equal outputs"
        + (f" ({len(close)} more within 1e-4)" if close else ""),
        "tracers: " + ", ".join(f"{t} {n}" for t, n in tracers.items()),
    ]
    if failed:
        parts.append("failed: " + ", ".join(failed))
    return "; ".join(parts)


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fxkfac coverage of torchvision classification models")
    for column in HEADER:
        table.add_column(column, justify="left" if column in ("model", "tracer") else "right")
    for cells, row in zip(table_rows(rows), rows, strict=True):
        bad = row.get("status") != "ok" or row["linear_conv_uncaptured"] or not row["outputs_equal"]
        table.add_row(*cells, style="red" if bad else None)
    console = Console(width=140)
    console.print(table)
    console.print(summary(rows))
    for row in rows:
        if row.get("status") != "ok":
            console.print(f"[red]{row['model']}[/red]: {row.get('error', '')[:500]}")
        elif row["linear_conv_uncaptured"]:
            for param, reason in list(row["linear_conv_uncaptured"].items())[:5]:
                console.print(f"[red]{row['model']}[/red] {param}: {reason}")


def write_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    lines = [
        "# torchvision coverage",
        "",
        "Every classification model of `torchvision.models.list_models(module=torchvision.models)`",
        "compiled with `fxkfac.compile(model, example_inputs=(x,))` (tracer `'auto'`; `weights=None`,",
        "eval mode, batch 1, the first input size of "
        f"{meta['sizes']} the model accepts). *Linear/Conv uncaptured*: parameters of",
        "`nn.Linear`, `nn.Conv*` and `nn.MultiheadAttention` modules listed in `kmod.uncaptured`",
        "(target 0), out of all such parameters. *Other uncaptured*: parameters K-FAC does not",
        "precondition (normalization layers, class tokens, position embeddings, relative position",
        "bias tables, layer scales). *trace+rewrite s*: wall time of `fxkfac.compile` (for",
        "tracer `export`, after a first fx trace). *outputs equal*: `torch.equal` of the compiled",
        "module's output and the model's (max absolute difference otherwise).",
        "`inception_v3` and `googlenet` are built with `aux_logits=False` (the auxiliary heads do",
        "not run in eval mode).",
        "",
        "Produced by:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"torch {meta['torch']}, torchvision {meta['torchvision']}, {meta['machine']}, "
        f"{meta['threads']} threads, {meta['date']}.",
        "",
        f"**Summary:** {summary(rows)}.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" if i < 1 or h == "tracer" else "---:" for i, h in enumerate(HEADER)) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    problems = [r for r in rows if r.get("status") != "ok" or r["linear_conv_uncaptured"]]
    if problems:
        lines += ["", "## Problems", ""]
        for row in problems:
            if row.get("status") != "ok":
                lines.append(f"- `{row['model']}` ({row['status']}): {row.get('error', '')[:300]}")
            else:
                missed = row["linear_conv_uncaptured"]
                examples = "; ".join(f"`{param}`: {reason}" for param, reason in list(missed.items())[:2])
                lines.append(f"- `{row['model']}`: {len(missed)} parameters, e.g. {examples}")
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="subset of models (default: all)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 224], help="input sizes to try")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; no JSON / markdown")
    parser.add_argument("--render", action="store_true", help="re-render the table from the saved JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.sizes, args.threads)))
        return 0

    if args.render:
        saved = json.loads(RESULTS.read_text())
        print_table(saved["models"])
        write_markdown(saved["models"], saved["meta"])
        return 0

    import torch
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if args.models:
        unknown = sorted(set(args.models) - set(names))
        if unknown:
            parser.error(f"not torchvision classification models: {unknown}")
        names = [n for n in names if n in args.models]
    rows = []
    for index, name in enumerate(names, 1):
        row = run_model(name, args)
        rows.append(row)
        done = f"{row.get('compile_s', float('nan')):.2f} s" if row["status"] == "ok" else row["status"]
        print(f"[{index}/{len(names)}] {name}: {done}", file=sys.stderr, flush=True)
    print_table(rows)
    if not args.no_write:
        meta = {
            "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
            "threads": args.threads,
            "date": time.strftime("%Y-%m-%d"),
            "sizes": args.sizes,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"meta": meta, "summary": summary(rows), "models": rows}, indent=1))
        write_markdown(rows, meta)
        print(f"wrote {RESULTS.relative_to(ROOT)} and {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
