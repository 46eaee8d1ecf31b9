"""Attention (ViT, Swin), the torch.export path, functional code and user control.

Factors are checked against a hand-annotated reference that uses nothing of fxkfac: the model
runs under a :class:`Tape` that records, for every linear / conv2d op of interest, the op's
input ``x`` and its output ``z`` (a tensor of the autograd graph). The reference then

* backpropagates the type-2 vectors of the cross-entropy loss — the columns of a square root
  ``S_n`` of ``∇²_f c = diag(p_n) − p_n p_nᵀ`` (here from an eigendecomposition, so not the
  library's factorization) — with ``torch.autograd.grad`` w.r.t. every recorded ``z``;
* forms (float64, ``R = 1/N`` for the mean reduction)

  expand:  ``A = R Σ_{n,s} x̃ x̃ᵀ``,  ``B = 1/(N·S) Σ_{n,s,c} g gᵀ``;
  reduce:  ``A = R Σ_n x̄ x̄ᵀ`` (``x̄ = mean_s x̃``),  ``B = 1/N Σ_{n,c} ḡ ḡᵀ`` (``ḡ = Σ_s g``);

  ``x̃`` is the input (conv: the unfolded patch) with a trailing 1 when the op has a bias; a
  weight used by several ops (tied weights) contributes the positions of every use.

How the tape sees the ops: torchvision models run under a ``TorchFunctionMode`` that records
every ``F.linear`` / ``F.conv2d`` whose weight *is* a given parameter (this sees Swin's qkv
and proj weights inside ``shifted_window_attention``); ``nn.MultiheadAttention`` is replaced
for the reference run by attention written out by hand (``F.linear(x, in_proj_weight,
in_proj_bias)`` on ``[N, S, E]``, softmax attention, ``F.linear`` out-projection), checked to
give the module's output. Functional models get a hand-written twin that calls
``tape.linear(name, ...)`` explicitly.
"""

from __future__ import annotations

import inspect
import math
import types
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import fxkfac
from fxkfac.layers import OpMatch
from fxkfac.passes import matchers as patterns

DTYPE = torch.float64
LOSS = nn.CrossEntropyLoss()


@pytest.fixture(autouse=True)
def _float64_one_thread():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(DTYPE)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def labels(batch: int, classes: int, seed: int = 7) -> Tensor:
    return torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the hand-annotated reference


@dataclass
class Use:
    """One op of a layer: input ``x`` (detached), output ``z`` (in the autograd graph)."""

    kind: str  # 'linear' | 'conv2d'
    x: Tensor
    z: Tensor
    bias: bool
    conv: tuple | None = None  # (kernel, stride, padding, dilation) of a conv2d


class Tape:
    """Records ops by layer name; :meth:`linear` / :meth:`conv2d` compute and record."""

    def __init__(self) -> None:
        self.uses: dict[str, list[Use]] = defaultdict(list)

    def linear(self, name: str, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        z = F.linear(x, w, b)
        self.uses[name].append(Use("linear", x.detach(), z, b is not None))
        return z

    def conv2d(self, name: str, x: Tensor, w: Tensor, b: Tensor | None, stride, padding, dilation, groups):
        assert groups == 1, "the reference handles ungrouped convolutions"
        z = F.conv2d(x, w, b, stride, padding, dilation, groups)
        conv = (tuple(w.shape[2:]), stride, padding, dilation)
        self.uses[name].append(Use("conv2d", x.detach(), z, b is not None, conv))
        return z


class RecordOps(TorchFunctionMode):
    """Records every ``F.linear`` / ``F.conv2d`` whose weight is one of ``weights`` (by identity)."""

    def __init__(self, tape: Tape, weights: Mapping[str, Tensor]):
        super().__init__()
        self.tape = tape
        self.names = {id(w): name for name, w in weights.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, F.conv2d) and len(args) >= 2 and id(args[1]) in self.names:
            name = self.names[id(args[1])]
            if func is F.linear:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return self.tape.linear(name, args[0], args[1], bias)
            full = list(args) + [None, 1, 0, 1, 1][len(args) - 2 :]
            x, w, b, stride, padding, dilation, groups = full
            assert not kwargs
            return self.tape.conv2d(name, x, w, b, stride, padding, dilation, groups)
        return func(*args, **kwargs)


def layer_weights(model: nn.Module) -> dict[str, Tensor]:
    """``{layer name: weight}`` of every Linear / Conv2d module and every MHA's in_proj."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            weights[name] = module.weight
        elif isinstance(module, nn.MultiheadAttention):
            weights[f"{name}.in_proj_weight"] = module.in_proj_weight
    return weights


def attention_by_hand(self: nn.MultiheadAttention, query, key, value, need_weights=True, **kwargs):
    """Batch-first self-attention of ``nn.MultiheadAttention``, written out."""
    assert query is key is value and self.batch_first and not self.training
    assert kwargs.get("attn_mask") is None and kwargs.get("key_padding_mask") is None
    batch, seq, embed = query.shape
    heads = self.num_heads
    head_dim = embed // heads
    qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # the in_proj layer, [N, S, 3E]
    q, k, v = (t.reshape(batch, seq, heads, head_dim).transpose(1, 2) for t in qkv.split(embed, dim=-1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, seq, embed)
    out = F.linear(out, self.out_proj.weight, self.out_proj.bias)  # the out_proj layer
    return out, (weights.mean(dim=1) if need_weights else None)


@contextmanager
def hand_written_attention(model: nn.Module) -> Iterator[None]:
    modules = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    for module in modules:
        module.forward = types.MethodType(attention_by_hand, module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def record_model(model: nn.Module, x: Tensor, weights: Mapping[str, Tensor] | None = None):
    """``(prediction, tape)`` of a reference run; checks it reproduces ``model(x)``."""
    tape = Tape()
    with hand_written_attention(model), RecordOps(tape, weights or layer_weights(model)):
        prediction = model(x)
    torch.testing.assert_close(prediction, model(x), rtol=1e-12, atol=1e-12)
    return prediction, tape


def type2_columns(prediction: Tensor) -> Tensor:
    """``[C, N, C]``: columns of ``S_n`` with ``S_n S_nᵀ = diag(p_n) − p_n p_nᵀ`` (eigh)."""
    p = prediction.detach().softmax(dim=-1)
    hessian = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    evals, evecs = torch.linalg.eigh(hessian)
    root = evecs * evals.clamp(min=0).sqrt().unsqueeze(-2)  # [N, C, K]
    return root.permute(2, 0, 1)


def _features(use: Use, batch: int) -> Tensor:
    """``[N, S, D_A]`` input features x̃ of one use.

    Linear inputs ``[M, ..., D_in]`` are read as ``[N, S, D_in]``: the batch is the outermost
    axis, possibly merged with others (Swin's windows: ``M = N · windows``).
    """
    if use.kind == "linear":
        rows = use.x.reshape(batch, -1, use.x.shape[-1])
    else:
        kernel, stride, padding, dilation = use.conv
        rows = F.unfold(use.x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    if use.bias:
        rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
    return rows


def _grad_rows(use: Use, g: Tensor, batch: int) -> Tensor:
    """``[N, S, D_out]`` output gradients of one use (batch outermost, like :func:`_features`)."""
    if use.kind == "linear":
        return g.reshape(batch, -1, g.shape[-1])
    return g.flatten(2).transpose(1, 2)


def reference_factors(prediction: Tensor, tape: Tape, kfac_approx: str = "expand") -> dict:
    """Type-2 factors of every recorded layer for ``CrossEntropyLoss()`` (mean), by hand."""
    batch = prediction.shape[0]
    assert prediction.ndim == 2
    reduction = 1.0 / batch
    uses = [(name, use) for name, layer_uses in tape.uses.items() for use in layer_uses]
    columns = type2_columns(prediction)
    grads = [
        torch.autograd.grad(prediction, [u.z for _, u in uses], column, retain_graph=True, allow_unused=True)
        for column in columns
    ]
    factors = {}
    for name in tape.uses:
        indices = [i for i, (n, _) in enumerate(uses) if n == name]
        feats = [_features(uses[i][1], batch) for i in indices]
        per_vector = [
            [
                _grad_rows(uses[i][1], g[i] if g[i] is not None else torch.zeros_like(uses[i][1].z), batch)
                for i in indices
            ]
            for g in grads
        ]
        if kfac_approx == "expand":
            x = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
            a = reduction * x.T @ x
            g = torch.cat([r.reshape(-1, r.shape[-1]) for rows in per_vector for r in rows])
            b = g.T @ g / sum(f.shape[0] * f.shape[1] for f in feats)
        else:
            x_bar = torch.cat(feats, dim=1).mean(dim=1)
            a = reduction * x_bar.T @ x_bar
            g_bar = torch.cat([sum(r.sum(dim=1) for r in rows) for rows in per_vector])
            b = g_bar.T @ g_bar / batch
        factors[name] = (a.detach(), b.detach())
    return factors


def assert_factors_equal(actual: dict, expected: dict, rtol: float = 1e-10) -> None:
    assert sorted(actual) == sorted(expected)
    for name, pair in expected.items():
        for which, mine, ref in zip("AB", actual[name], pair, strict=True):
            scale = float(ref.abs().max())
            assert scale > 0, f"{name} {which}: the reference is zero, the comparison would be vacuous"
            torch.testing.assert_close(
                mine,
                ref,
                rtol=rtol,
                atol=rtol * scale + 1e-15,
                msg=lambda m, n=name, w=which: f"{n} {w}: {m}",
            )


def fxkfac_factors(kmod, model_or_fn_inputs: tuple, targets: Tensor, **kwargs) -> tuple[Tensor, dict]:
    out, cap = kmod(*model_or_fn_inputs)
    return out, cap.factors(LOSS, targets, fisher_type="type-2", **kwargs)


# ---------------------------------------------------------------------------------------------
# attention: ViT (nn.MultiheadAttention) and Swin (weights passed into a wrapped function)


def small_vit() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    with torch.no_grad():  # torchvision zero-initializes the head: every other B would be 0
        model.heads.head.weight.normal_(0.0, 0.5)
        model.heads.head.bias.normal_(0.0, 0.5)
        model.class_token.normal_(0.0, 0.5)
    return model.to(DTYPE).eval()


def small_swin() -> SwinTransformer:
    torch.manual_seed(0)
    model = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=8,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=[2, 2],  # 4x4 tokens: 4 windows, the second block of stage 1 shifts
        stochastic_depth_prob=0.0,
        num_classes=5,
    )
    with torch.no_grad():  # torchvision's std-0.02 init gives near-uniform attention
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.4)
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.normal_(0.0, 0.5)
    return model.to(DTYPE).eval()


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_vit_factors_equal_reference(tracer, kfac_approx):
    model = small_vit()
    x, y = randn(3, 3, 32, 32, seed=1), labels(3, 5)
    kmod = fxkfac.compile(model, example_inputs=(x,), tracer=tracer)
    assert kmod.tracer == tracer
    in_proj = [f"encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight" for i in range(2)]
    out_proj = [f"encoder.layers.encoder_layer_{i}.self_attention.out_proj" for i in range(2)]
    names = [layer.name for layer in kmod.layers]
    assert set(in_proj + out_proj) <= set(names)
    assert sorted(names) == sorted(layer_weights(model))
    for name in in_proj:
        layer = kmod.layer(name)
        assert (layer.kind, layer.weight, layer.bias) == ("linear", name, name.replace("weight", "bias"))
        assert layer.call_form == ("function" if tracer == "fx" else "aten")
    assert not any("attention" in p for p in kmod.uncaptured)

    out, factors = fxkfac_factors(kmod, (x,), y, kfac_approx=kfac_approx)
    prediction, tape = record_model(model, x)
    torch.testing.assert_close(out, prediction, rtol=1e-12, atol=1e-12)
    assert_factors_equal(factors, reference_factors(prediction, tape, kfac_approx))


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_swin_factors_equal_reference(kfac_approx):
    """reduce: a datum's positions are all its windows' tokens (qkv/proj see ``[N·windows, 4, C]``)."""
    model = small_swin()
    x, y = randn(2, 3, 16, 16, seed=1), labels(2, 5)
    if kfac_approx == "expand":  # (once) tracer="auto" picks export: fx hides qkv/proj
        assert fxkfac.compile(model, example_inputs=(x,)).tracer == "export"
    kmod = fxkfac.compile(model, example_inputs=(x,), tracer="export")
    assert kmod.tracer == "export"
    linear_conv = layer_weights(model)
    assert sorted(layer.name for layer in kmod.layers) == sorted(linear_conv)
    qkv = [name for name in linear_conv if name.endswith(("attn.qkv", "attn.proj"))]
    assert len(qkv) == 8
    assert all(kmod.layer(name).call_form == "aten" for name in qkv)
    assert not any(p.startswith(tuple(qkv)) for p in kmod.uncaptured)

    out, factors = fxkfac_factors(kmod, (x,), y, kfac_approx=kfac_approx)
    prediction, tape = record_model(model, x)
    assert sorted(tape.uses) == sorted(linear_conv)
    torch.testing.assert_close(out, prediction, rtol=1e-12, atol=1e-12)
    assert_factors_equal(factors, reference_factors(prediction, tape, kfac_approx))


# ---------------------------------------------------------------------------------------------
# the torch.export path: shape-dependent control flow fx cannot trace


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc1 = nn.Linear(3 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x):
        if x.dim() == 3:  # an unbatched image
            x = x.unsqueeze(0)
        h = torch.relu(self.conv(x)).flatten(1)
        h = torch.tanh(self.fc1(h))
        if x.shape[0] > 2:
            h = h * 2
        return self.fc2(h)


class BranchFree(nn.Module):
    """``Branchy`` for 4-d inputs of more than 2 images, without the branches (fx-traceable)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc1 = nn.Linear(3 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(h)) * 2)


def test_export_path_for_shape_dependent_control_flow():
    model = Branchy()
    twin = BranchFree()
    twin.load_state_dict(model.state_dict())
    x, y = randn(4, 2, 4, 4, seed=1), labels(4, 4)

    kmod = fxkfac.compile(model, example_inputs=(x,))  # tracer="auto": fx fails, export works
    assert kmod.tracer == "export"
    assert [(layer.name, layer.kind, layer.call_form) for layer in kmod.layers] == [
        ("conv", "conv2d", "aten"),
        ("fc1", "linear", "aten"),
        ("fc2", "linear", "aten"),
    ]
    assert [(layer.weight, layer.bias) for layer in kmod.layers] == [
        (f"{name}.weight", f"{name}.bias") for name in ("conv", "fc1", "fc2")
    ]
    assert kmod.uncaptured == {}
    assert kmod.layer("conv").conv.padding == (1, 1)

    twin_kmod = fxkfac.compile(twin)
    assert twin_kmod.tracer == "fx"
    out, factors = fxkfac_factors(kmod, (x,), y)
    twin_out, twin_factors = fxkfac_factors(twin_kmod, (x,), y)
    assert torch.equal(out, model(x))
    torch.testing.assert_close(out, twin_out, rtol=0, atol=0)
    assert_factors_equal(factors, twin_factors, rtol=1e-13)
    # and both equal the hand-written reference
    prediction, tape = record_model(model, x)
    assert_factors_equal(factors, reference_factors(prediction, tape))
    # the exported graph shares the model's parameters
    with torch.no_grad():
        model.fc2.bias.add_(1.0)
    assert torch.equal(kmod(x)[0], model(x))


def test_untraceable_without_example_inputs_names_line_and_export():
    line = next(
        i for i, text in enumerate(inspect.getsource(Branchy.forward).splitlines()) if "x.dim() == 3" in text
    )
    lineno = inspect.getsourcelines(Branchy.forward)[1] + line
    with pytest.raises(fxkfac.TraceError) as info:
        fxkfac.compile(Branchy())
    message = str(info.value)
    assert f"{__file__}:{lineno}" in message
    assert "if x.dim() == 3:" in message
    assert "tracer='export'" in message and "example_inputs" in message
    assert "leaf_modules" in message
    with pytest.raises(fxkfac.TraceError, match=r"x\.dim"):
        fxkfac.compile(Branchy(), example_inputs=(randn(4, 2, 4, 4, seed=1),), tracer="fx")


# ---------------------------------------------------------------------------------------------
# functional code


def mlp_params(seed: int = 3) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "fc1.weight": (6, 4),
        "fc1.bias": (6,),
        "fc2.weight": (5, 6),
        "fc2.bias": (5,),
        "fc3.weight": (5, 5),
        "fc3.bias": (5,),
        "fc4.weight": (3, 5),
    }
    return {k: (0.7 * torch.randn(*s, generator=g, dtype=DTYPE)).requires_grad_() for k, s in shapes.items()}


def hand_mlp(tape: Tape, p: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """The reference of the functional MLPs below, every layer an annotated ``F.linear``."""
    h = torch.tanh(tape.linear("fc1", x, p["fc1.weight"], p["fc1.bias"]))
    h = torch.tanh(tape.linear("fc2", h, p["fc2.weight"], p["fc2.bias"]))
    h = torch.tanh(tape.linear("fc3", h, p["fc3.weight"], p["fc3.bias"]))
    return tape.linear("fc4", h, p["fc4.weight"])


def hand_reference(fn: Callable, p, *inputs, kfac_approx="expand"):
    tape = Tape()
    prediction = fn(tape, p, *inputs)
    return prediction, reference_factors(prediction, tape, kfac_approx)


def transposed_mlp(p: dict[str, Tensor], x: Tensor) -> Tensor:
    """Weights stored ``[D_out, D_in]``, used transposed: ``W.t()``, ``W.T``, ``W.transpose``."""
    h = torch.tanh(x @ p["fc1.weight"].t() + p["fc1.bias"])
    h = torch.tanh(torch.matmul(h, p["fc2.weight"].T) + p["fc2.bias"])
    h = torch.tanh(torch.addmm(p["fc3.bias"], h, p["fc3.weight"].transpose(0, 1)))
    return torch.mm(h, p["fc4.weight"].permute(1, 0))


def test_functional_transposed_weights_equal_reference():
    p = mlp_params()
    x, y = randn(5, 4, seed=1), labels(5, 3)
    kmod = fxkfac.compile(transposed_mlp, params=p, example_inputs=(x,))
    assert kmod.uncaptured == {}
    assert [(layer.name, layer.call_form, layer.weight_layout) for layer in kmod.layers] == [
        (name, "function", "out_in") for name in ("fc1", "fc2", "fc3", "fc4")
    ]
    out, factors = fxkfac_factors(kmod, (x,), y)
    prediction, expected = hand_reference(hand_mlp, p, x)
    torch.testing.assert_close(out, prediction)
    assert_factors_equal(factors, expected)


def test_functional_call_model_equals_reference():
    """``fn(params, x) = torch.func.functional_call(module, params, (x,))``."""
    torch.manual_seed(4)
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    p = {k: v.detach().clone().requires_grad_() for k, v in module.named_parameters()}
    x, y = randn(5, 4, seed=1), labels(5, 3)

    def fn(params, x):
        return torch.func.functional_call(module, params, (x,))

    def hand(tape, params, x):
        h = torch.tanh(tape.linear("0", x, params["0.weight"], params["0.bias"]))
        return tape.linear("2", h, params["2.weight"], params["2.bias"])

    kmod = fxkfac.compile(fn, params=p, example_inputs=(x,))
    assert [layer.name for layer in kmod.layers] == ["0", "2"]
    assert kmod.uncaptured == {}
    out, factors = fxkfac_factors(kmod, (x,), y)
    prediction, expected = hand_reference(hand, p, x)
    torch.testing.assert_close(out, prediction)
    assert_factors_equal(factors, expected)


VIEWS = {
    # stored flat, viewed to [D_out, D_in] before F.linear
    "linear W.view": lambda w: w.view(6, 4),
    "linear W.reshape": lambda w: w.reshape(6, 4),
    "linear W.flatten().view": lambda w: w.flatten().view(6, 4),
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_functional_viewed_weight_is_captured(view):
    """A weight stored in another shape and viewed to ``[D_out, D_in]`` is still a linear layer."""
    p = mlp_params()
    stored = {**p, "fc1.weight": p["fc1.weight"].detach().reshape(-1).clone().requires_grad_()}
    if view == "linear W.flatten().view":
        stored["fc1.weight"] = p["fc1.weight"].detach().clone().requires_grad_()

    def fn(q, x):
        h = torch.tanh(F.linear(x, VIEWS[view](q["fc1.weight"]), q["fc1.bias"]))
        h = torch.tanh(F.linear(h, q["fc2.weight"], q["fc2.bias"]))
        h = torch.tanh(F.linear(h, q["fc3.weight"], q["fc3.bias"]))
        return F.linear(h, q["fc4.weight"])

    x, y = randn(5, 4, seed=1), labels(5, 3)
    kmod = fxkfac.compile(fn, params=stored, example_inputs=(x,))
    assert kmod.uncaptured == {}, f"{view}: {kmod.uncaptured}"
    assert [layer.name for layer in kmod.layers] == ["fc1", "fc2", "fc3", "fc4"]
    out, factors = fxkfac_factors(kmod, (x,), y)
    prediction, expected = hand_reference(hand_mlp, p, x)
    torch.testing.assert_close(out, prediction)
    assert_factors_equal(factors, expected)


def test_conv_weight_viewed_is_captured():
    """A conv kernel stored as ``[C_out, C_in·k·k]`` and viewed to 4-d (weight standardization style)."""
    g = torch.Generator().manual_seed(5)
    p = {
        "conv.weight": torch.randn(3, 2 * 3 * 3, generator=g).requires_grad_(),
        "conv.bias": torch.randn(3, generator=g).requires_grad_(),
        "fc.weight": torch.randn(4, 3 * 4 * 4, generator=g).requires_grad_(),
    }

    def fn(q, x):
        h = torch.relu(F.conv2d(x, q["conv.weight"].view(3, 2, 3, 3), q["conv.bias"], padding=1))
        return F.linear(h.flatten(1), q["fc.weight"])

    def hand(tape, q, x):
        h = torch.relu(tape.conv2d("conv", x, q["conv.weight"].view(3, 2, 3, 3), q["conv.bias"], 1, 1, 1, 1))
        return tape.linear("fc", h.flatten(1), q["fc.weight"])

    x, y = randn(3, 2, 4, 4, seed=1), labels(3, 4)
    kmod = fxkfac.compile(fn, params=p, example_inputs=(x,))
    assert kmod.uncaptured == {}, kmod.uncaptured
    out, factors = fxkfac_factors(kmod, (x,), y)
    prediction, expected = hand_reference(hand, p, x)
    torch.testing.assert_close(out, prediction)
    assert_factors_equal(factors, expected)


class UnrolledRNN(nn.Module):
    """Tied weights: ``inp`` is applied at all 3 steps, ``rec`` at the last 2."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.rec = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: [N, T=3, 3]
        h = torch.tanh(self.inp(x[:, 0]))
        for t in range(1, 3):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.head(h)


def test_tied_weights_equal_reference_with_uses_as_positions():
    model = UnrolledRNN().to(DTYPE)
    x, y = randn(4, 3, 3, seed=1), labels(4, 3)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    assert [(layer.name, len(layer.nodes)) for layer in kmod.layers] == [("inp", 3), ("rec", 2), ("head", 1)]
    assert kmod.layer("inp").tied and not kmod.layer("head").tied
    assert kmod.uncaptured == {}
    out, factors = fxkfac_factors(kmod, (x,), y)
    prediction, tape = record_model(model, x)
    assert [len(tape.uses[name]) for name in ("inp", "rec", "head")] == [3, 2, 1]
    torch.testing.assert_close(out, prediction)
    assert_factors_equal(factors, reference_factors(prediction, tape))


def test_tied_functional_transposed_uses_equal_reference():
    """One weight used by two ops, spelled ``x1 @ W.t() + b`` and ``F.linear(x2, W.T.T, b)``."""
    g = torch.Generator().manual_seed(6)
    p = {
        "w": torch.randn(4, 3, generator=g).requires_grad_(),
        "b": torch.randn(4, generator=g).requires_grad_(),
        "head": torch.randn(3, 8, generator=g).requires_grad_(),
    }

    def fn(q, x1, x2):
        h1 = torch.tanh(x1 @ q["w"].t() + q["b"])
        h2 = torch.tanh(F.linear(x2, q["w"].T.T, q["b"]))
        return F.linear(torch.cat([h1, h2], dim=1), q["head"])

    def hand(tape, q, x1, x2):
        h1 = torch.tanh(tape.linear("w", x1, q["w"], q["b"]))
        h2 = torch.tanh(tape.linear("w", x2, q["w"], q["b"]))
        return tape.linear("head", torch.cat([h1, h2], dim=1), q["head"])

    x1, x2, y = randn(5, 3, seed=1), randn(5, 3, seed=2), labels(5, 3)
    kmod = fxkfac.compile(fn, params=p, example_inputs=(x1, x2))
    assert kmod.uncaptured == {}
    assert kmod.layer("w").nodes and len(kmod.layer("w").nodes) == 2
    out, factors = fxkfac_factors(kmod, (x1, x2), y)
    prediction, expected = hand_reference(hand, p, x1, x2)
    torch.testing.assert_close(out, prediction)
    assert_factors_equal(factors, expected)


def test_tied_encoder_decoder_layouts_are_explained():
    """``x @ Wᵀ`` and ``h @ W`` (a tied autoencoder) need different factor pairs: uncaptured, said why."""
    g = torch.Generator().manual_seed(6)
    p = {"w": torch.randn(2, 4, generator=g).requires_grad_()}

    def fn(q, x):
        return torch.tanh(x @ q["w"].t()) @ q["w"]

    kmod = fxkfac.compile(fn, params=p, example_inputs=(randn(3, 4, seed=1),))
    assert kmod.layers == []
    assert "tied weight" in kmod.uncaptured["w"] and "weight_layout" in kmod.uncaptured["w"]


class TableBias(nn.Module):
    """A Linear applied to a batch-independent buffer, its output broadcast over the batch (the
    pattern of swin_v2's ``cpb_mlp``, which maps a relative-coordinate table to attention bias)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(1, 3, 2))
        self.cpb = nn.Linear(2, 4)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(12, 3)

    def forward(self, x):  # x: [N, 3, 4]
        h = torch.tanh(self.fc(x) + self.cpb(self.table))
        return self.head(h.flatten(1))


def test_batch_independent_linear_is_exact_or_explained():
    """Either ``cpb`` is listed in ``uncaptured`` (its input carries no batch axis), or its factors
    follow the definition with the broadcast output as one copy per datum: ``A = R Σ_n Σ_s x̃ x̃ᵀ``
    (``N`` times the table's rows) and ``B`` from per-datum output gradients (no cross-datum terms)."""
    torch.manual_seed(9)
    model = TableBias()
    x, y = randn(4, 3, 4, seed=1), labels(4, 3)
    kmod = fxkfac.compile(model)
    out, factors = fxkfac_factors(kmod, (x,), y)
    if "cpb.weight" in kmod.uncaptured:
        assert "cpb" not in factors and "batch" in kmod.uncaptured["cpb.weight"]
        return
    batch = x.shape[0]
    z = model.cpb(model.table)
    per_datum = z.expand(batch, -1, -1)  # [N, 3, 4]: datum n sees its own copy
    prediction = model.head(torch.tanh(model.fc(x) + per_datum).flatten(1))
    torch.testing.assert_close(out, prediction)
    grads = [
        torch.autograd.grad(prediction, per_datum, c, retain_graph=True)[0] for c in type2_columns(prediction)
    ]
    g = torch.cat([grad.reshape(-1, 4) for grad in grads])
    rows = torch.cat([model.table.reshape(3, 2), torch.ones(3, 1)], dim=1)
    a = (1.0 / batch) * batch * rows.T @ rows
    b = g.T @ g / (batch * 3)
    assert_factors_equal({"cpb": factors["cpb"]}, {"cpb": (a, b)})


class RuntimeSequential(nn.Module):
    """Installed Linear modules chained in an ``nn.Sequential`` built in every forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return nn.Sequential(self.a, nn.Tanh(), self.b)(x)


def test_runtime_sequential_equals_reference():
    model = RuntimeSequential().to(DTYPE)
    x, y = randn(5, 4, seed=1), labels(5, 3)
    kmod = fxkfac.compile(model, example_inputs=(x,))
    assert [layer.name for layer in kmod.layers] == ["a", "b"]
    assert kmod.uncaptured == {}
    out, factors = fxkfac_factors(kmod, (x,), y)
    prediction, tape = record_model(model, x)
    torch.testing.assert_close(out, prediction)
    assert_factors_equal(factors, reference_factors(prediction, tape))


def test_runtime_sequential_traces_with_fx():
    """The Sequential only chains modules installed on the model: symbolic tracing suffices."""
    kmod = fxkfac.compile(RuntimeSequential().to(DTYPE))
    assert kmod.tracer == "fx"
    assert [(layer.name, layer.call_form) for layer in kmod.layers] == [("a", "module"), ("b", "module")]


# ---------------------------------------------------------------------------------------------
# control: user leaf modules, custom capture rules


class Gate(nn.Module):
    """Data-dependent control flow: neither fx nor torch.export can trace it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, h):
        if h.sum() > 0:
            return torch.tanh(self.lin(h))
        return self.lin(h)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(4, 6)
        self.gate = Gate()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.gate(torch.tanh(self.fc_in(x))))


@pytest.mark.parametrize("leaf", [Gate, "gate"], ids=["by_type", "by_name"])
def test_user_leaf_module(leaf):
    model = Gated().to(DTYPE)
    x, y = randn(5, 4, seed=1), labels(5, 3)
    with pytest.raises(fxkfac.TraceError, match="leaf_modules"):
        fxkfac.compile(model)
    kmod = fxkfac.compile(model, leaf_modules=[leaf])
    assert [layer.name for layer in kmod.layers] == ["fc_in", "head"]
    assert sorted(kmod.uncaptured) == ["gate.lin.bias", "gate.lin.weight"]
    for reason in kmod.uncaptured.values():
        assert "Gate" in reason and "module gate" in reason
    out, factors = fxkfac_factors(kmod, (x,), y)
    weights = {"fc_in": model.fc_in.weight, "head": model.head.weight}
    prediction, tape = record_model(model, x, weights)
    torch.testing.assert_close(out, prediction)
    assert_factors_equal(factors, reference_factors(prediction, tape))


def test_user_leaf_attention_lists_its_projections():
    model = small_vit()
    kmod = fxkfac.compile(model, leaf_modules=[nn.MultiheadAttention])
    attention = [p for p in kmod.uncaptured if ".self_attention." in p]
    assert sorted(attention) == sorted(
        f"encoder.layers.encoder_layer_{i}.self_attention.{p}"
        for i in range(2)
        for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    )
    assert all("MultiheadAttention" in kmod.uncaptured[p] for p in attention)
    assert len(kmod.layers) == 6  # conv_proj, 2 x (mlp.0, mlp.3), heads.head


class MyDense(nn.Module):
    """A user linear layer computed with einsum."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(0.5 * torch.randn(d_out, d_in))
        self.bias = nn.Parameter(0.5 * torch.randn(d_out))

    def forward(self, x):
        return torch.einsum("ni,oi->no", x, self.weight) + self.bias


class DenseNet(nn.Module):
    def __init__(self, layer: Callable[[int, int], nn.Module]):
        super().__init__()
        self.dense = layer(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.dense(x)))


def match_my_dense(node: fx.Node, module: nn.Module, lookup) -> OpMatch:
    return OpMatch(
        kind="linear",
        node=node,
        input=node.args[0],
        weight=f"{node.target}.weight",
        bias=f"{node.target}.bias",
        call_form="module",
        op_nodes=(node,),
    )


def match_einsum_linear(node: fx.Node, lookup) -> OpMatch | None:
    """``torch.einsum("ni,oi->no", x, W)`` with a parameter ``W`` (no bias)."""
    if len(node.args) != 3 or node.args[0] != "ni,oi->no":
        return None
    weight = lookup.resolve(node.args[2])
    if weight is None or weight.transposed or not isinstance(node.args[1], fx.Node):
        return None
    return OpMatch(
        kind="linear",
        node=node,
        input=node.args[1],
        weight=weight.name,
        bias=None,
        call_form="function",
        op_nodes=(node,),
    )


@pytest.fixture
def clean_registry():
    modules, functions = dict(patterns.MODULE_MATCHERS), dict(patterns.FUNCTION_MATCHERS)
    yield
    patterns.MODULE_MATCHERS.pop(MyDense, None)
    patterns.FUNCTION_MATCHERS.pop(torch.einsum, None)
    assert modules == patterns.MODULE_MATCHERS
    assert functions == patterns.FUNCTION_MATCHERS


def twin_factors(x: Tensor, y: Tensor, model: DenseNet) -> dict:
    twin = DenseNet(nn.Linear).to(DTYPE)
    with torch.no_grad():
        twin.dense.weight.copy_(model.dense.weight)
        twin.dense.bias.copy_(model.dense.bias)
        twin.head.load_state_dict(model.head.state_dict())
    return fxkfac_factors(fxkfac.compile(twin), (x,), y)[1]


def test_custom_module_matcher(clean_registry):
    torch.manual_seed(8)
    model = DenseNet(MyDense).to(DTYPE)
    x, y = randn(5, 4, seed=1), labels(5, 3)
    # without a rule: traced into, the einsum is not understood and says so
    plain = fxkfac.compile(model)
    assert [layer.name for layer in plain.layers] == ["head"]
    assert "einsum" in plain.uncaptured["dense.weight"]
    # as a leaf without a rule: listed with the module type
    assert "MyDense" in fxkfac.compile(model, leaf_modules=[MyDense]).uncaptured["dense.weight"]

    fxkfac.register_module_matcher(MyDense, match_my_dense)
    kmod = fxkfac.compile(model, leaf_modules=[MyDense])
    assert [(layer.name, layer.kind, layer.call_form) for layer in kmod.layers] == [
        ("dense", "linear", "module"),
        ("head", "linear", "module"),
    ]
    assert kmod.uncaptured == {}
    out, factors = fxkfac_factors(kmod, (x,), y)
    assert torch.equal(out, model(x))
    assert_factors_equal(factors, twin_factors(x, y, model), rtol=1e-12)


def test_custom_function_matcher(clean_registry):
    torch.manual_seed(8)
    model = DenseNet(MyDense).to(DTYPE)
    x, y = randn(5, 4, seed=1), labels(5, 3)
    fxkfac.register_function_matcher(torch.einsum, match_einsum_linear)
    kmod = fxkfac.compile(model)  # traced into MyDense: the einsum node is matched
    assert [(layer.name, layer.call_form) for layer in kmod.layers] == [
        ("dense", "function"),
        ("head", "module"),
    ]
    assert list(kmod.uncaptured) == ["dense.bias"]  # added by a separate node: no fused-bias rule
    out, factors = fxkfac_factors(kmod, (x,), y)
    assert torch.equal(out, model(x))

    def hand(tape, _, x):
        h = torch.tanh(tape.linear("dense", x, model.dense.weight) + model.dense.bias)
        return tape.linear("head", h, model.head.weight, model.head.bias)

    prediction, expected = hand_reference(hand, None, x)
    torch.testing.assert_close(out, prediction)
    assert_factors_equal(factors, expected)
