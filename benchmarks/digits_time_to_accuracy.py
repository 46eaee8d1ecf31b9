"""Time to 97 % test accuracy on scikit-learn digits: SGD, Adam, K-FAC, K-FAC + NGD-T.

Task: ``sklearn.datasets.load_digits`` (1,797 8×8 images, pixel values scaled to [0, 1]),
a fixed stratified split of 1,297 training / 500 test images (``random_state=0``), an MLP
64-64-10 with ReLU, cross-entropy loss, batch size 64 (every epoch is a fresh permutation
drawn from the run's seed; the last incomplete batch is dropped, so every step sees 64 images).

Every run trains until the test accuracy — evaluated every ``--eval-every`` steps — first
reaches 97 %, or until ``--max-steps``. The clock covers only the training steps (batch
indexing, forward, backward, optimizer step); evaluation is excluded. Building the model,
``fxkfac.compile`` and the optimizer are setup, timed separately (``setup_ms``).

Each method gets a small grid (SGD and Adam: learning rate; K-FAC: KL-clip bound × damping,
the clip being K-FAC's effective step size here; NGD-T: q_budget × damping); each
configuration runs with ``--seeds`` seeds and is summarised by the median over seeds (a
seed that misses the target counts as infinitely slow). The best setting of a method has
the smallest median wall time. Training is deterministic (seeded
initialisation, batch order and MC sampling), so every (configuration, seed) run is
repeated ``--repeats`` times — interleaved over methods — and the fastest repeat is kept:
that removes interference from other processes on the machine without changing what is
measured (the repeats take the same steps; ``deterministic`` in the JSON checks it).
The minimum over a grid of noisy timings is biased low, so the chosen setting of every
method is then timed afresh (``--confirm-repeats``, interleaved over methods), and the
table reports those timings. Finally, the chosen setting of every method trains for
``--final-steps`` steps for its final test accuracy.

The shared K-FAC settings (``KFAC_BASE``, ``NGDT_BASE``) come from a sweep of steps to 97 %
(3 seeds, checked on 8 held-out seeds) over ``fisher_type``, ``factor_every``,
``inverse_every``, ``factor_decay``, ``momentum`` and ``kl_clip``; Adam got a comparable sweep
(learning rate 1e-3…7e-2 × betas), SGD learning rate × momentum. What it found:

* K-FAC without KL-clipping needs lr ≈ 0.1 at damping 1e-2 (35 steps; lr 0.2 stalls, lr 1
  diverges); with ``kl_clip=0.01`` (which then sets every step's size) 25–30 steps at
  damping 3e-4–1e-3.
* type-2 Fisher: same steps as MC at a higher cost; empirical Fisher: more steps.
* factors every 5 steps with ``factor_decay=0.8`` take no more steps than every step and
  halve the cost; every 10 steps needs ~10 % more steps. Momentum 0.5 does not help,
  0.9 hurts.
* Adam: lr 0.02–0.05 (85–115 steps), betas other than the default are no better.
* NGD-T without ``eta_max`` below 1 takes 55+ steps; ``eta_max=0.1`` gives 35–45.

    .venv/bin/python benchmarks/digits_time_to_accuracy.py            # full run (a few minutes)
    .venv/bin/python benchmarks/digits_time_to_accuracy.py --quick    # smoke run (< 30 s)
    .venv/bin/python benchmarks/digits_time_to_accuracy.py --profile  # where a K-FAC step goes

The headline is ``K-FAC wall time / best Adam wall time`` (design target ≤ 0.5).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fxkfac
import fxkfac.precond.preconditioner as preconditioner_module

TARGET = 0.97
HIDDEN = 64
BATCH_SIZE = 64


# -- data and model ------------------------------------------------------------------------
@dataclass
class Digits:
    x_train: Tensor  # [1297, 64]
    y_train: Tensor  # [1297]
    x_test: Tensor  # [500, 64]
    y_test: Tensor  # [500]


def load_data(split_seed: int = 0, test_size: int = 500) -> Digits:
    """Digits scaled to [0, 1]; a stratified split fixed by ``split_seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x / 16.0, y, test_size=test_size, random_state=split_seed, stratify=y
    )
    f32, i64 = torch.float32, torch.long
    return Digits(
        torch.tensor(x_tr, dtype=f32),
        torch.tensor(y_tr, dtype=i64),
        torch.tensor(x_te, dtype=f32),
        torch.tensor(y_te, dtype=i64),
    )


def make_model(seed: int, hidden: int = HIDDEN) -> nn.Module:
    """MLP 64-hidden-10 with ReLU; initialisation fixed by ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless index batches: a fresh permutation per epoch, last incomplete batch dropped."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


# -- methods: each setup returns step(x, y) -------------------------------------------------
Step = Callable[[Tensor, Tensor], Tensor]


class Diverged(RuntimeError):
    """The training loss became non-finite."""


def check(loss: Tensor) -> Tensor:
    """Stop a run whose loss is non-finite (before its backward; the same for every method)."""
    if not torch.isfinite(loss):
        raise Diverged(f"loss {float(loss)}")
    return loss


def first_order_setup(opt_class: type[torch.optim.Optimizer]) -> Callable[..., Step]:
    def setup(model: nn.Module, x0: Tensor, seed: int, **options: Any) -> Step:
        opt = opt_class(model.parameters(), **options)
        loss_fn = nn.CrossEntropyLoss()

        def step(x: Tensor, y: Tensor) -> Tensor:
            loss = check(loss_fn(model(x), y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss

        return step

    return setup


def kfac_setup(model: nn.Module, x0: Tensor, seed: int, **options: Any) -> Step:
    """The loop of issue 4: ``out, cap = kmod(x)`` ... ``opt.step(cap)``.

    ``options`` go to :class:`fxkfac.KFAC`; ``q_budget`` and ``eta_max`` build an NGD-T regulator.
    """
    options = dict(options)
    if "q_budget" in options:
        options["regulator"] = fxkfac.NGDT(q_budget=options.pop("q_budget"), eta_max=options.pop("eta_max"))
    loss_fn = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(model, example_inputs=(x0,))
    opt = fxkfac.KFAC(kmod, loss_func=loss_fn, seed=seed, **options)

    def step(x: Tensor, y: Tensor) -> Tensor:
        out, cap = kmod(x)
        loss = check(loss_fn(out, y))
        opt.zero_grad()
        loss.backward()
        opt.step(cap)
        return loss

    step.optimizer = opt  # type: ignore[attr-defined]
    step.kmod = kmod  # type: ignore[attr-defined]
    return step


SETUPS: dict[str, Callable[..., Step]] = {
    "sgd": first_order_setup(torch.optim.SGD),
    "adam": first_order_setup(torch.optim.Adam),
    "kfac": kfac_setup,
    "ngdt": kfac_setup,
}
METHOD_NAMES = {"sgd": "SGD (momentum 0.9)", "adam": "Adam", "kfac": "K-FAC", "ngdt": "K-FAC + NGD-T"}

# K-FAC settings shared by the grid points (from the sweep in the module docstring): MC
# Fisher, factors every 5 steps with a short memory, inverses every 10. KL-clipping sets the
# step size: the update is scaled to η² Σ⟨Δ, g⟩ = kl_clip whenever that is smaller than the
# lr step, which here is every step for lr ≥ 0.1 (lr 0.1, 0.3 and 1 give the same
# trajectory) — so lr is fixed at 1 and the grid runs over kl_clip × damping.
KFAC_BASE: dict[str, Any] = {
    "fisher_type": "mc",
    "factor_every": 5,
    "inverse_every": 10,
    "factor_decay": 0.8,
    "momentum": 0.0,
    "lr": 1.0,
}
# NGD-T sets the step size itself (η_T = clip(q_budget / ΔF, η_min, eta_max)); no KL-clipping.
NGDT_BASE: dict[str, Any] = {
    "fisher_type": "mc",
    "factor_every": 5,
    "inverse_every": 10,
    "factor_decay": 0.8,
    "eta_max": 0.1,
}


def grids(quick: bool) -> dict[str, list[dict[str, Any]]]:
    """The configurations of every method (``quick``: one good point per method)."""
    if quick:
        return {
            "sgd": [{"lr": 0.2, "momentum": 0.9}],
            "adam": [{"lr": 0.03}],
            "kfac": [{**KFAC_BASE, "kl_clip": 0.01, "damping": 1e-3}],
            "ngdt": [{**NGDT_BASE, "q_budget": 0.3, "damping": 1e-3}],
        }
    return {
        "sgd": [{"lr": lr, "momentum": 0.9} for lr in (0.05, 0.1, 0.2, 0.3, 0.5)],
        "adam": [{"lr": lr} for lr in (0.005, 0.01, 0.02, 0.03, 0.05)],
        "kfac": [
            {**KFAC_BASE, "kl_clip": k, "damping": d} for k in (0.003, 0.01, 0.03) for d in (3e-4, 1e-3)
        ],
        "ngdt": [{**NGDT_BASE, "q_budget": q, "damping": d} for q in (0.1, 0.3, 1.0) for d in (1e-3, 1e-2)],
    }


def describe(method: str, config: dict[str, Any]) -> str:
    keys = {"sgd": ("lr",), "adam": ("lr",), "kfac": ("kl_clip", "damping"), "ngdt": ("q_budget", "damping")}
    return ", ".join(f"{k}={config[k]:g}" for k in keys[method])


# -- one run -------------------------------------------------------------------------------
@dataclass
class Run:
    steps: int | None  # first evaluated step with accuracy ≥ target (None: missed)
    time_s: float | None  # training wall time until then
    clock_s: float  # training wall time of the whole run
    steps_taken: int
    accuracy: float  # test accuracy at the end of the run
    setup_s: float
    diverged: bool = False
    curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def per_step_ms(self) -> float:
        return 1e3 * self.clock_s / max(self.steps_taken, 1)


@torch.no_grad()
def accuracy(model: nn.Module, data: Digits) -> float:
    return float((model(data.x_test).argmax(1) == data.y_test).float().mean())


def train(
    method: str,
    config: dict[str, Any],
    seed: int,
    data: Digits,
    *,
    max_steps: int,
    eval_every: int,
    target: float | None = TARGET,
) -> Run:
    """Train until test accuracy ≥ ``target`` (``None``: all ``max_steps``)."""
    start = time.perf_counter()
    model = make_model(seed)
    step = SETUPS[method](model, data.x_train[:BATCH_SIZE], seed, **config)
    setup = time.perf_counter() - start

    clock = 0.0
    reached: tuple[int, float] | None = None
    acc = accuracy(model, data)
    curve = [(0, acc)]
    diverged = False
    index_stream = batches(len(data.y_train), BATCH_SIZE, seed)
    taken = 0
    while taken < max_steps:
        t0 = time.perf_counter()
        idx = next(index_stream)
        try:
            step(data.x_train[idx], data.y_train[idx])
        except Diverged:
            diverged = True
        clock += time.perf_counter() - t0
        taken += 1
        if diverged or taken % eval_every == 0 or taken == max_steps:
            acc = accuracy(model, data)
            curve.append((taken, acc))
            if diverged:
                break
            if target is not None and acc >= target:
                reached = (taken, clock)
                break
    return Run(
        steps=reached[0] if reached else None,
        time_s=reached[1] if reached else None,
        clock_s=clock,
        steps_taken=taken,
        accuracy=acc,
        setup_s=setup,
        diverged=diverged,
        curve=curve,
    )


def median_or_inf(values: list[float | None]) -> float:
    """Median where a missing value (target missed) counts as +∞."""
    return statistics.median([math.inf if v is None else v for v in values])


def summarise(repeats_per_seed: list[list[Run]]) -> dict[str, Any]:
    """Fastest repeat per seed, then the median over seeds."""
    fastest = [min(reps, key=lambda r: r.clock_s) for reps in repeats_per_seed]
    deterministic = all(len({(r.steps, r.steps_taken) for r in reps}) == 1 for reps in repeats_per_seed)
    return {
        "steps": median_or_inf([r.steps for r in fastest]),
        "time_s": median_or_inf([r.time_s for r in fastest]),
        "per_step_ms": statistics.median(r.per_step_ms for r in fastest),
        "setup_ms": 1e3 * statistics.median(r.setup_s for r in fastest),
        "reached": sum(r.steps is not None for r in fastest),
        "diverged": sum(r.diverged for r in fastest),
        "deterministic": deterministic,
        "seeds": [
            {
                "steps": r.steps,
                "time_s": r.time_s,
                "per_step_ms": r.per_step_ms,
                "steps_taken": r.steps_taken,
                "accuracy": r.accuracy,
                "diverged": r.diverged,
                "repeat_times_s": [rep.clock_s for rep in reps],
            }
            for r, reps in zip(fastest, repeats_per_seed, strict=True)
        ],
    }


# -- profile of one K-FAC step -------------------------------------------------------------
def _timed(owner: Any, name: str, totals: dict[str, float]) -> None:
    """Wrap ``owner.name`` (an instance attribute) to add its wall time to ``totals[name]``."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = original(*args, **kwargs)
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
        return result

    setattr(owner, name, wrapper)


def profile_step(method: str, config: dict[str, Any], data: Digits, steps: int = 400) -> dict[str, float]:
    """Mean µs per step of each phase (forward, backward, optimizer step and its parts).

    Wraps a few fxkfac functions for the duration of the call (restored afterwards): the
    B-factor work that runs in a hook during ``loss.backward()``, and the inverses.
    """
    names = ("backpropagated_vectors", "grad_factors", "KroneckerInverse")
    originals = {name: getattr(preconditioner_module, name) for name in names}
    try:
        return _profile_step(method, config, data, steps)
    finally:
        for name, original in originals.items():
            setattr(preconditioner_module, name, original)


def _profile_step(method: str, config: dict[str, Any], data: Digits, steps: int) -> dict[str, float]:
    model = make_model(0)
    loss_fn = nn.CrossEntropyLoss()
    totals: dict[str, float] = {}
    if method in ("kfac", "ngdt"):
        step = kfac_setup(model, data.x_train[:BATCH_SIZE], 0, **config)
        opt, kmod = step.optimizer, step.kmod  # type: ignore[attr-defined]
        pre = opt.preconditioner
        for name in ("update", "precondition", "gradient_matrices", "_new_factors"):
            _timed(pre, name, totals)
        # The B factors are computed in a hook during loss.backward(): time its two parts.
        for name in ("backpropagated_vectors", "grad_factors"):
            _timed(preconditioner_module, name, totals)
        inverse_class = preconditioner_module.KroneckerInverse

        class TimedInverse(inverse_class):  # type: ignore[misc, valid-type]
            @classmethod
            def compute(cls, *args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                result = inverse_class.compute(*args, **kwargs)
                totals["inverses"] = totals.get("inverses", 0.0) + time.perf_counter() - t0
                return result

        preconditioner_module.KroneckerInverse = TimedInverse

        def forward(x: Tensor) -> tuple[Tensor, Any]:
            return kmod(x)

        def opt_step(cap: Any) -> None:
            opt.step(cap)
    else:
        opt = torch.optim.Adam(model.parameters(), **config)

        def forward(x: Tensor) -> tuple[Tensor, Any]:
            return model(x), None

        def opt_step(cap: Any) -> None:
            opt.step()

    stream = batches(len(data.y_train), BATCH_SIZE, 0)
    warmup = 20
    for i in range(warmup + steps):
        if i == warmup:
            totals.clear()
        t0 = time.perf_counter()
        idx = next(stream)
        x, y = data.x_train[idx], data.y_train[idx]
        t1 = time.perf_counter()
        out, cap = forward(x)
        loss = loss_fn(out, y)
        t2 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t3 = time.perf_counter()
        opt_step(cap)
        t4 = time.perf_counter()
        for key, value in (("data", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2), ("step", t4 - t3)):
            totals[key] = totals.get(key, 0.0) + value
    return {key: 1e6 * value / steps for key, value in totals.items()}


def run_profile(data: Digits, console: Any) -> dict[str, Any]:
    from rich.table import Table

    kfac = {**KFAC_BASE, "kl_clip": 0.01, "damping": 1e-3}
    cases = {
        "Adam": ("adam", {"lr": 0.03}),
        "K-FAC (benchmark: F/5, inv/10)": ("kfac", kfac),
        "K-FAC F/1, inv/10": ("kfac", {**kfac, "factor_every": 1}),
        "K-FAC F/1, inv/1": ("kfac", {**kfac, "factor_every": 1, "inverse_every": 1}),
        "NGD-T (benchmark: F/5, inv/10)": ("ngdt", {**NGDT_BASE, "q_budget": 0.3, "damping": 1e-3}),
    }
    results = {}
    for label, (method, config) in cases.items():
        runs = [profile_step(method, config, data) for _ in range(3)]
        phases = {key: min(run.get(key, 0.0) for run in runs) for key in runs[0]}  # least disturbed
        phases["total"] = sum(phases[k] for k in ("data", "forward", "backward", "step"))
        if "update" in phases:
            phases["update_rest"] = phases["update"] - phases["_new_factors"] - phases.get("inverses", 0.0)
            phases["step_rest"] = (
                phases["step"] - phases["update"] - phases["precondition"] - phases["gradient_matrices"]
            )
        results[label] = phases
    table = Table(title="µs per step, mean over 400 steps (min of 3 runs); F/k: factors every k steps")
    labels = {
        "data": "batch indexing",
        "forward": "forward (+ capture) and loss",
        "backward": "backward",
        "backpropagated_vectors": "  ↳ MC label sampling (hook)",
        "grad_factors": "  ↳ B factors: batched backward + Gram (hook)",
        "step": "optimizer step",
        "gradient_matrices": "  ↳ gradient matrices",
        "update": "  ↳ factors and inverses (update)",
        "_new_factors": "      ↳ A factors + gather",
        "inverses": "      ↳ inverses (Cholesky)",
        "update_rest": "      ↳ rest: EMA, finite checks",
        "precondition": "  ↳ precondition B⁻¹ G A⁻¹",
        "step_rest": "  ↳ rest of KFAC.step (checks, ΔF, KL clip, writes)",
        "total": "total",
    }
    table.add_column("phase")
    for label in results:
        table.add_column(label, justify="right")
    for key, label in labels.items():
        table.add_row(label, *(f"{r[key]:.0f}" if key in r else "—" for r in results.values()))
    console.print(table)
    return results


# -- main ----------------------------------------------------------------------------------
def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def finite_or_none(value: Any) -> Any:
    """JSON-safe copy: ±∞ and NaN become ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one point per method, 1 seed (smoke run)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per configuration (default 3; quick 1)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per grid run (default 3; quick 1)"
    )
    parser.add_argument(
        "--confirm-repeats",
        type=int,
        default=None,
        help="timed repeats of each method's chosen setting, reported in the table (default 10; quick 0)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="step cap per run (default 2000; quick 400)"
    )
    parser.add_argument("--final-steps", type=int, default=None, help="steps of the final-accuracy runs")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate test accuracy every k steps")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--methods", default="sgd,adam,kfac,ngdt", help="comma-separated subset")
    parser.add_argument(
        "--profile", action="store_true", help="only profile the phases of a K-FAC step (no benchmark)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digits.json"))
    args = parser.parse_args(argv)

    seeds = args.seeds or (1 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 3)
    confirm_repeats = args.confirm_repeats if args.confirm_repeats is not None else (0 if args.quick else 10)
    max_steps = args.max_steps or (400 if args.quick else 2000)
    final_steps = args.final_steps if args.final_steps is not None else (200 if args.quick else 1000)
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(SETUPS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {sorted(SETUPS)}")
    data = load_data()
    configs = {m: grid for m, grid in grids(args.quick).items() if m in methods}

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    load = os.getloadavg()[0]
    if load + torch.get_num_threads() > (os.cpu_count() or 1) + 0.5:
        stall = (
            f"; with {torch.get_num_threads()} intra-op threads a step can slow down 10× or more when "
            "one thread is descheduled (try --threads 1)"
            if torch.get_num_threads() > 1
            else ""
        )
        console.print(
            f"[yellow]warning: load average {load:.1f} on {os.cpu_count()} CPUs — other processes "
            f"compete for the cores{stall}. The fastest of the repeats is kept; compare ratios "
            "from one run only.[/yellow]"
        )
    if args.profile:
        profile = run_profile(data, console)
        path = args.out.with_name(args.out.stem + "_profile.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"threads": torch.get_num_threads(), "us_per_step": finite_or_none(profile)}, indent=2)
        )
        console.print(f"saved {path}")
        return 0
    console.print(
        f"digits: {len(data.y_train)} train / {len(data.y_test)} test, MLP 64-{HIDDEN}-10 ReLU, "
        f"batch {BATCH_SIZE}, target {TARGET:.0%}, eval every {args.eval_every} steps, max {max_steps} "
        f"steps, {seeds} seed(s) × {repeats} repeat(s), {torch.get_num_threads()} thread(s)"
    )
    started = time.perf_counter()
    load_before = os.getloadavg()
    # Warm-up: first calls pay one-off costs (lazy imports, allocator, fx codegen).
    for method in methods:
        train(method, configs[method][0], 0, data, max_steps=2 * args.eval_every, eval_every=args.eval_every)

    records: dict[tuple[str, int, int], list[Run]] = {}
    for repeat in range(repeats):
        for seed in range(seeds):
            for method in methods:
                for index, config in enumerate(configs[method]):
                    run = train(method, config, seed, data, max_steps=max_steps, eval_every=args.eval_every)
                    records.setdefault((method, index, seed), []).append(run)
        console.print(f"  repeat {repeat + 1}/{repeats} done ({time.perf_counter() - started:.0f} s)")

    results: dict[str, Any] = {}
    for method in methods:
        rows = []
        for index, config in enumerate(configs[method]):
            summary = {"config": config, **summarise([records[(method, index, s)] for s in range(seeds)])}
            rows.append(summary)
            console.print(
                f"  {method:5s} {describe(method, config):26s} steps {fmt(summary['steps'], '.0f'):>5s}  "
                f"time {fmt(1e3 * summary['time_s'], '.1f'):>6s} ms  {summary['per_step_ms']:.3f} ms/step  "
                f"reached {summary['reached']}/{seeds}"
                + (f"  diverged {summary['diverged']}" if summary["diverged"] else "")
            )
        chosen = min(range(len(rows)), key=lambda i: (rows[i]["time_s"], rows[i]["steps"]))
        results[method] = {"grid": rows, "chosen": chosen}

    # Confirmation: the grid minimum is biased low (the luckiest of several noisy timings),
    # so the chosen settings are timed again, interleaved, and those timings are reported.
    confirm: dict[tuple[str, int], list[Run]] = {}
    if confirm_repeats:
        for _ in range(confirm_repeats):
            for seed in range(seeds):
                for method in methods:
                    config = configs[method][results[method]["chosen"]]
                    run = train(method, config, seed, data, max_steps=max_steps, eval_every=args.eval_every)
                    confirm.setdefault((method, seed), []).append(run)
        console.print(
            f"  confirmation: {confirm_repeats} repeat(s) of the chosen settings "
            f"({time.perf_counter() - started:.0f} s)"
        )
    for method in methods:
        chosen = results[method]["chosen"]
        if confirm_repeats:
            runs = [confirm[(method, s)] for s in range(seeds)]
            best = {"config": configs[method][chosen], **summarise(runs)}
        else:
            best = results[method]["grid"][chosen]
        results[method]["best"] = best

    if final_steps:
        for method in methods:
            config = results[method]["best"]["config"]
            runs = [
                train(method, config, s, data, max_steps=final_steps, eval_every=final_steps, target=None)
                for s in range(seeds)
            ]
            results[method]["final"] = {
                "steps": final_steps,
                "accuracy": statistics.median(r.accuracy for r in runs),
                "accuracies": [r.accuracy for r in runs],
            }

    table = Table(
        title=f"digits, MLP 64-{HIDDEN}-10, batch {BATCH_SIZE}: time to {TARGET:.0%} test accuracy "
        f"(median of {seeds} seed(s), fastest of {confirm_repeats or repeats} repeat(s), "
        f"{torch.get_num_threads()} thread(s))"
    )
    columns = ("method", "best setting", "steps to 97 %", "wall time to 97 % [ms]", "per step [ms]")
    for column in (*columns, "setup [ms]", f"final acc. ({final_steps} steps)"):
        table.add_column(column, justify="left" if column in columns[:2] else "right")
    for method in methods:
        best, final = results[method]["best"], results[method].get("final")
        table.add_row(
            METHOD_NAMES[method],
            describe(method, best["config"]),
            fmt(best["steps"], ".0f"),
            fmt(1e3 * best["time_s"], ".1f"),
            f"{best['per_step_ms']:.3f}",
            f"{best['setup_ms']:.1f}",
            f"{final['accuracy']:.3f}" if final else "—",
        )
    console.print(table)

    ratios: dict[str, float] = {}
    if "adam" in results:
        adam = results["adam"]["best"]
        for method in ("kfac", "ngdt", "sgd"):
            if method in results:
                best = results[method]["best"]
                ratios[f"{method}/adam"] = best["time_s"] / adam["time_s"]
                ratios[f"{method}/adam incl. setup"] = (best["time_s"] + best["setup_ms"] / 1e3) / (
                    adam["time_s"] + adam["setup_ms"] / 1e3
                )
                ratios[f"{method}/adam steps"] = best["steps"] / adam["steps"]
                ratios[f"{method}/adam per step"] = best["per_step_ms"] / adam["per_step_ms"]
        for method in ("kfac", "ngdt"):
            if f"{method}/adam" in ratios:
                ratio = ratios[f"{method}/adam"]
                verdict = "meets" if ratio <= 0.5 else f"misses by {ratio / 0.5:.2f}×"
                console.print(
                    f"{METHOD_NAMES[method]} wall time / best Adam wall time = {ratio:.2f} "
                    f"(target ≤ 0.5: {verdict}); steps {ratios[f'{method}/adam steps']:.2f}×, "
                    f"per step {ratios[f'{method}/adam per step']:.2f}×, "
                    f"incl. setup {ratios[f'{method}/adam incl. setup']:.2f}"
                )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "digits_time_to_accuracy",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "target": TARGET,
            "model": f"MLP 64-{HIDDEN}-10 ReLU",
            "batch_size": BATCH_SIZE,
            "train": len(data.y_train),
            "test": len(data.y_test),
            "split_seed": 0,
            "eval_every": args.eval_every,
            "max_steps": max_steps,
            "final_steps": final_steps,
            "seeds": seeds,
            "repeats": repeats,
            "confirm_repeats": confirm_repeats,
            "threads": torch.get_num_threads(),
            "quick": args.quick,
            "kfac_base": KFAC_BASE,
            "ngdt_base": NGDT_BASE,
        },
        "environment": {
            "torch": torch.__version__,
            "fxkfac": fxkfac.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "results": results,
        "ratios": ratios,
        "total_s": time.perf_counter() - started,
    }
    args.out.write_text(json.dumps(finite_or_none(payload), indent=2))
    console.print(f"saved {args.out} (total {payload['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
