"""Look at what fxkfac's compiler does to a real network: torchvision's ResNet-18.

``fxkfac.compile`` traces the model with torch.fx, finds every convolution and linear layer,
and rewrites the graph so that the forward also returns a capture of each layer's input and
output. This script compiles ``torchvision.models.resnet18(weights=None)`` (no download) and
prints

1. ``kmod.summary()``: every captured layer (kind, call form, weight shape, sizes of the
   Kronecker factors ``A`` and ``B``) and every parameter K-FAC does not precondition, with
   the reason;
2. the first lines of the generated Python code of the rewritten graph, next to the same
   lines of a plain ``torch.fx.symbolic_trace`` of the model (before/after the rewrite: each
   captured op's output goes through a ``tap`` that records it);
3. the uncaptured parameters grouped by reason (for ResNet-18: the BatchNorm affine
   parameters, which ``fxkfac.KFAC`` updates with SGD or Adam, see ``uncaptured_update``);
4. a check that the rewritten module computes the same outputs as the original model.

Run::

    python examples/inspect_graph.py                  # resnet18, input 1×3×224×224, 12 code lines
    python examples/inspect_graph.py --model resnet50 --lines 20
    python examples/inspect_graph.py --smoke          # small input (same output otherwise)

The CLI does the same for any model: ``fxkfac inspect torchvision:resnet18 --code``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.fx
import torchvision

import fxkfac


def forward_lines(code: str, count: int) -> list[str]:
    """The first ``count`` statements of a generated ``forward``."""
    body = code.split("def forward", 1)[1].splitlines()[1:]
    return [line.rstrip() for line in body if line.strip()][:count]


def main(argv: list[str] | None = None) -> None:
    """Compile the model and print the summary, the generated code and the uncaptured parameters."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a 1×3×64×64 example input")
    parser.add_argument("--model", default="resnet18", help="a torchvision.models name")
    parser.add_argument("--input-shape", default="1,3,224,224")
    parser.add_argument("--lines", type=int, default=12, help="lines of generated code to show")
    args = parser.parse_args(argv)
    if args.smoke:
        args.input_shape = "1,3,64,64"
    shape = tuple(int(size) for size in args.input_shape.split(","))

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    example = torch.randn(shape)
    kmod = fxkfac.compile(model, example_inputs=(example,))
    print(
        f"== {args.model}: fxkfac.compile(model, example_inputs=(x {list(shape)},)), tracer {kmod.tracer!r}"
    )
    summary = kmod.summary()
    if summary is not None:  # a str; print it ourselves
        print(summary)

    print(f"\n== generated code, first {args.lines} lines: plain torch.fx trace, then fxkfac's rewrite")
    try:
        before = forward_lines(torch.fx.symbolic_trace(model).code, args.lines)
    except Exception as exc:  # models fx cannot trace (fxkfac may still compile them via torch.export)
        before = [f"    (torch.fx.symbolic_trace failed: {type(exc).__name__})"]
    print("-- before (torch.fx.symbolic_trace(model).code):")
    print("\n".join(before))
    print("-- after (kmod.code):")
    print("\n".join(forward_lines(kmod.code, args.lines)))

    by_reason: dict[str, list[str]] = defaultdict(list)
    for name, reason in kmod.uncaptured.items():
        by_reason[reason.split(" (")[0]].append(name)
    print(f"\n== {len(kmod.uncaptured)} uncaptured parameters (first-order steps in fxkfac.KFAC), by reason")
    for reason, names in by_reason.items():
        shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
        print(f"  {reason}: {len(names)} — {shown}")

    with torch.no_grad():
        out, capture = kmod(example)
        same = torch.allclose(out, model(example), rtol=1e-5, atol=1e-6)
    print(
        f"\n== outputs of kmod and the original model agree: {same} "
        f"(output {tuple(out.shape)}, capture of {len(kmod.layers)} layers: {type(capture).__name__})"
    )


if __name__ == "__main__":
    main()
