"""K-FAC for a functional model ``fn(params: dict, x)``: no ``nn.Module`` anywhere.

The model is a plain function of a parameter dict and an input, written with three different
call forms for its three layers — ``x @ W.T + b``, ``torch.addmm(b, x, W)`` (a weight stored
transposed, ``[D_in, D_out]``) and ``F.linear(x, W, b)``. ``fxkfac.compile(fn, params=...,
example_inputs=...)`` traces it with torch.fx, finds all three as linear layers, and returns a
module whose forward gives ``(outputs, capture)``; ``fxkfac.KFAC`` then updates the tensors of
the dict in place.

The task is synthetic regression with ``nn.MSELoss``: ``y = teacher(x) + noise`` with a random
two-layer tanh teacher (8 inputs, 2 outputs). The script prints the captured layers (name, kind,
call form, weight layout, weight shape, factor sizes) and the training and held-out loss going
down.

Run::

    python examples/functional_model.py            # 300 steps
    python examples/functional_model.py --smoke    # 30 steps
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fxkfac

D_IN, HIDDEN, D_OUT = 8, 64, 2


def mlp(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """A 3-layer tanh MLP ``[N, 8] → [N, 2]`` written in three call forms."""
    h = torch.tanh(x @ params["w1"].T + params["b1"])  # w1: [64, 8]   (out, in)
    h = torch.tanh(torch.addmm(params["b2"], h, params["w2"]))  # w2: [64, 64]  (in, out)
    return F.linear(h, params["w3"], params["b3"])  # w3: [2, 64]   (out, in)


def init_params(seed: int) -> dict[str, Tensor]:
    """LeCun-normal weights, zero biases, all leaf tensors with ``requires_grad``."""
    generator = torch.Generator().manual_seed(seed)

    def weight(*shape: int, fan_in: int) -> Tensor:
        return (torch.randn(*shape, generator=generator) / fan_in**0.5).requires_grad_()

    return {
        "w1": weight(HIDDEN, D_IN, fan_in=D_IN),
        "b1": torch.zeros(HIDDEN, requires_grad=True),
        "w2": weight(HIDDEN, HIDDEN, fan_in=HIDDEN),
        "b2": torch.zeros(HIDDEN, requires_grad=True),
        "w3": weight(D_OUT, HIDDEN, fan_in=HIDDEN),
        "b3": torch.zeros(D_OUT, requires_grad=True),
    }


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``x ~ N(0, I)`` in 8 dimensions, ``y = 2·tanh(x U) V + 0.05·noise`` (fixed random teacher)."""
    teacher = torch.Generator().manual_seed(1234)
    U, V = torch.randn(D_IN, 16, generator=teacher), torch.randn(16, D_OUT, generator=teacher) / 4
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=generator)
    y = 2 * torch.tanh(x @ U) @ V + 0.05 * torch.randn(n, D_OUT, generator=generator)
    return x, y


def main(argv: list[str] | None = None) -> None:
    """Compile the function, show the layers, train with K-FAC, print the loss."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="30 steps")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (a tiny model: 1 is fastest)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 30
    torch.set_num_threads(args.threads)
    x_train, y_train = make_data(4096, seed=args.seed)
    x_test, y_test = make_data(1024, seed=args.seed + 1)
    params = init_params(args.seed)

    kmod = fxkfac.compile(mlp, params=params, example_inputs=(x_train[:2],))
    print(
        f"compiled {mlp.__name__}(params, x) with tracer {kmod.tracer!r}: {len(kmod.layers)} layers captured"
    )
    print(
        f"  {'layer':<6} {'kind':<7} {'call form':<9} {'weight layout':<13} {'weight':<8} "
        f"{'A':>3} {'B':>3}  node"
    )
    for layer in kmod.layers:
        shape = "x".join(map(str, layer.weight_shape))
        print(
            f"  {layer.name:<6} {layer.kind:<7} {layer.call_form:<9} {layer.weight_layout:<13} {shape:<8} "
            f"{layer.input_factor_dim:>3} {layer.output_factor_dim:>3}  {layer.node} (bias {layer.bias})"
        )
    print(f"uncaptured parameters: {kmod.uncaptured or 'none'}")

    loss_func = nn.MSELoss()
    optimizer = fxkfac.KFAC(
        kmod, loss_func, lr=args.lr, damping=args.damping, momentum=0.5, fisher_type="type-2", inverse_every=1
    )
    with torch.no_grad():
        initial = float(loss_func(mlp(params, x_test), y_test))
    print(f"step    0  test loss {initial:.4f}")
    batches = torch.Generator().manual_seed(args.seed)
    log_every = max(1, args.steps // 10)
    for step in range(1, args.steps + 1):
        index = torch.randint(len(x_train), (args.batch_size,), generator=batches)
        out, cap = kmod(x_train[index])
        loss = loss_func(out, y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(cap, loss=loss)
        if step % log_every == 0 or step == args.steps:
            with torch.no_grad():
                test_loss = float(loss_func(mlp(params, x_test), y_test))
            print(f"step {step:>4}  train loss {loss.item():.4f}  test loss {test_loss:.4f}")
    print(f"test loss {initial:.4f} -> {test_loss:.4f} ({initial / test_loss:.1f}x lower)")


if __name__ == "__main__":
    main()
