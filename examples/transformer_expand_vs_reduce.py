"""K-FAC on a small transformer: the ``expand`` and ``reduce`` approximations side by side.

Layers applied to sequences ``[N, S, D]`` share their weight over the ``S`` positions. K-FAC
has two ways to build the Kronecker factors of such a layer (Eschenhagen et al., 2023; see
docs/concepts.md):

* ``kfac_approx="expand"`` treats positions like extra data: ``A`` sums ``x̃ x̃ᵀ`` over all
  ``N·S`` positions and ``B`` averages the output gradients over them;
* ``kfac_approx="reduce"`` first averages the inputs (and sums the output gradients) over the
  positions, so the factors are built from ``N`` vectors — cheaper, and exact when the network
  averages over positions before the loss, as this one does (mean pooling).

The model: a token embedding ``nn.Linear``, one pre-norm transformer block (``nn.MultiheadAttention``
self-attention and a GELU MLP, residual connections, ``nn.LayerNorm``), mean pooling over the
sequence and a linear classification head. fxkfac captures every ``nn.Linear`` and the
attention's input and output projections; the LayerNorm parameters are not K-FAC layers and
take Adam steps (``uncaptured_update="adam"``). Without KL-clipping (``--kl-clip 0``) K-FAC
steps on this model can grow until training diverges; the default clip keeps them in check.

The task ("marked token"): each sequence has ``S = 32`` (``--seq-len``) noisy one-hot tokens
from a vocabulary of 8 and one position carrying a marker flag; the label is the token at the
marked position. Mean pooling alone cannot solve it — attention must move the marked token's
information to every position first.

Both runs start from the same initialization and see the same batches. The script prints the
captured layers, the training loss and test accuracy of both runs during training, and a final
table with the time per step of each (median; also the part spent in ``opt.step`` and the ratio
to a plain forward+backward without K-FAC).

Run::

    python examples/transformer_expand_vs_reduce.py            # 300 steps, batch 64
    python examples/transformer_expand_vs_reduce.py --smoke    # 8 steps (seconds)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fxkfac

VOCAB = 8
D_IN = VOCAB + 1  # one-hot token and the marker flag


class TinyTransformer(nn.Module):
    """Embedding, one pre-norm transformer block, mean pooling, linear head."""

    def __init__(self, d_model: int = 64, heads: int = 4, classes: int = VOCAB):
        super().__init__()
        self.embed = nn.Linear(D_IN, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp_in = nn.Linear(d_model, 2 * d_model)
        self.mlp_out = nn.Linear(2 * d_model, d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [N, S, D_IN]`` → logits ``[N, classes]``."""
        h = self.embed(x)
        z = self.norm1(h)
        h = h + self.attention(z, z, z, need_weights=False)[0]
        h = h + self.mlp_out(F.gelu(self.mlp_in(self.norm2(h))))
        return self.head(h.mean(dim=1))


def make_batch(n: int, seq_len: int, generator: torch.Generator, noise: float = 0.3) -> tuple[Tensor, Tensor]:
    """``n`` marked-token sequences ``[n, seq_len, D_IN]`` and their labels ``[n]``."""
    tokens = torch.randint(VOCAB, (n, seq_len), generator=generator)
    marked = torch.randint(seq_len, (n,), generator=generator)
    x = F.one_hot(tokens, VOCAB).float()
    flag = F.one_hot(marked, seq_len).float().unsqueeze(-1)
    x = torch.cat([x, flag], dim=-1) + noise * torch.randn(n, seq_len, D_IN, generator=generator)
    return x, tokens[torch.arange(n), marked]


def main(argv: list[str] | None = None) -> None:
    """Train the same model with expand and reduce K-FAC; print losses, accuracies, timings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="8 steps, 256 test sequences")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=32, help="sequence length S")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--damping", type=float, default=0.03)
    parser.add_argument("--kl-clip", type=float, default=1e-2, help="KL-clipping threshold (0: off)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (a tiny model: 1 is fastest)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 8
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    base = TinyTransformer()
    x_test, y_test = make_batch(
        256 if args.smoke else 1024, args.seq_len, torch.Generator().manual_seed(args.seed + 1)
    )
    approximations = ("expand", "reduce")
    runs = {}
    for approx in approximations:
        model = copy.deepcopy(base)
        kmod = fxkfac.compile(model, example_inputs=(x_test[:2],))
        optimizer = fxkfac.KFAC(
            kmod,
            nn.CrossEntropyLoss(),
            lr=args.lr,
            damping=args.damping,
            momentum=0.5,
            kl_clip=args.kl_clip or None,
            kfac_approx=approx,
            inverse_every=5,
            factor_decay=0.95,
            uncaptured_update="adam",
            seed=args.seed,
        )
        runs[approx] = {
            "model": model,
            "kmod": kmod,
            "opt": optimizer,
            "step": [],
            "opt_step": [],
            "loss": [],
        }
    kmod = runs["expand"]["kmod"]
    print(f"TinyTransformer on marked-token sequences [N, {args.seq_len}, {D_IN}], batch {args.batch_size}")
    print(f"captured layers ({len(kmod.layers)}):")
    for layer in kmod.layers:
        shape = str(tuple(layer.weight_shape))
        print(
            f"  {layer.name:<25} {layer.kind:<6} {layer.call_form:<8} weight {shape:<9} "
            f"A {layer.input_factor_dim:>3}  B {layer.output_factor_dim:>3}"
        )
    print(f"uncaptured (Adam steps): {', '.join(kmod.uncaptured)}")

    loss_func = nn.CrossEntropyLoss()
    batches = torch.Generator().manual_seed(args.seed)
    log_every = max(2, args.steps // 6)
    print(f"{'step':>5} | {'expand: loss':>12} {'test acc':>8} | {'reduce: loss':>12} {'test acc':>8}")
    for step in range(1, args.steps + 1):
        x, y = make_batch(args.batch_size, args.seq_len, batches)
        row = []
        for approx in approximations:
            run = runs[approx]
            start = time.perf_counter()
            out, cap = run["kmod"](x)
            loss = loss_func(out, y)
            run["opt"].zero_grad()
            loss.backward()
            before_step = time.perf_counter()
            run["opt"].step(cap, loss=loss)
            end = time.perf_counter()
            run["step"].append(end - start)
            run["opt_step"].append(end - before_step)
            run["loss"].append(loss.item())
            if step % log_every == 0 or step == args.steps:
                with torch.no_grad():
                    run["accuracy"] = float((run["model"](x_test).argmax(1) == y_test).float().mean())
                row.append(f"{loss.item():>12.4f} {run['accuracy']:>8.3f}")
        if row:
            print(f"{step:>5} | {row[0]} | {row[1]}")

    model, x, y = runs["expand"]["model"], *make_batch(args.batch_size, args.seq_len, batches)
    plain = []
    for _ in range(5):
        start = time.perf_counter()
        model.zero_grad()
        loss_func(model(x), y).backward()
        plain.append(time.perf_counter() - start)
    plain_ms = 1000 * statistics.median(plain)
    print(
        f"{'approx':<7} {'final loss':>10} {'test acc':>8} {'ms/step':>8} {'opt.step ms':>11} "
        f"{'K-FAC overhead':>14}"
    )
    for approx in approximations:
        run = runs[approx]
        step_ms = 1000 * statistics.median(run["step"][1:] or run["step"])  # step 1 also inverts
        opt_ms = 1000 * statistics.median(run["opt_step"][1:] or run["opt_step"])
        print(
            f"{approx:<7} {statistics.mean(run['loss'][-10:]):>10.4f} {run['accuracy']:>8.3f} "
            f"{step_ms:>8.2f} {opt_ms:>11.2f} {step_ms / plain_ms:>13.1f}x"
        )
    print(
        f"(median over steps; a plain forward+backward without K-FAC takes {plain_ms:.2f} ms; "
        "the gradient factors are built inside loss.backward(), the rest in opt.step)"
    )


if __name__ == "__main__":
    main()
