"""Run every script in examples/ as a user would (a subprocess, ``--smoke``) and check its output.

Each example is offline and finishes in seconds in smoke mode; together they take well under a
minute on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, timeout: float = 120) -> str:
    """Run ``python examples/NAME.py ARGS``; assert exit code 0; return stdout."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=EXAMPLES.parent,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_moons(tmp_path):
    out = run_example("two_moons.py", "--smoke", "--out", str(tmp_path))
    accuracy = {m: float(v) for m, v in re.findall(r"^(SGD|Adam|K-FAC)\s+([0-9.]+)", out, re.MULTILINE)}
    assert set(accuracy) == {"SGD", "Adam", "K-FAC"}, out
    # seed 000's K-FAC reached 0.59 on this task; fxkfac's must win or tie
    assert accuracy["K-FAC"] >= 0.98, out
    assert accuracy["K-FAC"] >= max(accuracy["SGD"], accuracy["Adam"]), out
    assert re.search(r"K-FAC (wins|ties)", out), out
    assert (tmp_path / "two_moons.png").stat().st_size > 10_000


def test_cifar10_ngdt_falls_back_to_synthetic_data(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()  # exists, but torchvision finds no cifar-10-batches-py in it
    out = run_example("cifar10_ngdt.py", "--smoke", "--data-dir", str(empty), "--out", str(tmp_path))
    assert "CIFAR-10 not found" in out and "has no (intact) cifar-10-batches-py" in out, out
    assert "using synthetic CIFAR-shaped data" in out, out
    assert "fc1: factor dimension 16385 exceeds max_factor_dim=4096" in out, out
    assert re.search(r"fc1\s+linear\s+A\s+16385\s+B\s+256\s+diagonal A", out), out
    assert re.search(r"time per step \(batch 16, fc1's A diagonal\): \d+ ms median", out), out
    assert "final test accuracy" in out
    assert (tmp_path / "cifar10_ngdt.png").stat().st_size > 10_000
    log = json.loads((tmp_path / "log.json").read_text())
    assert len(log["step"]) == 5
    assert all(math.isfinite(v) and v > 0 for v in log["eta_T"] + log["q_pred"] + log["loss"])
    assert set(log["step_norms"]) == {"conv1", "conv2", "fc1", "fc2"}


def test_cifar10_loader_reports_a_missing_folder(tmp_path, capsys):
    example = load_example("cifar10_ngdt")
    assert example.cifar10(tmp_path / "absent") is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "absent does not exist); using synthetic" in lines[0], lines


def test_functional_model():
    out = run_example("functional_model.py", "--smoke")
    assert "3 layers captured" in out, out
    assert re.search(r"w2\s+linear\s+function\s+in_out", out), out  # torch.addmm(b, x, W): transposed weight
    initial, final = map(float, re.search(r"test loss ([0-9.]+) -> ([0-9.]+)", out).groups())
    assert final < 0.2 * initial, out


def test_transformer_expand_vs_reduce():
    out = run_example("transformer_expand_vs_reduce.py", "--smoke")
    assert "attention.in_proj_weight" in out and "attention.out_proj" in out, out
    rows = dict(re.findall(r"^(expand|reduce)\s+([0-9.]+)\s+[0-9.]+\s+[0-9.]+", out, re.MULTILINE))
    assert set(rows) == {"expand", "reduce"}, out
    assert all(math.isfinite(float(loss)) for loss in rows.values()), out


def test_inspect_graph():
    out = run_example("inspect_graph.py", "--smoke")
    assert "21 layers captured" in out, out
    assert "fxkfac_capture" in out and "tap" in out, out  # the generated code
    assert "40 uncaptured parameters" in out and "BatchNorm2d" in out, out
    assert "agree: True" in out, out
