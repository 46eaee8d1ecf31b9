"""``fxkfac demo``: SGD, Adam, K-FAC and K-FAC + NGD-T on scikit-learn's digits, offline.

Trains the same MLP (64-64-10, ReLU) from the same initialization with each optimizer,
shows rich progress bars, prints a results table, and writes PNG plots (loss, test accuracy,
NGD-T step size η_T and predicted dissipation Q_pred, per-layer K-FAC step norms) and a
JSON file of every number to the output folder. Each optimizer's settings are the best of
a small sweep over 3 seeds (SGD lr 0.1/0.3, Adam lr 3e-3/1e-2/3e-2; K-FAC with and without
KL-clipping; NGD-T with the damped Cholesky inverse beat the ``eigh`` pseudo-inverse with a
null-space step here); ``benchmarks/digits_time_to_accuracy.py`` tunes all four more
thoroughly. The data (1,797 8×8 digits) ships with scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fxkfac
from fxkfac.errors import FxKfacError


@dataclass
class Run:
    """History of one optimizer's run."""

    name: str
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    eta: list[float] = field(default_factory=list)
    q_pred: list[float] = field(default_factory=list)
    step_norms: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    steps_to_97: int | None = None
    seconds_to_97: float | None = None


def load_digits_split(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits scaled to [0, 1]: ``(x_train [1297, 64], y_train, x_test [500, 64], y_test)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise FxKfacError("fxkfac demo needs scikit-learn: pip install 'fxkfac[demo]'") from exc
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[500:], y[500:], x[:500], y[:500]


def make_model(seed: int) -> nn.Module:
    """The demo MLP, 64-64-10 with ReLU, initialized from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


OPTIMIZERS: dict[str, Callable[[nn.Module, Any, nn.Module], Any]] = {
    "SGD": lambda model, kmod, loss: torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9),
    "Adam": lambda model, kmod, loss: torch.optim.Adam(model.parameters(), lr=1e-2),
    "K-FAC": lambda model, kmod, loss: fxkfac.KFAC(
        kmod,
        loss,
        lr=0.3,
        damping=0.03,
        momentum=0.5,
        factor_every=5,
        inverse_every=10,
        factor_decay=0.8,
        kl_clip=1e-2,
    ),
    "K-FAC + NGD-T": lambda model, kmod, loss: fxkfac.KFAC(
        kmod,
        loss,
        damping=1e-3,
        factor_every=5,
        inverse_every=10,
        factor_decay=0.8,
        regulator=fxkfac.NGDT(q_budget=0.3, eta_max=0.1),
    ),
}


def train(name: str, steps: int, batch_size: int, seed: int, data, progress=None, task=None) -> Run:
    """Train the demo MLP with optimizer ``name``; evaluates every 5 steps (not timed)."""
    x_train, y_train, x_test, y_test = data
    model = make_model(seed)
    loss_func = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(model, example_inputs=(x_train[:2],))
    optimizer = OPTIMIZERS[name](model, kmod, loss_func)
    is_kfac = isinstance(optimizer, fxkfac.KFAC)
    run = Run(name)
    batches = torch.Generator().manual_seed(seed)
    elapsed = 0.0
    for step in range(steps):
        start = time.perf_counter()
        index = torch.randint(len(x_train), (batch_size,), generator=batches)
        x, y = x_train[index], y_train[index]
        if is_kfac:
            out, cap = kmod(x)
        else:
            out, cap = model(x), None
        loss = loss_func(out, y)
        optimizer.zero_grad()
        loss.backward()
        stats = optimizer.step(cap, loss=loss) if is_kfac else optimizer.step()
        elapsed += time.perf_counter() - start
        run.steps.append(step)
        run.train_loss.append(float(loss.detach()))
        if is_kfac and stats.get("skipped") is None:
            run.eta.append(stats["lr"])
            run.q_pred.append(stats["q_pred"] if stats["q_pred"] is not None else float("nan"))
            for layer, norm in stats["step_norms"].items():
                run.step_norms.setdefault(layer, []).append(norm)
        if step % 5 == 4 or step == steps - 1:
            with torch.no_grad():
                accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
            run.eval_steps.append(step + 1)
            run.test_accuracy.append(accuracy)
            if accuracy >= 0.97 and run.steps_to_97 is None:
                run.steps_to_97, run.seconds_to_97 = step + 1, elapsed
        if progress is not None:
            progress.update(task, advance=1, description=f"{name:<14} loss {float(loss.detach()):.3f}")
    run.seconds = elapsed
    return run


def plot(runs: list[Run], out_dir: Path) -> list[Path]:
    """Write the PNG plots; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise FxKfacError("fxkfac demo needs matplotlib for its plots: pip install 'fxkfac[demo]'") from exc
    paths = []
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        loss_axis.plot(run.steps, run.train_loss, label=run.name, alpha=0.85)
        accuracy_axis.plot(run.eval_steps, run.test_accuracy, label=run.name)
    loss_axis.set(yscale="log", xlabel="step", ylabel="training loss (mini-batch)", title="Training loss")
    accuracy_axis.axhline(0.97, color="gray", linestyle="--", linewidth=1, label="97 %")
    accuracy_axis.set(xlabel="step", ylabel="test accuracy", title="Test accuracy", ylim=(0.5, 1.0))
    for axis in (loss_axis, accuracy_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle("fxkfac demo: scikit-learn digits, MLP 64-64-10")
    figure.tight_layout()
    paths.append(out_dir / "loss_accuracy.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    kfac_runs = [run for run in runs if run.eta]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in kfac_runs:
        axes[0].plot(run.eta, label=run.name)
        if any(q == q for q in run.q_pred):  # NGD-T runs only (nan otherwise)
            axes[1].plot(run.q_pred, label=run.name)
        for layer, norms in run.step_norms.items():
            axes[2].plot(norms, label=f"{run.name}: layer {layer}", alpha=0.8)
    axes[0].set(
        yscale="log", xlabel="step", ylabel="step size", title="Step size (η_T for NGD-T, lr for K-FAC)"
    )
    axes[1].set(yscale="log", xlabel="step", ylabel="Q_pred = ½ η_T² ΔF", title="NGD-T predicted dissipation")
    axes[2].set(yscale="log", xlabel="step", ylabel="‖Δθ_layer‖", title="Per-layer step norms")
    for axis in axes:
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(out_dir / "kfac_diagnostics.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def run_demo(
    steps: int, seed: int, out_dir: Path, batch_size: int = 64, methods: list[str] | None = None
) -> dict:
    """Train every method, print the table, write plots and JSON; returns the results."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    if steps < 1:
        raise FxKfacError(f"--steps must be at least 1, got {steps}")
    methods = methods or list(OPTIMIZERS)
    unknown = [m for m in methods if m not in OPTIMIZERS]
    if unknown:
        raise FxKfacError(f"unknown method(s) {unknown}; choose from {list(OPTIMIZERS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console()
    data = load_digits_split(seed)
    console.print(
        f"[bold]fxkfac demo[/]: digits ({len(data[0])} train / {len(data[2])} test), "
        f"MLP 64-64-10, batch {batch_size}, {steps} steps, seed {seed}"
    )
    runs = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for name in methods:
            task = progress.add_task(name, total=steps)
            runs.append(train(name, steps, batch_size, seed, data, progress, task))
    table = Table(title="Results (wall time excludes evaluation)")
    for column in (
        "method",
        "final test acc.",
        "best test acc.",
        "steps to 97 %",
        "time to 97 %",
        "ms / step",
    ):
        table.add_column(column, justify="right" if column != "method" else "left")
    for run in runs:
        table.add_row(
            run.name,
            f"{run.test_accuracy[-1]:.3f}",
            f"{max(run.test_accuracy):.3f}",
            str(run.steps_to_97) if run.steps_to_97 else "—",
            f"{run.seconds_to_97:.2f} s" if run.seconds_to_97 is not None else "—",
            f"{1000 * run.seconds / steps:.2f}",
        )
    console.print(table)
    paths = plot(runs, out_dir)
    results = {"steps": steps, "seed": seed, "batch_size": batch_size, "runs": [vars(run) for run in runs]}
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1))
    console.print("wrote " + ", ".join(str(p) for p in [*paths, json_path]))
    return results
