"""``torch.compile`` of the compiled module: same factors, same K-FAC steps.

``aot_eager`` exercises dynamo's graph capture and AOT autograd without a C++ compiler run
(inductor works too, see docs/benchmarks.md, but costs ~20 s of compilation here).
"""

import torch
from torch import nn

import fxkfac


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def test_factors_of_the_torch_compiled_module_equal_eager():
    x, y = data()
    kmod = fxkfac.compile(make_model(), example_inputs=(x,))
    _, cap = kmod(x)
    expected = cap.factors(nn.CrossEntropyLoss(), y, fisher_type="type-2")
    _, cap = torch.compile(kmod, backend="aot_eager")(x)
    factors = cap.factors(nn.CrossEntropyLoss(), y, fisher_type="type-2")
    assert sorted(factors) == sorted(expected) == ["0", "3"]
    for name, (a, b) in expected.items():
        torch.testing.assert_close(factors[name][0], a)
        torch.testing.assert_close(factors[name][1], b)


def test_kfac_steps_through_a_torch_compiled_module_equal_eager():
    x, y = data()
    final = []
    for compiled in (False, True):
        model, loss_func = make_model(), nn.CrossEntropyLoss()
        kmod = fxkfac.compile(model, example_inputs=(x,))
        opt = fxkfac.KFAC(kmod, loss_func, lr=0.1, damping=1e-2, fisher_type="type-2", inverse_every=1)
        runner = torch.compile(kmod, backend="aot_eager") if compiled else kmod
        for _ in range(3):
            out, cap = runner(x)
            loss = loss_func(out, y)
            opt.zero_grad()
            loss.backward()
            assert opt.step(cap)["factors_updated"]
        final.append([p.detach().clone() for p in model.parameters()])
    for eager, compiled in zip(*final, strict=True):
        torch.testing.assert_close(compiled, eager)
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(final[0], make_model().parameters(), strict=True))
