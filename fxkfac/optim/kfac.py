"""``fxkfac.KFAC``: a ``torch.optim.Optimizer`` that takes K-FAC steps.

::

    kmod = fxkfac.compile(model, example_inputs=(x0,))
    opt = fxkfac.KFAC(kmod, loss_func=loss_fn, lr=0.1, damping=1e-3)
    for x, y in data:
        out, cap = kmod(x)
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        stats = opt.step(cap)

Per step: gradients (+ L2 weight decay ``wd · θ``, added before preconditioning) of the
captured layers are preconditioned by :class:`KFACPreconditioner`; the step size is the
group's ``lr`` or, with ``regulator=NGDT(...)``, the regulator's ``η_T``; KL-clipping (Ba et
al., 2017) scales the update so that ``η² Σ_l ⟨Δ_l, g_l⟩ ≤ kl_clip``; momentum accumulates
the update. Parameters K-FAC does not cover (``kmod.uncaptured``) take a first-order step:
``uncaptured_update='sgd'`` (same lr, momentum, weight decay) or ``'adam'``.

Adaptive damping (``adaptive_damping=True``) is Levenberg–Marquardt on consecutive
mini-batches: with ``opt.step(cap, loss=loss)`` it compares the loss change with the change
the quadratic model predicted for the previous step, ``ρ = ΔL / M``, and multiplies the
damping by ``ω`` when ``ρ < ¼`` or divides it when ``ρ > ¾``. The losses come from different
mini-batches, so ρ is noisy; the new damping takes effect at the next inverse update.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from fxkfac.capture import Capture
from fxkfac.compiled_module import CompiledModule
from fxkfac.errors import FxKfacError
from fxkfac.optim.ngdt import NGDT
from fxkfac.precond.matrices import from_matrix, to_matrix
from fxkfac.precond.preconditioner import KFACPreconditioner


class KFAC(Optimizer):
    """K-FAC optimizer over a compiled module.

    Args:
        kmod: the module returned by :func:`fxkfac.compile`.
        loss_func: the loss module (``nn.MSELoss``, ``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss``).
        lr: learning rate (ignored when a ``regulator`` sets the step size).
        damping: Tikhonov damping ``λ``.
        params: parameter groups as for any ``torch.optim`` optimizer (default: all
            trainable parameters of ``kmod``); a layer follows the group of its weight.
        momentum: heavy-ball momentum on the update.
        weight_decay: L2 coefficient added to the gradient before preconditioning.
        kl_clip: KL-clipping threshold, or ``None``.
        regulator: an :class:`~fxkfac.optim.ngdt.NGDT` regulator, or ``None``.
        uncaptured_update: ``'sgd'`` or ``'adam'`` for parameters outside K-FAC.
        betas, eps: Adam coefficients for ``uncaptured_update='adam'``.
        adaptive_damping: Levenberg–Marquardt damping adaptation (needs ``step(cap, loss=...)``).
        damping_factor: ``ω`` of the adaptation.
        **preconditioner_options: ``factor_decay``, ``factor_every``, ``inverse_every``,
            ``fisher_type``, ``mc_samples``, ``kfac_approx``, ``inverse``, ``tol``,
            ``max_factor_dim``, ``seed`` (see :class:`KFACPreconditioner`).
    """

    def __init__(
        self,
        kmod: CompiledModule,
        loss_func: nn.Module,
        lr: float = 0.01,
        damping: float = 1e-3,
        *,
        params: Any = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        regulator: NGDT | None = None,
        uncaptured_update: str = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        adaptive_damping: bool = False,
        damping_factor: float = 0.95**-1,
        **preconditioner_options: Any,
    ):
        if not isinstance(kmod, CompiledModule):
            raise FxKfacError(
                "KFAC needs the compiled module (kmod = fxkfac.compile(model, ...)), "
                f"got {type(kmod).__name__}"
            )
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be non-negative")
        if uncaptured_update not in ("sgd", "adam"):
            raise ValueError(f"uncaptured_update={uncaptured_update!r} is not one of 'sgd', 'adam'")
        if regulator is not None and not isinstance(regulator, NGDT):
            raise FxKfacError(f"regulator must be an fxkfac.NGDT, got {type(regulator).__name__}")
        if params is None:
            params = [p for p in kmod.named_model_parameters().values() if p.requires_grad]
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        super().__init__(params, defaults)
        optimized = {id(p) for group in self.param_groups for p in group["params"]}
        named = kmod.named_model_parameters()
        # K-FAC covers the layers whose weight this optimizer updates (fine-tuning a head works)
        layers = [layer.name for layer in kmod.layers if id(named[layer.weight]) in optimized]
        self.preconditioner = KFACPreconditioner(
            kmod, loss_func, damping=damping, layers=layers, **preconditioner_options
        )
        self.kl_clip = kl_clip
        self.regulator = regulator
        self.uncaptured_update = uncaptured_update
        self.adaptive_damping = adaptive_damping
        self.damping_factor = damping_factor
        self._last_loss: float | None = None
        self._predicted_change: float | None = None
        self._layer_params = {
            layer.name: (named[layer.weight], named[layer.bias] if layer.bias else None)
            for layer in self.preconditioner.layers
        }
        captured_ids = {id(p) for pair in self._layer_params.values() for p in pair if p is not None}
        for name, (_, bias) in self._layer_params.items():
            if bias is not None and id(bias) not in optimized:
                raise FxKfacError(
                    f"layer {name}: its weight is optimized but its bias is not; K-FAC treats "
                    "[W | b] jointly — optimize both or freeze both"
                )
        self._uncaptured = [p for g in self.param_groups for p in g["params"] if id(p) not in captured_ids]

    def _group_of(self, param: Tensor) -> dict[str, Any] | None:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        return None

    @torch.no_grad()
    def step(self, capture: Capture | None = None, loss: Tensor | float | None = None, closure=None):  # type: ignore[override]
        """Take one K-FAC step; returns diagnostics (``lr``, ``delta_f``, ``q_pred``, ...).

        Args:
            capture: the capture of this step's forward (``out, cap = kmod(x)``); needed
                on steps that update the factors.
            loss: this step's loss, for the diagnostics and adaptive damping.
            closure: unsupported (K-FAC needs the capture), must be ``None``.
        """
        if closure is not None:
            raise FxKfacError("KFAC.step does not take a closure: call opt.step(cap) after loss.backward()")
        loss_value = float(loss.detach() if isinstance(loss, Tensor) else loss) if loss is not None else None
        pre = self.preconditioner
        gradients = pre.gradient_matrices()
        grads_finite = all(torch.isfinite(g).all() for g in gradients.values()) and all(
            p.grad is None or torch.isfinite(p.grad).all() for p in self._uncaptured
        )
        if not grads_finite:
            warnings.warn(
                f"non-finite gradients at step {pre.steps}: step skipped, parameters and "
                "K-FAC state left unchanged",
                RuntimeWarning,
                stacklevel=2,
            )
            return {"skipped": "non-finite gradients", "loss": loss_value, "step": pre.steps}
        if _is_empty_batch(capture):
            warnings.warn(
                f"empty batch at step {pre.steps}: step skipped, parameters and K-FAC state left unchanged",
                RuntimeWarning,
                stacklevel=2,
            )
            return {"skipped": "empty batch", "loss": loss_value, "step": pre.steps}
        self._adapt_damping(loss_value)
        stats = pre.update(capture)

        for name, matrix in gradients.items():
            weight, bias = self._layer_params[name]
            group = self._group_of(weight)
            if group["weight_decay"]:  # out of place: .grad stays the loss gradient
                layer = pre.kmod.layer(name)
                gradients[name] = matrix + group["weight_decay"] * to_matrix(layer, weight, bias)
        naturals = pre.precondition(gradients)
        delta_f = sum(float((gradients[n] * naturals[n]).sum()) for n in gradients)

        lr_of = {name: self._group_of(self._layer_params[name][0])["lr"] for name in gradients}
        q_pred = None
        updates = dict(naturals)
        if self.regulator is not None:
            eta, q_pred = self.regulator.step_size(delta_f)
            lr_of = dict.fromkeys(gradients, eta)
            for name in gradients:
                null = self.regulator.null_direction(gradients[name], naturals[name], pre.inverses.get(name))
                updates[name] = naturals[name] + self.regulator.null_ratio * null
        scale = 1.0
        if self.kl_clip is not None and gradients:
            kl = sum(lr_of[n] ** 2 * float((updates[n] * gradients[n]).sum()) for n in gradients)
            if kl > 0:
                scale = min(1.0, math.sqrt(self.kl_clip / kl))

        # compute every step first (momentum out of place): nothing is written unless all are finite
        steps, buffers = {}, {}
        for name, update in updates.items():
            weight, _ = self._layer_params[name]
            momentum = self._group_of(weight)["momentum"]
            direction = update * scale
            if momentum:
                buffer = self.state.get(weight, {}).get("kfac_momentum")
                direction = direction.clone() if buffer is None else buffer * momentum + direction
                buffers[name] = direction
            steps[name] = lr_of[name] * direction
        broken = sorted(name for name, step in steps.items() if not torch.isfinite(step).all())
        if broken or not math.isfinite(delta_f):
            warnings.warn(
                f"non-finite K-FAC update at step {pre.steps - 1} for layers {broken or sorted(steps)}: "
                "parameters and momentum left unchanged (the curvature is too ill-conditioned for "
                "the parameters' dtype: increase damping, or keep the parameters in float32)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._predicted_change = None  # no step taken: the next loss change predicts nothing
            return {**stats, "skipped": "non-finite update", "loss": loss_value, "step": pre.steps - 1}

        step_norms = {}
        predicted = 0.0
        for name, step in steps.items():
            weight, bias = self._layer_params[name]
            if name in buffers:
                self.state[weight]["kfac_momentum"] = buffers[name]
            predicted += self._model_change(name, gradients[name], step)
            layer = pre.kmod.layer(name)
            dweight, dbias = from_matrix(layer, step)
            weight.sub_(dweight.to(weight.dtype))
            if bias is not None:
                bias.sub_(dbias.to(bias.dtype))
            step_norms[name] = float(step.norm())
        self._predicted_change = predicted
        self._first_order_step()
        return {
            **stats,
            "step": pre.steps - 1,
            "lr": lr_of[next(iter(lr_of))] if lr_of else self.param_groups[0]["lr"],
            "delta_f": delta_f,
            "q_pred": q_pred,
            "kl_scale": scale,
            "loss": loss_value,
            "damping": pre.damping,
            "step_norms": step_norms,
            "skipped": None,
        }

    def _momentum(self, weight: Tensor, update: Tensor, momentum: float) -> Tensor:
        if not momentum:
            return update
        state = self.state[weight]
        buffer = state.get("kfac_momentum")
        buffer = update.clone() if buffer is None else buffer.mul_(momentum).add_(update)
        state["kfac_momentum"] = buffer
        return buffer

    def _model_change(self, name: str, gradient: Tensor, step: Tensor) -> float:
        """Quadratic-model change ``−⟨g, s⟩ + ½ ⟨s, B s A⟩`` of a step ``θ ← θ − s``."""
        if not self.adaptive_damping or name not in self.preconditioner.factors:
            return 0.0
        factors = self.preconditioner.factors[name]
        A, B = factors["A"], factors["B"]
        s = step.to(A.dtype)
        bs = B[:, :, None] * s if B.ndim == 2 else B @ s
        bsa = bs * A[:, None, :] if A.ndim == 2 else bs @ A
        return float(-(gradient.to(A.dtype) * s).sum() + 0.5 * (s * bsa).sum())

    def _adapt_damping(self, loss_value: float | None) -> None:
        if not self.adaptive_damping or loss_value is None or not math.isfinite(loss_value):
            return
        if self._last_loss is not None and self._predicted_change:
            rho = (loss_value - self._last_loss) / self._predicted_change
            pre = self.preconditioner
            if rho < 0.25:
                pre.damping *= self.damping_factor
            elif rho > 0.75:
                pre.damping /= self.damping_factor
            pre.damping = min(max(pre.damping, 1e-8), 1e4)
            for inverse in pre.inverses.values():
                if inverse.method in ("eigh", "ekfac"):
                    inverse.damping = pre.damping
        self._last_loss = loss_value

    def _first_order_step(self) -> None:
        """SGD or Adam on the parameters K-FAC does not precondition."""
        for param in self._uncaptured:
            if param.grad is None:
                continue
            group = self._group_of(param)
            grad = param.grad
            if group["weight_decay"]:
                grad = grad + group["weight_decay"] * param
            state = self.state[param]
            if self.uncaptured_update == "sgd":
                param.sub_(group["lr"] * self._momentum(param, grad, group["momentum"]))
                continue
            beta1, beta2 = group["betas"]
            state["adam_step"] = state.get("adam_step", 0) + 1
            exp_avg = state.setdefault("exp_avg", torch.zeros_like(param))
            exp_avg_sq = state.setdefault("exp_avg_sq", torch.zeros_like(param))
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            t = state["adam_step"]
            denom = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(group["eps"])
            param.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1**t))

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state plus the preconditioner's factors, inverses and RNG."""
        state = super().state_dict()
        state["kfac"] = self.preconditioner.state_dict()
        state["kfac"]["adaptive"] = {"last_loss": self._last_loss, "predicted": self._predicted_change}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (raises for a checkpoint of a different model)."""
        state_dict = dict(state_dict)
        if "kfac" not in state_dict:
            raise FxKfacError("not a fxkfac.KFAC checkpoint: the 'kfac' entry is missing")
        kfac = dict(state_dict.pop("kfac"))
        adaptive = kfac.pop("adaptive", {})
        self.preconditioner.load_state_dict(kfac)
        super().load_state_dict(state_dict)
        self._last_loss = adaptive.get("last_loss")
        self._predicted_change = adaptive.get("predicted")


def _is_empty_batch(capture: Capture | None) -> bool:
    """Whether ``capture`` comes from a forward on zero data."""
    if not isinstance(capture, Capture):
        return False
    try:
        prediction = capture.prediction
    except FxKfacError:
        return False
    return prediction.ndim > 0 and prediction.shape[0] == 0
