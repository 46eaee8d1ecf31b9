"""fxkfac against peer K-FAC libraries on the same work, measured side by side.

The work: K-FAC factors ``A, B`` of every linear / conv layer for one batch — same model,
batch, Fisher type (MC with 1 sample, or type-2), KFAC-expand, bias folded into ``A``.
All candidates run interleaved in one process with threads pinned; each figure is a
median after warm-up, also given relative to a plain gradient pass (forward + backward)
measured in the same interleaved loop.

Two kinds of work, because the peers do different amounts of it:

* **factors only** (no parameter gradient wanted):
  ``fxkfac``: ``out, cap = kmod(x); cap.factors(loss, y, fisher_type=...)`` —
  forward + a backward of the sampled / type-2 vectors to the layer outputs only;
  ``curvlinops`` (hooks backend, ``KFACLinearOperator.compute_kronecker_factors``):
  forward + a backward to the parameters (it also forms the weight gradients it discards);
* **gradient + factors** (what a training step needs):
  ``fxkfac``: the preconditioner's hook computes ``B`` inside the user's ``loss.backward()``,
  ``A`` after it; ``backpack`` (``KFAC(mc_samples=1)`` / ``KFLR`` for type-2, inside
  ``with backpack(...)``): gradient and factors in one backward.

Models: the MLP (784-512-512-10), a small CNN (3 conv + ReLU + max-pool stages and a linear
head on 32×32 inputs) and ResNet-18 at 32×32 — a peer that cannot handle a model (BackPACK's
second-order extensions have no BatchNorm) gets its error recorded instead of a number.

Installed versions: curvlinops-for-pytorch 3.0.1 (``dev`` extra; that release has only the
module-hooks backend, no fx backend), backpack-for-pytorch 1.7.1. Install the peers with::

    .venv/bin/pip install curvlinops-for-pytorch backpack-for-pytorch

Run::

    .venv/bin/python benchmarks/peers.py                       # mlp, cnn, resnet18; MC-1
    .venv/bin/python benchmarks/peers.py --fisher type-2 --models mlp cnn

Writes ``benchmarks/results/peers_<fisher>.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import factor_pass, gradient_pass, interleaved_medians, save
from factor_pass import build

import fxkfac


def small_cnn() -> nn.Module:
    """Conv(3→32) / Conv(32→64) / Conv(64→64), each + ReLU + 2×2 max-pool, then Linear(1024→10)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1024, 10),
    )


def model_and_data(name: str, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Model, inputs and labels (seeded)."""
    torch.manual_seed(0)
    if name == "cnn":
        model, shape, classes = small_cnn(), (3, 32, 32), 10
    else:
        model, shape, classes = build(name)
    return model, torch.randn(batch, *shape), torch.randint(classes, (batch,))


def kfac_layers(model: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of the Linear / Conv2d modules (what every library covers)."""
    return [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) for p in m.parameters()]


def fxkfac_candidates(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, fisher: str
) -> dict[str, Callable[[], object]]:
    """fxkfac: factors only, and gradient + factors (preconditioner hook)."""
    loss_func = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(copy.deepcopy(model), example_inputs=(x,))

    def factors_only() -> None:
        _out, cap = kmod(x)
        cap.factors(loss_func, y, fisher_type=fisher, kfac_approx="expand")

    kmod_train = fxkfac.compile(copy.deepcopy(model), example_inputs=(x,))
    pre = fxkfac.KFACPreconditioner(
        kmod_train, loss_func, fisher_type=fisher, factor_every=1, max_factor_dim=10**9
    )

    return {
        "fxkfac factors": factors_only,
        "fxkfac grad+factors": factor_pass(kmod_train, pre, x, y, loss_func),
    }


def curvlinops_candidate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, fisher: str
) -> Callable[[], object]:
    """curvlinops KFACLinearOperator (hooks backend): ``compute_kronecker_factors``."""
    from curvlinops import KFACLinearOperator

    model = copy.deepcopy(model)
    operator = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        kfac_layers(model),
        [(x, y)],
        check_deterministic=False,
        fisher_type={"mc": "mc", "type-2": "type-2"}[fisher],
        mc_samples=1,
        kfac_approx="expand",
        separate_weight_and_bias=False,
    )
    return operator.compute_kronecker_factors


def backpack_candidate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, fisher: str
) -> Callable[[], object]:
    """BackPACK ``KFAC(mc_samples=1)`` (MC) or ``KFLR`` (type-2): gradient + factors."""
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR

    model = extend(copy.deepcopy(model), use_converter=True)
    loss_func = extend(nn.CrossEntropyLoss())
    extension = KFAC(mc_samples=1) if fisher == "mc" else KFLR()

    def run() -> None:
        model.zero_grad(set_to_none=True)
        with backpack(extension):
            loss_func(model(x), y).backward()

    run()  # fails here for unsupported models
    return run


def measure(name: str, batch: int, fisher: str, repeats: int) -> dict:
    """All candidates on one model, interleaved."""
    model, x, y = model_and_data(name, batch)
    loss_func = nn.CrossEntropyLoss()
    plain = copy.deepcopy(model)

    candidates: dict[str, Callable[[], object]] = {"gradient pass": gradient_pass(plain, x, y, loss_func)}
    candidates |= fxkfac_candidates(model, x, y, fisher)
    errors = {}
    for peer, factory in (
        ("curvlinops (hooks) factors", curvlinops_candidate),
        ("backpack grad+factors", backpack_candidate),
    ):
        try:
            candidates[peer] = factory(model, x, y, fisher)
        except Exception as error:  # a peer that does not support the model
            errors[peer] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    times = interleaved_medians(candidates, repeats=repeats)
    unit = times["gradient pass"]
    return {
        "model": name,
        "batch": batch,
        "fisher": fisher,
        "seconds": times,
        "over_gradient_pass": {k: v / unit for k, v in times.items()},
        "fxkfac_speedup": {
            "vs curvlinops (factors only)": times.get("curvlinops (hooks) factors", float("nan"))
            / times["fxkfac factors"],
            "vs backpack (grad+factors)": times.get("backpack grad+factors", float("nan"))
            / times["fxkfac grad+factors"],
        },
        "unsupported": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet18"])
    parser.add_argument("--fisher", default="mc", choices=["mc", "type-2"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = [measure(name, args.batch, args.fisher, args.repeats) for name in args.models]
    print(f"\nFisher {args.fisher}, batch {args.batch}, {args.threads} threads (ms; × gradient pass)")
    for row in rows:
        print(f"\n{row['model']}")
        for key, seconds in row["seconds"].items():
            print(f"  {key:<28} {seconds * 1e3:>9.1f} ms  {row['over_gradient_pass'][key]:>6.2f}×")
        for key, value in row["fxkfac_speedup"].items():
            print(f"  fxkfac faster {key}: {value:.2f}×")
        for key, error in row["unsupported"].items():
            print(f"  {key}: unsupported ({error})")
    path = save(
        {
            "rows": rows,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "threads": args.threads,
            "repeats": args.repeats,
        },
        args.out or f"benchmarks/results/peers_{args.fisher.replace('-', '')}.json",
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
