"""Drive the command line as a user would: subprocesses, exit codes, files written."""

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fxkfac", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_inspect_torchvision_model_writes_graph(tmp_path):
    graph = tmp_path / "resnet.graphml"
    result = run("inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--graph", str(graph))
    assert result.returncode == 0, result.stderr
    assert "layer4.1.conv2" in result.stdout and "21 layers" in result.stdout
    assert "batch_norm2d" in result.stdout
    import networkx as nx

    loaded = nx.read_graphml(graph)
    assert sum(data["role"] == "tap" for _, data in loaded.nodes(data=True)) == 21


def test_inspect_file_model_with_code_and_layer_view(tmp_path):
    source = tmp_path / "mymodel.py"
    source.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Net(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = nn.Linear(8, 4)
                    self.w = nn.Parameter(torch.randn(3, 4))

                def forward(self, x):
                    return torch.tanh(self.fc(x)) @ self.w.T
            """
        )
    )
    dot = tmp_path / "net.dot"
    result = run(
        "inspect", f"{source}:Net", "--input-shape", "2,8", "--code", "--layer", "w", "--graph", str(dot)
    )
    assert result.returncode == 0, result.stderr
    assert "fc" in result.stdout and "after the rewrite" in result.stdout and "tap" in result.stdout
    assert dot.read_text().startswith('digraph "Net"')


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("inspect", "nonsense"), "is not of the form"),
        (("inspect", "torchvision:no_such_model"), "torchvision has no model"),
        (("inspect", "torchvision:resnet18", "--input-shape", "1,x"), "comma-separated integers"),
        (("inspect", "missing_file.py:Net"), "no such file"),
        (("inspect", "torchvision:resnet18", "--graph", "out.png"), ".graphml or .dot"),
        (("inspect", "torchvision:resnet18", "--layer", "nope"), "no such captured layer"),
        (("demo", "--steps", "0"), "--steps must be at least 1"),
        (("demo", "--methods", "Nope"), "unknown method"),
    ],
)
def test_bad_arguments_give_one_clear_line(args, message, capsys):
    from fxkfac.cli import main

    assert main(list(args)) != 0
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("fxkfac: error:") and message in lines[0]


def test_bad_argument_in_a_subprocess_exits_nonzero_with_one_line():
    result = run("inspect", "torchvision:no_such_model")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "torchvision has no model" in result.stderr


def test_debug_shows_traceback():
    result = run("--debug", "inspect", "nonsense")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_demo_writes_plots_and_json(tmp_path):
    result = run("demo", "--steps", "12", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("loss_accuracy.png", "kfac_diagnostics.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    results = json.loads((tmp_path / "results.json").read_text())
    names = [run["name"] for run in results["runs"]]
    assert names == ["SGD", "Adam", "K-FAC", "K-FAC + NGD-T"]
    for entry in results["runs"]:
        assert len(entry["train_loss"]) == 12
        assert entry["test_accuracy"][-1] > 0.1
    ngdt = results["runs"][3]
    assert all(q > 0 for q in ngdt["q_pred"]) and len(ngdt["eta"]) == 12
    assert "Results" in result.stdout
