"""Two CPU processes (gloo, torchrun) equal one process on the concatenated batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).parents[2] / "examples" / "data_parallel.py"


def run(command: list[str], out: Path) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize(("fisher_type", "inverse"), [("type-2", "cholesky"), ("empirical", "eigh")])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path, fisher_type, inverse):
    options = ["--steps", "5", "--fisher-type", fisher_type, "--inverse", inverse]
    single = run(
        [sys.executable, str(EXAMPLE), *options, "--save", str(tmp_path / "one.pt")], tmp_path / "one.pt"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = run([*torchrun, str(EXAMPLE), *options, "--save", str(tmp_path / "two.pt")], tmp_path / "two.pt")
    assert single["world_size"] == 1 and double["world_size"] == 2
    for name, value in single["params"].items():
        torch.testing.assert_close(double["params"][name], value, rtol=1e-6, atol=1e-9, msg=name)
    for layer, factors in single["factors"].items():
        for key in ("A", "B"):
            torch.testing.assert_close(double["factors"][layer][key], factors[key], rtol=1e-6, atol=1e-9)
    # the run trained: parameters moved away from their initialization
    torch.manual_seed(0)
    initial = torch.nn.Sequential(
        torch.nn.Linear(10, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 4),
    ).double()
    moved = [(single["params"][k] - v).abs().max() for k, v in initial.state_dict().items()]
    assert min(moved) > 1e-4
