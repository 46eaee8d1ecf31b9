"""Seed 001's SmallCNN trained with K-FAC and the NGD-T step-size regulator, on CIFAR-10.

Seed 001 ("NGD-T with layerwise K-FAC") trains a SmallCNN (conv 3→32, conv 32→64, 2×2 max-pool,
fc1 16384→256, fc2 256→10) with eigendecomposition-based K-FAC pseudo-inverses cached every 20
steps and the NGD-T regulator ``η_T = clip(η₀ Q_budget / ΔF)``, and plots the loss, ``η_T`` and the
predicted dissipation ``Q_pred = ½ η_T² ΔF``. Here the same model is trained with::

    fxkfac.KFAC(kmod, loss, damping=..., inverse="eigh", tol=..., inverse_every=20,
                regulator=fxkfac.NGDT(q_budget=..., eta0=1.0, eta_min=..., eta_max=..., null_ratio=0.01))

``fc1`` has 64·16·16 + 1 = 16,385 inputs (with the bias column): a dense input factor ``A`` would
be 16,385² floats (1.07 GB) and its eigendecomposition would take minutes on a CPU. fxkfac keeps
factors larger than ``max_factor_dim`` (default 4096) diagonal and warns; this script shows that
warning as one line and reports the time per step, so you can see the diagonal factor keeps
the step cheap.

Data: ``--data-dir`` is read with ``torchvision.datasets.CIFAR10(root, download=False)`` (the
folder holding ``cifar-10-batches-py``; nothing is downloaded). If the folder is absent or has no
CIFAR-10 in it, the script says so in one line and uses synthetic CIFAR-shaped data instead:
10 classes, each a fixed smooth random colour pattern, randomly shifted and scaled, under a
random distractor pattern and pixel noise.

Every ``--log-every`` steps it prints the loss, ``η_T``, ``Q_pred``, ``ΔF`` and the per-layer step
norms ``‖Δθ_layer‖``; at the end the test accuracy, the time per step (K-FAC step vs. a plain
forward+backward of the same batch) and the peak memory, and it writes ``cifar10_ngdt.png``
(loss, η_T, Q_pred, step norms) and ``log.json`` to ``--out``.

Run::

    python examples/cifar10_ngdt.py --data-dir ./data        # real CIFAR-10, if ./data has it
    python examples/cifar10_ngdt.py                          # synthetic fallback, 200 steps
    python examples/cifar10_ngdt.py --smoke                  # 5 steps of batch 16 (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fxkfac

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class SmallCNN(nn.Module):
    """Seed 001's model: two 3×3 convolutions, a 2×2 max-pool and two linear layers."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=True)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * 16 * 16, 256, bias=True)
        self.fc2 = nn.Linear(256, num_classes, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [N, 3, 32, 32]`` → logits ``[N, 10]``."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.pool(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def synthetic_cifar(n_train: int, n_test: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """CIFAR-shaped synthetic data: ``[3, 32, 32]`` images in 10 classes, roughly normalized.

    Each class is a fixed smooth colour pattern (4×4 Gaussian noise upsampled bicubically). An
    image is its class pattern shifted by up to 8 pixels, times a random contrast in
    ``[0.2, 0.6]``, plus a smooth random distractor pattern of its own and unit Gaussian pixel
    noise — hard enough that accuracy climbs over a few hundred steps (Adam, batch 32: about
    0.4 after 60 steps, 0.6 after 200), not at once.
    """
    generator = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(10, 3, 4, 4, generator=generator), size=40, mode="bicubic")

    def make(n: int) -> TensorDataset:
        labels = torch.randint(10, (n,), generator=generator)
        shifts = torch.randint(9, (n, 2), generator=generator)
        images = torch.stack(
            [
                patterns[c, :, i : i + 32, j : j + 32]
                for c, (i, j) in zip(labels.tolist(), shifts.tolist(), strict=True)
            ]
        )
        contrast = 0.4 * (0.5 + torch.rand(n, 1, 1, 1, generator=generator))
        distractor = F.interpolate(torch.randn(n, 3, 4, 4, generator=generator), size=32, mode="bicubic")
        images = contrast * images + distractor + torch.randn(images.shape, generator=generator)
        return TensorDataset(images, labels)

    return make(n_train), make(n_test)


def cifar10(data_dir: Path) -> tuple[Dataset, Dataset] | None:
    """Real CIFAR-10 with seed 001's transforms, or ``None`` (and one line why) if not there."""
    if not data_dir.is_dir():
        reason = f"{data_dir} does not exist"
    else:
        import torchvision
        import torchvision.transforms as T

        normalize = T.Normalize(CIFAR_MEAN, CIFAR_STD)
        train_transform = T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
        )
        test_transform = T.Compose([T.ToTensor(), normalize])
        try:
            train = torchvision.datasets.CIFAR10(
                data_dir, train=True, download=False, transform=train_transform
            )
            test = torchvision.datasets.CIFAR10(
                data_dir, train=False, download=False, transform=test_transform
            )
            return train, test
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            reason = f"{data_dir} has no (intact) cifar-10-batches-py"
    print(
        f"CIFAR-10 not found ({reason}); using synthetic CIFAR-shaped data instead "
        "(--data-dir DIR: the folder holding cifar-10-batches-py)"
    )
    return None


def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` over a loader."""
    correct, total, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    return correct / total, loss_sum / total


def peak_memory_mb() -> float:
    """Peak resident memory of this process (``ru_maxrss``) in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def plot(log: dict, path: Path, title: str) -> None:
    """Loss, η_T, Q_pred and per-layer step norms against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = log["step"]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    axes[0, 0].plot(steps, log["loss"], label="training loss (mini-batch)")
    if log["eval_step"]:
        axes[0, 0].plot(log["eval_step"], log["test_loss"], "o-", label="test loss")
    axes[0, 0].set(ylabel="cross-entropy", title="Loss")
    axes[0, 1].plot(steps, log["eta_T"], color="C1")
    axes[0, 1].set(yscale="log", ylabel="η_T", title="NGD-T step size η_T = clip(η₀ Q_budget / ΔF)")
    axes[1, 0].plot(steps, log["q_pred"], color="C2", label="Q_pred = ½ η_T² ΔF")
    axes[1, 0].set(yscale="log", xlabel="step", ylabel="Q_pred", title="Predicted dissipation")
    for layer, norms in log["step_norms"].items():
        axes[1, 1].plot(steps, norms, label=layer)
    inverse_steps = [step for step, inverse in zip(steps, log["inverse_step"], strict=True) if inverse]
    for axis in axes.flat:
        for i, step in enumerate(inverse_steps):
            axis.axvline(step, color="gray", ls=":", lw=0.8, label="inverse update" if i == 0 else None)
    axes[1, 1].set(yscale="log", xlabel="step", ylabel="‖Δθ_layer‖", title="Per-layer step norms")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, train, log, time, plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="5 steps of batch 16, a small test set")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="folder with cifar-10-batches-py")
    parser.add_argument(
        "--synthetic", action="store_true", help="use synthetic data even if CIFAR-10 is there"
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--batch-size", type=int, default=128, help="seed 001: 256")
    parser.add_argument(
        "--q-budget", type=float, default=1.0, help="NGD-T Q_budget (seed 001: 1e-3, too small to learn here)"
    )
    parser.add_argument("--eta-min", type=float, default=1e-6)
    parser.add_argument("--eta-max", type=float, default=1.0)
    parser.add_argument("--null-ratio", type=float, default=0.01, help="η_null / η_T (seed 001: 0.01)")
    parser.add_argument("--null-space", choices=("projection", "residual"), default="projection")
    parser.add_argument("--damping", type=float, default=1e-2, help="λ of (B ⊗ A + λI)⁻¹")
    parser.add_argument("--tol", type=float, default=1e-8, help="pseudo-inverse tolerance (seed 001: 1e-8)")
    parser.add_argument("--inverse-every", type=int, default=20, help="seed 001: 20")
    parser.add_argument("--factor-decay", type=float, default=0.95, help="seed 001: 0.95")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fxkfac-out/cifar10_ngdt"), help="output folder")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.log_every, args.eval_every = 5, 16, 1, 5
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    datasets = None if args.synthetic else cifar10(args.data_dir)
    source = "CIFAR-10" if datasets is not None else "synthetic"
    if datasets is None:
        datasets = synthetic_cifar(
            20 * args.batch_size if args.smoke else 20_000, 256 if args.smoke else 2_000
        )
    train_set, test_set = datasets
    if source == "CIFAR-10" and args.smoke:
        test_set = torch.utils.data.Subset(test_set, range(256))
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    test_loader = DataLoader(test_set, batch_size=256)
    print(
        f"data: {source}, {len(train_set)} train / {len(test_set)} test images; SmallCNN; "
        f"batch {args.batch_size}, {args.steps} steps, {torch.get_num_threads()} CPU threads"
    )

    model = SmallCNN()
    loss_func = nn.CrossEntropyLoss()
    kmod = fxkfac.compile(model, example_inputs=(torch.zeros(2, 3, 32, 32),))
    regulator = fxkfac.NGDT(
        q_budget=args.q_budget,
        eta0=1.0,
        eta_min=args.eta_min,
        eta_max=args.eta_max,
        null_ratio=args.null_ratio,
        null_space=args.null_space,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = fxkfac.KFAC(
            kmod,
            loss_func,
            damping=args.damping,
            inverse="eigh",
            tol=args.tol,
            inverse_every=args.inverse_every,
            factor_decay=args.factor_decay,
            regulator=regulator,
            seed=args.seed,
        )
    for warning in caught:
        print(f"fxkfac warning: {warning.message}")
    for layer in kmod.layers:
        diagonal = [
            name
            for name, names in (
                ("A", optimizer.preconditioner.diagonal_A),
                ("B", optimizer.preconditioner.diagonal_B),
            )
            if layer.name in names
        ]
        dims = f"A {layer.input_factor_dim:>6}  B {layer.output_factor_dim:>4}"
        storage = "diagonal " + ", ".join(diagonal) if diagonal else "dense"
        print(f"  {layer.name:<6} {layer.kind:<7} {dims}  {storage}")

    log: dict = {
        "step": [],
        "loss": [],
        "eta_T": [],
        "q_pred": [],
        "delta_f": [],
        "seconds": [],
        "cpu_seconds": [],
        "inverse_step": [],
        "step_norms": {},
        "eval_step": [],
        "test_loss": [],
        "test_accuracy": [],
    }
    accuracy, test_loss = evaluate(model, test_loader)
    log["eval_step"].append(0)
    log["test_loss"].append(test_loss)
    log["test_accuracy"].append(accuracy)
    print(f"step    0  test accuracy {accuracy:.4f}  test loss {test_loss:.4f} (before training)")
    step = 0
    while step < args.steps:
        for x, y in train_loader:
            if step == args.steps:
                break
            start, cpu_start = time.perf_counter(), time.process_time()
            out, cap = kmod(x)
            loss = loss_func(out, y)
            optimizer.zero_grad()
            loss.backward()
            stats = optimizer.step(cap, loss=loss)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            if stats["skipped"]:
                print(f"step {step}: skipped ({stats['skipped']})")
                step += 1
                continue
            log["step"].append(step)
            log["loss"].append(loss.item())
            log["eta_T"].append(stats["lr"])
            log["q_pred"].append(stats["q_pred"])
            log["delta_f"].append(stats["delta_f"])
            log["seconds"].append(seconds)
            log["cpu_seconds"].append(cpu_seconds)
            log["inverse_step"].append(bool(stats["inverses_updated"]))
            for layer, norm in stats["step_norms"].items():
                log["step_norms"].setdefault(layer, []).append(norm)
            if step % args.log_every == 0 or step == args.steps - 1:
                norms = " ".join(f"{k} {v:.2e}" for k, v in stats["step_norms"].items())
                print(
                    f"step {step:>4}  loss {loss.item():.4f}  η_T {stats['lr']:.3e}  "
                    f"Q_pred {stats['q_pred']:.3e}  ΔF {stats['delta_f']:.3e}  {1000 * seconds:7.0f} ms  "
                    f"‖Δθ‖: {norms}"
                )
            step += 1
            if step % args.eval_every == 0 or step == args.steps:
                accuracy, test_loss = evaluate(model, test_loader)
                log["eval_step"].append(step)
                log["test_loss"].append(test_loss)
                log["test_accuracy"].append(accuracy)
                print(f"step {step:>4}  test accuracy {accuracy:.4f}  test loss {test_loss:.4f}")

    # time per step: K-FAC step vs a plain forward+backward of the same model and batch size
    plain = []
    for _ in range(3):
        start = time.perf_counter()
        model.zero_grad()
        loss_func(model(x), y).backward()
        plain.append(time.perf_counter() - start)
    regular = [s for s, inv in zip(log["seconds"], log["inverse_step"], strict=True) if not inv]
    inverse = [s for s, inv in zip(log["seconds"], log["inverse_step"], strict=True) if inv]
    timing = {
        "median_ms": 1000 * statistics.median(log["seconds"]),
        "median_ms_without_inverse": 1000 * statistics.median(regular) if regular else math.nan,
        "median_ms_with_inverse": 1000 * statistics.median(inverse) if inverse else math.nan,
        "median_cpu_ms": 1000 * statistics.median(log["cpu_seconds"]),
        "plain_forward_backward_ms": 1000 * statistics.median(plain),
        "peak_memory_mb": peak_memory_mb(),
    }
    log["timing"] = timing
    print(
        f"time per step (batch {args.batch_size}, fc1's A diagonal): "
        f"{timing['median_ms']:.0f} ms median; {timing['median_ms_without_inverse']:.0f} ms without and "
        f"{timing['median_ms_with_inverse']:.0f} ms with an inverse update; "
        f"plain forward+backward {timing['plain_forward_backward_ms']:.0f} ms"
    )
    print(f"CPU time per step (all threads) {timing['median_cpu_ms']:.0f} ms median")
    print(f"peak memory {timing['peak_memory_mb']:.0f} MB")
    print(f"final test accuracy {log['test_accuracy'][-1]:.4f} ({source})")
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "cifar10_ngdt.png"
    data_name = "CIFAR-10" if source == "CIFAR-10" else "synthetic CIFAR-shaped data"
    plot(
        log,
        png,
        f"SmallCNN on {data_name} with K-FAC (eigh, λ={args.damping:g}) + NGD-T "
        f"(Q_budget={args.q_budget:g}): test accuracy {log['test_accuracy'][-1]:.3f}",
    )
    (args.out / "log.json").write_text(json.dumps(log, indent=1))
    print(f"wrote {png} and {args.out / 'log.json'}")


if __name__ == "__main__":
    main()
