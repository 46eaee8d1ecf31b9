"""Shared helpers for the benchmarks: the passes compared, timing medians, peak memory, JSON output."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import fxkfac
from fxkfac.factors.compute import KFACApprox, input_factors


def gradient_pass(model: nn.Module, x: Tensor, y: Tensor, loss_func: nn.Module) -> Callable[[], None]:
    """The baseline: ``loss_func(model(x), y).backward()`` on the original module."""

    def run() -> None:
        model.zero_grad(set_to_none=True)
        loss_func(model(x), y).backward()

    return run


def factor_pass(
    kmod: fxkfac.CompiledModule,
    pre: fxkfac.KFACPreconditioner,
    x: Tensor,
    y: Tensor,
    loss_func: nn.Module,
    approx: KFACApprox = KFACApprox.EXPAND,
) -> Callable[[], None]:
    """Forward with capture, the user's backward (``pre``'s hook forms ``B`` in it), then ``A``."""

    def run() -> None:
        kmod.zero_grad(set_to_none=True)
        pre.steps = 0  # factors due: the hook computes B inside loss.backward()
        out, cap = kmod(x)
        loss_func(out, y).backward()
        input_factors(cap, pre.loss_rule.reduction_factor(out), approx)
        assert cap.grad_factors is not None

    return run


def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2
) -> dict[str, float]:
    """Median times of several functions, run interleaved so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated while ``fn`` runs (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # replay allocation events in order to find the peak of live bytes
    events = sorted((e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak


def _status_kib(key: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` entry of ``/proc/self/status`` in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_peak_increase_bytes(fn: Callable[[], object]) -> int:
    """Peak resident memory while ``fn`` runs, above the resident memory before it (Linux).

    Resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``), runs ``fn``
    and reads ``VmHWM``; free heap memory is first returned to the system (glibc
    ``malloc_trim``) so that reusing it counts. Call it in a fresh process (see
    :func:`in_fresh_process`) so that little earlier work is cached at all.
    """
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand cached free heap back: reuse must fault
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def in_fresh_process(target: Callable[..., object], *args: object) -> object:
    """``target(*args)`` in a new spawned Python process; returns its result."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(target, args)


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def save(results: dict, path: str | Path) -> Path:
    """Write ``results`` (plus machine info) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**results, "machine": machine()}, indent=1))
    return path
