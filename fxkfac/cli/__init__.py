"""Command line: ``fxkfac inspect MODEL``; errors are one line unless ``--debug``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from fxkfac.errors import FxKfacError


class CliError(FxKfacError):
    """A bad command-line argument."""


def load_model(spec: str) -> nn.Module:
    """Build a model from ``torchvision:NAME``, ``path/to/file.py:Class`` or ``pkg.mod:Class``."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise CliError(
            f"model {spec!r} is not of the form torchvision:NAME, path/to/file.py:Class "
            "or package.module:Class"
        )
    if source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None)
        except ValueError as exc:
            raise CliError(
                f"torchvision has no model {name!r} (see torchvision.models.list_models())"
            ) from exc
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise CliError(f"no such file: {source}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise CliError(f"cannot import {source!r}: {exc}") from exc
    factory = getattr(module, name, None)
    if factory is None:
        raise CliError(f"{source} has no attribute {name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise CliError(f"{spec} did not build an nn.Module (got {type(model).__name__})")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``'1,3,32,32'`` -> ``(1, 3, 32, 32)``."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise CliError(f"--input-shape {text!r} must be comma-separated integers, e.g. 1,3,32,32") from exc
    if not shape or any(size <= 0 for size in shape):
        raise CliError(f"--input-shape {text!r} must have positive sizes")
    return shape


def cmd_inspect(args: argparse.Namespace) -> int:
    """Compile a model and show its captured layers (rich tables), code and graph."""
    from rich.console import Console

    import fxkfac
    from fxkfac.inspect.graph import write_graph
    from fxkfac.inspect.summary import code_view, print_summary, rewrite_view

    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.graph and Path(args.graph).suffix not in (".graphml", ".dot", ".gv"):
        raise CliError(f"--graph {args.graph}: use a .graphml or .dot file name")
    model = load_model(args.model)
    model.eval()
    example = torch.randn(parse_shape(args.input_shape))
    kmod = fxkfac.compile(model, example_inputs=(example,), tracer=args.tracer)
    if args.layer and args.layer not in {layer.name for layer in kmod.layers}:
        raise CliError(f"--layer {args.layer}: no such captured layer (see `fxkfac inspect {args.model}`)")
    print_summary(kmod, console)
    if args.layer:
        console.print(rewrite_view(kmod, args.layer))
    if args.code:
        console.print(code_view(kmod))
    if args.graph:
        path = write_graph(kmod.to_networkx((example,)), args.graph)
        console.print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train SGD, Adam, K-FAC and K-FAC + NGD-T on digits; write plots and JSON."""
    from fxkfac.cli.demo import run_demo

    run_demo(args.steps, args.seed, Path(args.out), batch_size=args.batch_size, methods=args.methods)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``fxkfac`` argument parser."""
    parser = argparse.ArgumentParser(prog="fxkfac", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="compile a model and show what K-FAC captures")
    inspect.add_argument("model", help="torchvision:resnet18 | path/to/file.py:Class | pkg.mod:Class")
    inspect.add_argument("--input-shape", default="1,3,32,32", help="example input shape")
    inspect.add_argument("--code", action="store_true", help="print the generated code")
    inspect.add_argument("--graph", help="write the rewritten graph to this .graphml or .dot file")
    inspect.add_argument("--layer", help="show the before/after rewrite of this layer")
    inspect.add_argument("--tracer", default="auto", choices=["auto", "fx", "export"])
    inspect.set_defaults(run=cmd_inspect)
    demo = sub.add_parser("demo", help="SGD vs Adam vs K-FAC vs K-FAC + NGD-T on digits (offline)")
    demo.add_argument("--steps", type=int, default=300, help="training steps per method")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--out", default="fxkfac-out", help="folder for the PNG plots and results.json")
    demo.add_argument("--methods", nargs="+", default=None, help="subset of: SGD Adam K-FAC 'K-FAC + NGD-T'")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fxkfac`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (FxKfacError, RuntimeError, ValueError, OSError, KeyError) as exc:
        if args.debug:
            raise
        print(f"fxkfac: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
