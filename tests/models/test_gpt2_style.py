"""A GPT-2-style block: Hugging Face's ``Conv1D`` (``addmm`` with a ``[D_in, D_out]`` weight on
inputs flattened to ``[N·S, D]``) and an attention whose sequence length decides control flow.

fx cannot trace it (the error names the line); ``tracer="auto"`` falls back to
``torch.export``, whose ``aten.addmm`` layers are captured with the right orientation, and
factors equal a hand-annotated reference for ``expand`` and for ``reduce`` (which needs the
batch-axis probe: the op sees ``[N·S, D]``, datum-major).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import fxkfac

from .test_attention_export_functional import (
    DTYPE,
    Tape,
    assert_factors_equal,
    fxkfac_factors,
    labels,
    randn,
    reference_factors,
)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's linear layer: ``x @ W + b`` by ``addmm``, ``W: [D_in, D_out]``."""

    def __init__(self, d_out: int, d_in: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * 0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.5)

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.weight.shape[1],)  # noqa: RUF005 (Hugging Face's own code)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Block(nn.Module):
    def __init__(self, embed: int = 6, heads: int = 2, classes: int = 3):
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(3 * embed, embed)
        self.c_proj = Conv1D(embed, embed)
        self.c_fc = Conv1D(2 * embed, embed)
        self.head = nn.Linear(embed, classes)

    def forward(self, x: Tensor, tape: Tape | None = None) -> Tensor:  # x: [N, S, E]
        def conv1d(name: str, h: Tensor) -> Tensor:
            layer = getattr(self, name)
            if tape is None:
                return layer(h)
            return tape.linear(name, h, layer.weight.T, layer.bias)  # the same map, annotated

        batch, seq, embed = x.shape
        q, k, v = conv1d("c_attn", x).split(embed, dim=-1)
        q, k, v = (t.reshape(batch, seq, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if seq > 1:  # shape-dependent control flow, as in Hugging Face's attention code
            mask = torch.ones(seq, seq, dtype=torch.bool).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
        h = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, embed)
        h = x + conv1d("c_proj", h)
        h = h + torch.tanh(conv1d("c_fc", h)).reshape(batch, seq, embed, 2).sum(-1)
        if tape is None:
            return self.head(h.mean(1))
        return tape.linear("head", h.mean(1), self.head.weight, self.head.bias)


def test_fx_cannot_trace_the_shape_dependent_attention_and_says_where():
    with pytest.raises(fxkfac.TraceError, match=r"if seq > 1.*tracer='export'"):
        fxkfac.compile(Block().to(DTYPE), tracer="fx")


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_gpt2_style_block_factors_equal_reference_through_export(kfac_approx):
    torch.manual_seed(0)
    model = Block().to(DTYPE)
    x, y = randn(4, 5, 6, seed=1), labels(4, 3)
    kmod = fxkfac.compile(model, example_inputs=(x,))  # tracer="auto": fx fails, export runs
    assert kmod.tracer == "export" and kmod.uncaptured == {}
    assert sorted(layer.name for layer in kmod.layers) == ["c_attn", "c_fc", "c_proj", "head"]
    for name in ("c_attn", "c_proj", "c_fc"):
        assert kmod.layer(name).weight_layout == "in_out", name
    out, factors = fxkfac_factors(kmod, (x,), y, kfac_approx=kfac_approx)
    tape = Tape()
    prediction = model(x, tape)
    torch.testing.assert_close(out, prediction)
    assert_factors_equal(factors, reference_factors(prediction, tape, kfac_approx))
