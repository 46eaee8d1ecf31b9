"""Batch axes of layer inputs (:mod:`fxkfac.passes.probe_batch`), run-time modules, functional_call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxkfac
from fxkfac.factors.datum_rows import datum_major
from fxkfac.layers import BatchAxis
from fxkfac.passes.probe_batch import choose_layout


@pytest.mark.parametrize(
    "layout",
    [BatchAxis(0), BatchAxis(1), BatchAxis(0, inner=3), BatchAxis(0, outer=3), BatchAxis(1, outer=2)],
    ids=str,
)
def test_choose_layout_and_datum_major_recover_the_batch(layout):
    """Datum ``n`` of ``[N, 6, 5]`` laid out by ``layout``: probed back and made datum-major."""
    batch, rows, features = 4, 6, 5
    outer, inner = layout.outer, layout.inner
    # axis `dim` holds (o, n, i) row-major, the remaining rows are positions
    per_datum = torch.arange(rows * features).double().view(rows, features)
    x = torch.stack([per_datum + 100 * n for n in range(batch)])  # [N, rows, D]
    x = x.view(batch, outer, inner, rows // (outer * inner), features).permute(1, 0, 2, 3, 4)
    x = x.reshape(outer * batch * inner, rows // (outer * inner), features)
    if layout.dim == 1:
        x = x.transpose(0, 1)
    expected = datum_major(x, layout).view(batch, -1, features)
    for n in range(batch):
        assert torch.all((expected[n] // 100) == n)
    change = (x // 100 == 0).double()  # a perturbation of datum 0 changes its entries only
    assert choose_layout(change, batch, "linear") == layout


def test_choose_layout_needs_a_dominant_layout():
    assert choose_layout(torch.zeros(4, 3, 2), 4, "linear") is None
    assert choose_layout(torch.ones(4, 3, 2), 4, "linear") is None  # every datum changed
    change = torch.full((4, 3, 2), 0.1)
    change[0] = 1.0  # datum 0 dominates (a training-mode batch norm upstream)
    assert choose_layout(change, 4, "linear") == BatchAxis(0)


class SeqFirst(nn.Module):
    """A Linear on ``[S, N, E]`` (sequence first)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 5, 2)

    def forward(self, x):  # x: [N, S=5, 3]
        h = torch.tanh(self.proj(x.transpose(0, 1)))  # [S, N, 4]
        return self.head(h.transpose(0, 1).flatten(1))


def test_example_inputs_give_the_batch_axis_and_reduce_matches_batch_first():
    torch.manual_seed(0)
    model = SeqFirst().double()
    x, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    kmod = fxkfac.compile(model, example_inputs=(x,))
    assert [use.batch for use in kmod.layer("proj").matches] == [BatchAxis(1)]
    _, cap = kmod(x)
    reduce = cap.factors(nn.CrossEntropyLoss(), y, kfac_approx="reduce")
    x_bar = torch.cat([x, torch.ones(4, 5, 1, dtype=torch.float64)], dim=2).mean(1)
    torch.testing.assert_close(reduce["proj"][0], x_bar.T @ x_bar / 4)
    # without example inputs the layout is unknown: the leading axis (S = 5) is not a
    # multiple of N = 4, and the factor pass says so
    plain = fxkfac.compile(model)
    assert plain.layer("proj").matches[0].batch is None
    _, cap = plain(x)
    with pytest.warns(UserWarning, match="batch layout unknown"):
        cap.factors(nn.CrossEntropyLoss(), y, kfac_approx="reduce")


def test_probe_leaves_batch_norm_statistics_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kmod = fxkfac.compile(model, example_inputs=(torch.randn(6, 3, dtype=torch.float64),))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [layer.matches[0].batch for layer in kmod.layers] == [BatchAxis(0), BatchAxis(0)]


class RuntimeLinear(nn.Module):
    """A parametrized module built in forward: its weight would be a graph constant."""

    def forward(self, x):
        return nn.Linear(3, 2)(x)


def test_runtime_module_with_parameters_is_a_clear_error():
    with pytest.raises(fxkfac.TraceError, match="install it as a submodule"):
        fxkfac.compile(RuntimeLinear())


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(3, 3, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_functional_call_ties_weights_like_torch():
    torch.manual_seed(0)
    module = Tied().double()
    params = {k: v.detach().clone().requires_grad_() for k, v in module.named_parameters()}
    assert sorted(params) == ["a.weight"]

    def fn(p, x):
        return torch.func.functional_call(module, p, (x,))

    x = torch.randn(4, 3, dtype=torch.float64)
    kmod = fxkfac.compile(fn, params=params, example_inputs=(x,))
    assert [(layer.name, len(layer.nodes)) for layer in kmod.layers] == [("a", 2)]
    assert kmod.uncaptured == {}
    torch.testing.assert_close(kmod(x)[0], torch.func.functional_call(module, params, (x,)))


def test_viewed_weight_after_a_transpose_is_not_looked_through():
    """``W.t().reshape(...)`` reorders the entries: not a view of the stored layout."""
    params = {"w": torch.randn(4, 3).requires_grad_()}

    def fn(p, x):
        return F.linear(x, p["w"].t().reshape(4, 3))

    kmod = fxkfac.compile(fn, params=params, example_inputs=(torch.randn(2, 3),))
    assert kmod.layers == [] and "w" in kmod.uncaptured


class SequenceFirst(nn.Module):
    """``[N, S, D] -> [S, N, D]`` before its Linear; records the batch sizes it runs on."""

    def __init__(self, fixed_batch: int | None = None):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.fixed_batch = fixed_batch

    def forward(self, x):
        if self.fixed_batch is not None:  # a model that only runs on one batch size
            x = x.reshape(self.fixed_batch, 5, 3)
        return self.fc(x.transpose(0, 1)).sum(0)


def test_probe_runs_on_a_slice_of_the_example_batch():
    from fxkfac.passes.probe_batch import PROBE_BATCH

    seen = []
    model = SequenceFirst().double()
    model.fc.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    kmod = fxkfac.compile(model, example_inputs=(torch.randn(32, 5, 3, dtype=torch.float64),))
    assert kmod.layers[0].matches[0].batch == BatchAxis(1)
    assert seen and max(seen) <= PROBE_BATCH  # the rewritten graph calls the fc module itself


def test_probe_falls_back_to_the_whole_batch_for_a_fixed_batch_model():
    model = SequenceFirst(fixed_batch=8).double()
    kmod = fxkfac.compile(model, example_inputs=(torch.randn(8, 5, 3, dtype=torch.float64),))
    assert kmod.layers[0].matches[0].batch == BatchAxis(1)


class PositionalBias(nn.Module):
    """A Linear on ``arange(x.shape[1])``: computed from the input's shape, not its values."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Linear(1, 1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):  # [N, 4]
        positions = torch.arange(x.shape[1], dtype=x.dtype)[:, None]
        return self.fc(x) + self.pos(positions)[:, 0] * x.size(0) / x.dim()


def test_layer_fed_only_by_input_shapes_has_no_batch_axis():
    kmod = fxkfac.compile(PositionalBias().double())
    assert [layer.name for layer in kmod.layers] == ["fc"]
    assert "no batch axis" in kmod.uncaptured["pos.weight"]


def test_functional_call_with_missing_parameters_names_them():
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    params = {k: v.detach().clone() for k, v in module.named_parameters() if k.startswith("0.")}

    def fn(p, x):
        return torch.func.functional_call(module, p, (x,))

    with pytest.raises(fxkfac.TraceError, match=r"\['2.weight', '2.bias'\] are not in params"):
        fxkfac.compile(fn, params=params, example_inputs=(torch.randn(5, 4),))
