"""``KFACPreconditioner``: running Kronecker factors, their inverses, and preconditioning.

The preconditioner hooks into the compiled module: after each forward it *arms* the
capture, so that the extra backward K-FAC needs runs inside the user's ``loss.backward()``
while the graph is alive — no second forward, no ``retain_graph``:

* ``mc`` / ``type-2``: a hook on the prediction fires when the backward reaches it and runs
  one batched backward of the backpropagated vectors to the layer outputs;
* ``empirical``: hooks on the layer outputs' autograd nodes read the training gradients
  ``R ∇c`` themselves (no extra backward), assuming the loss is ``loss_func(out, y)``.

With ``inverse='ekfac'`` the same backward also yields the eigenvalue correction
(:mod:`fxkfac.precond.ekfac`): the output gradients go to an
:class:`~fxkfac.precond.ekfac.EigenvalueCorrection` next to the ``B`` accumulator.

Used alone, :meth:`KFACPreconditioner.step` replaces each captured parameter's ``.grad``
by the preconditioned direction, so any ``torch.optim`` optimizer can apply it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from fxkfac.capture import Capture
from fxkfac.compiled_module import CompiledModule
from fxkfac.errors import CaptureError, FxKfacError
from fxkfac.factors.compute import (
    FisherType,
    GradFactorAccumulator,
    KFACApprox,
    _enum,
    backpropagated_vectors,
    grad_factors,
    identity_factors,
    in_internal_backward,
    input_factors,
)
from fxkfac.factors.losses import loss_rule
from fxkfac.precond.distributed import all_reduce_factors, spread, world_size
from fxkfac.precond.ekfac import Basis, EigenvalueCorrection
from fxkfac.precond.inverse import KroneckerInverse
from fxkfac.precond.matrices import from_matrix, to_matrix


def _grouped(factor: Tensor, groups: int, diagonal: bool) -> Tensor:
    """Add the group axis to an ungrouped factor."""
    return factor.unsqueeze(0) if groups == 1 else factor


class KFACPreconditioner:
    """K-FAC curvature state of a compiled module.

    Args:
        kmod: the module from :func:`fxkfac.compile`.
        loss_func: the loss module the training loss is computed with.
        damping: Tikhonov damping ``λ`` added to ``B ⊗ A``.
        factor_decay: running-average decay of the factors (``F ← d F + (1 − d) F_new``).
        factor_every: update the factors every this many steps.
        inverse_every: recompute the inverses every this many steps.
        fisher_type: ``'mc'`` (default), ``'type-2'``, ``'empirical'`` or ``'forward-only'``.
        mc_samples: sampled labels per datum for ``'mc'``.
        kfac_approx: ``'expand'`` or ``'reduce'`` for weight-shared layers.
        inverse: ``'cholesky'`` (π-split damped inverse), ``'eigh'`` (exact damped
            Kronecker inverse; pseudo-inverse with relative tolerance ``tol``) or ``'ekfac'``
            (eigenvalue-corrected K-FAC, George et al., 2018: the ``'eigh'`` eigenbasis,
            recomputed every ``inverse_every`` steps, with eigenvalues
            ``s = R Σ_{n,c} (Q_Bᵀ G_{n,c} Q_A)²`` from per-example gradients, averaged with
            ``factor_decay`` on factor steps; when the basis is recomputed the average
            restarts from the K-FAC eigenvalues ``b aᵀ`` of the new basis; see
            :mod:`fxkfac.precond.ekfac`).
        tol: eigenvalue threshold (relative to the largest) of the ``'eigh'`` / ``'ekfac'``
            pseudo-inverse.
        max_factor_dim: factors larger than this are kept diagonal (with a warning).
        seed: seed of the generator used for MC sampling (saved in checkpoints).
        layers: names of the layers to precondition (default: all of ``kmod.layers``).
        distributed: reduce factors across ``torch.distributed`` ranks and spread the
            inversions (default: when a process group with several ranks is initialized).
    """

    def __init__(
        self,
        kmod: CompiledModule,
        loss_func: nn.Module,
        *,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_every: int = 1,
        inverse_every: int = 10,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        inverse: str = "cholesky",
        tol: float = 0.0,
        max_factor_dim: int = 4096,
        seed: int = 0,
        layers: list[str] | None = None,
        distributed: bool | None = None,
    ):
        if not isinstance(kmod, CompiledModule):
            raise FxKfacError(
                "K-FAC needs the compiled module (kmod = fxkfac.compile(model, ...)), "
                f"got {type(kmod).__name__}"
            )
        if damping < 0:
            raise ValueError(f"damping must be non-negative, got {damping}")
        if not 0 <= factor_decay < 1:
            raise ValueError(f"factor_decay must lie in [0, 1), got {factor_decay}")
        if factor_every < 1 or inverse_every < 1:
            raise ValueError("factor_every and inverse_every must be positive integers")
        if inverse not in ("cholesky", "eigh", "ekfac"):
            raise ValueError(f"inverse={inverse!r} is not one of 'cholesky', 'eigh', 'ekfac'")
        if inverse == "ekfac" and fisher_type == "forward-only":
            raise ValueError(
                "inverse='ekfac' corrects the eigenvalues with per-example gradients, which "
                "fisher_type='forward-only' does not compute"
            )
        self.kmod = kmod
        self.loss_rule = loss_rule(loss_func)
        self.fisher = _enum(FisherType, fisher_type, "fisher_type")
        self.approx = _enum(KFACApprox, kfac_approx, "kfac_approx")
        self.damping = float(damping)
        self.factor_decay = factor_decay
        self.factor_every = factor_every
        self.inverse_every = inverse_every
        self.mc_samples = mc_samples
        self.inverse_method = inverse
        self.tol = tol
        self.generator = torch.Generator().manual_seed(seed)
        self.distributed = world_size() > 1 if distributed is None else distributed
        if self.distributed and inverse == "ekfac":
            raise FxKfacError("inverse='ekfac' is not supported with distributed K-FAC yet")
        self.steps = 0
        known = {layer.name for layer in kmod.layers}
        unknown = set(layers or ()) - known
        if unknown:
            raise FxKfacError(f"no captured layers named {sorted(unknown)}; layers: {sorted(known)}")
        self.layers = [layer for layer in kmod.layers if layers is None or layer.name in layers]
        self.layer_names = frozenset(layer.name for layer in self.layers)
        self.params = kmod.named_model_parameters()
        self.diagonal_A = frozenset(x.name for x in self.layers if x.input_factor_dim > max_factor_dim)
        self.diagonal_B = frozenset(x.name for x in self.layers if x.output_factor_dim > max_factor_dim)
        for name in sorted(self.diagonal_A | self.diagonal_B):
            layer = kmod.layer(name)
            warnings.warn(
                f"layer {name}: factor dimension {max(layer.input_factor_dim, layer.output_factor_dim)} "
                f"exceeds max_factor_dim={max_factor_dim}; keeping that factor diagonal",
                stacklevel=2,
            )
        self.factors: dict[str, dict[str, Tensor]] = {}
        self.inverses: dict[str, KroneckerInverse] = {}
        kmod.graph_module.fxkfac_capture.callbacks.append(self._arm)

    # -- backward hooks -----------------------------------------------------------------
    def will_update_factors(self) -> bool:
        """Whether the next :meth:`step` updates the factors."""
        return self.steps % self.factor_every == 0

    def _arm(self, capture: Capture) -> None:
        """Make ``loss.backward()`` also compute this capture's gradient-based factors."""
        if not (torch.is_grad_enabled() and self.will_update_factors()):
            return
        if self.fisher is FisherType.FORWARD_ONLY:
            return
        try:
            prediction = capture.prediction
        except CaptureError:
            return
        if prediction.grad_fn is None or prediction.shape[0] == 0:
            return
        if self.fisher is FisherType.EMPIRICAL:
            self._arm_empirical(capture, prediction)
            return

        def on_prediction_grad(grad: Tensor) -> None:
            if in_internal_backward() or capture.grad_factors is not None:
                return  # fxkfac's own factor backward, or factors already computed
            if not torch.isfinite(prediction).all():
                return  # no factors from a broken batch; the step is skipped on its gradients
            vectors = backpropagated_vectors(
                self.loss_rule, self.fisher, prediction, None, self.mc_samples, self.generator
            )
            observers = [self._eigenvalue_correction(capture)] if self.inverse_method == "ekfac" else []
            capture.grad_factors = grad_factors(
                capture, prediction, vectors, self.approx, self.diagonal_B, observers=observers
            )

        prediction.register_hook(on_prediction_grad)

    def _arm_empirical(self, capture: Capture, prediction: Tensor) -> None:
        """Read ``∇c = grad / R`` at every layer output during the training backward."""
        scale = 1.0 / self.loss_rule.reduction_factor(prediction)
        grads: dict[int, Tensor] = {}
        capture.output_grads = grads

        def make_hook(slot: int, output_nr: int):
            def on_output_grad(grad_outputs):
                grad = grad_outputs[output_nr]
                if grad is not None and not in_internal_backward():
                    grads[slot] = grad.detach().unsqueeze(0) * scale

            return on_output_grad

        for slot, edge in enumerate(capture.output_edges):
            if edge is not None:
                edge.node.register_prehook(make_hook(slot, edge.output_nr))

    # -- eigenvalue correction (inverse='ekfac') -----------------------------------------
    def _bases(self, fixed_only: bool) -> dict[str, Basis]:
        """``{layer: (Q_A, Q_B)}`` of the EKFAC inverses.

        With ``fixed_only``, only the bases that the next :meth:`update` keeps (none when a
        recomputation is due): the others are known only after it.
        """
        if fixed_only and self.steps % self.inverse_every == 0:
            return {}
        return {
            name: (inverse.tensors.get("QA"), inverse.tensors.get("QB"))
            for name, inverse in self.inverses.items()
            if inverse.method == "ekfac"
        }

    def _eigenvalue_correction(self, capture: Capture) -> EigenvalueCorrection:
        """A fresh correction accumulator for this capture (kept on the capture)."""
        correction = EigenvalueCorrection(capture, self.layer_names, self._bases(fixed_only=True))
        capture.eigenvalue_correction = correction
        return correction

    def _correct_eigenvalues(self, capture: Capture, updated: set[str], first: set[str]) -> list[str]:
        """Average this batch's corrected eigenvalues into the EKFAC inverses.

        Args:
            capture: this step's capture.
            updated: layers whose factors this step updated.
            first: layers whose factors were created this step (no average yet).

        Returns:
            The layers whose correction was not finite (skipped, last good state kept).
        """
        correction = getattr(capture, "eigenvalue_correction", None)
        if correction is None:
            raise CaptureError(
                "inverse='ekfac' found no eigenvalue correction for this capture: the K-FAC "
                "backward ran for another optimizer; use one K-FAC optimizer per compiled module"
            )
        capture.eigenvalue_correction = None  # the accumulated gradients are not needed again
        reduction = self.loss_rule.reduction_factor(capture.prediction)
        skipped = []
        for name, values in correction.result(reduction, self._bases(fixed_only=False)).items():
            inverse = self.inverses.get(name)
            if name not in updated or inverse is None:
                continue
            if not torch.isfinite(values).all():
                warnings.warn(
                    f"non-finite EKFAC eigenvalues for layer {name} at step {self.steps}: "
                    "skipping their update, keeping the last good ones",
                    RuntimeWarning,
                    stacklevel=4,
                )
                skipped.append(name)
                continue
            d = 0.0 if name in first else self.factor_decay
            inverse.tensors["s"] = d * inverse.tensors["s"] + (1 - d) * values.to(inverse.tensors["s"].dtype)
        return skipped

    # -- factors and inverses -----------------------------------------------------------
    def _check_capture(self, capture: Capture | None) -> None:
        if capture is None:
            return
        if not isinstance(capture, Capture):
            raise CaptureError(
                f"opt.step expects the capture returned by kmod(x), got {type(capture).__name__}"
            )
        if capture.owner != self.kmod.graph_module.fxkfac_capture.owner:
            raise CaptureError(
                "this capture comes from another compiled module: pass the capture of the "
                "module the optimizer was built for"
            )

    def _new_factors(self, capture: Capture) -> dict[str, tuple[Tensor, Tensor]]:
        """This batch's factors (group axis added), before averaging."""
        prediction = capture.prediction
        reduction = self.loss_rule.reduction_factor(prediction)
        inputs = input_factors(capture, reduction, self.approx, self.diagonal_A)
        if self.fisher is FisherType.FORWARD_ONLY:
            grads = identity_factors(capture, self.diagonal_B)
        elif self.fisher is FisherType.EMPIRICAL and getattr(capture, "output_grads", None):
            accumulator = GradFactorAccumulator(capture, self.approx, self.diagonal_B)
            accumulator.add(capture.output_grads, 1)
            grads = accumulator.result()
            if self.inverse_method == "ekfac":
                self._eigenvalue_correction(capture).add(capture.output_grads, 1)
        elif capture.grad_factors is None:
            raise CaptureError(
                "no gradient-based K-FAC factors were recorded for this capture: call "
                "loss.backward() on a loss computed from this forward's outputs before "
                "opt.step(cap), with gradients enabled"
            )
        else:
            grads = capture.grad_factors
        result = {}
        for index, A in inputs.items():
            layer = capture.layers[index]
            if layer.name not in self.layer_names:
                continue
            result[layer.name] = (
                _grouped(A, layer.groups, layer.name in self.diagonal_A),
                _grouped(grads[index], layer.groups, layer.name in self.diagonal_B),
            )
        return result

    def update(self, capture: Capture | None) -> dict[str, Any]:
        """Update running factors (if due) and inverses (if due); advance the step counter."""
        self._check_capture(capture)
        stats: dict[str, Any] = {"factors_updated": False, "inverses_updated": False, "skipped_layers": []}
        updated: set[str] = set()
        first: set[str] = set()
        if self.will_update_factors():
            if capture is None:
                raise CaptureError(
                    "this step updates the K-FAC factors and needs the capture: opt.step(cap) "
                    "with `out, cap = kmod(x)` from this step"
                )
            new_factors = self._new_factors(capture)
            if self.distributed:
                new_factors = all_reduce_factors(new_factors, self.loss_rule.reduction == "sum")
            for name, (A, B) in new_factors.items():
                if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                    warnings.warn(
                        f"non-finite K-FAC factor for layer {name} at step {self.steps}: "
                        "skipping its update, keeping the last good factors",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    stats["skipped_layers"].append(name)
                    continue
                old = self.factors.get(name)
                updated.add(name)
                if old is None:
                    first.add(name)
                    self.factors[name] = {"A": A.clone(), "B": B.clone()}
                else:
                    d = self.factor_decay
                    self.factors[name] = {"A": d * old["A"] + (1 - d) * A, "B": d * old["B"] + (1 - d) * B}
            stats["factors_updated"] = True
        due = self.steps % self.inverse_every == 0
        names = [name for name in self.factors if due or name not in self.inverses]

        def invert(name: str) -> KroneckerInverse:
            factor = self.factors[name]
            return KroneckerInverse.compute(
                factor["A"], factor["B"], self.damping, self.inverse_method, self.tol
            )

        inverses = spread(names, invert) if self.distributed else {name: invert(name) for name in names}
        for name, inverse in inverses.items():
            if inverse.is_finite():
                self.inverses[name] = inverse
                stats["inverses_updated"] = True
            else:
                warnings.warn(
                    f"non-finite inverse for layer {name}: keeping the previous one",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if self.inverse_method == "ekfac" and updated:
            stats["skipped_layers"] += self._correct_eigenvalues(capture, updated, first)
        self.steps += 1
        return stats

    # -- preconditioning ----------------------------------------------------------------
    def gradient_matrices(self, extra: dict[str, float] | None = None) -> dict[str, Tensor]:
        """``{layer: [G, D_B, D_A]}`` gradient matrices of the captured layers with a gradient."""
        matrices = {}
        for layer in self.layers:
            weight = self.params[layer.weight]
            bias = self.params[layer.bias] if layer.bias else None
            if weight.grad is None and (bias is None or bias.grad is None):
                continue
            wgrad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
            bgrad = None
            if bias is not None:
                bgrad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
            matrices[layer.name] = to_matrix(layer, wgrad, bgrad)
        return matrices

    def precondition(self, matrices: dict[str, Tensor]) -> dict[str, Tensor]:
        """``(B ⊗ A + λI)⁻¹ g`` per layer; layers without factors yet pass through."""
        result = {}
        for name, matrix in matrices.items():
            inverse = self.inverses.get(name)
            if inverse is None:
                result[name] = matrix
            else:
                factor_dtype = inverse.tensors[next(iter(inverse.tensors))].dtype
                result[name] = inverse.apply(matrix.to(factor_dtype)).to(matrix.dtype)
        return result

    def write(self, name: str, matrix: Tensor, target: str = "grad") -> None:
        """Write a layer's matrix into the ``.grad`` of its weight and bias."""
        layer = self.kmod.layer(name)
        weight, bias = from_matrix(layer, matrix)
        self.params[layer.weight].grad = weight.to(self.params[layer.weight].dtype)
        if layer.bias:
            self.params[layer.bias].grad = bias.to(self.params[layer.bias].dtype)

    @torch.no_grad()
    def step(self, capture: Capture | None = None) -> dict[str, Any]:
        """Update factors/inverses and replace ``.grad`` by the preconditioned direction."""
        matrices = self.gradient_matrices()
        if not all(torch.isfinite(m).all() for m in matrices.values()):
            warnings.warn("non-finite gradients: K-FAC step skipped", RuntimeWarning, stacklevel=2)
            return {"skipped": "non-finite gradients"}
        stats = self.update(capture)
        naturals = self.precondition(matrices)
        if not all(torch.isfinite(n).all() for n in naturals.values()):
            warnings.warn(
                "non-finite K-FAC direction (increase damping): .grad left as the loss gradient",
                RuntimeWarning,
                stacklevel=2,
            )
            return {**stats, "skipped": "non-finite update"}
        for name, natural in naturals.items():
            self.write(name, natural)
        return stats

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors, inverses, counters, damping and the MC generator state."""
        return {
            "steps": self.steps,
            "damping": self.damping,
            "generator": self.generator.get_state(),
            "layers": [layer.name for layer in self.layers],
            "factors": {name: {k: v.clone() for k, v in f.items()} for name, f in self.factors.items()},
            "inverses": {
                name: {
                    "method": inv.method,
                    "tensors": dict(inv.tensors),
                    "damping": inv.damping,
                    "tol": inv.tol,
                }
                for name, inv in self.inverses.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; fails clearly for a checkpoint of another model."""
        names = [layer.name for layer in self.layers]
        if state.get("layers") != names:
            raise FxKfacError(
                "this K-FAC checkpoint belongs to a different model: its layers "
                f"{state.get('layers')} do not match {names}"
            )
        by_name = {layer.name: layer for layer in self.layers}
        for name, factor in state["factors"].items():
            layer = by_name[name]
            expected = {"A": layer.input_factor_dim, "B": layer.output_factor_dim}
            for key, size in expected.items():
                shape = tuple(factor[key].shape)
                if shape[0] != layer.groups or any(d != size for d in shape[1:]):
                    raise FxKfacError(
                        f"this K-FAC checkpoint belongs to a different model: factor {key} of "
                        f"layer {name} has shape {shape}, this model needs {size} per group "
                        f"({layer.groups} groups)"
                    )
        self.steps = int(state["steps"])
        self.damping = float(state["damping"])
        self.generator.set_state(state["generator"])
        self.factors = {name: dict(f) for name, f in state["factors"].items()}
        self.inverses = {
            name: KroneckerInverse(v["method"], dict(v["tensors"]), v["damping"], v["tol"])
            for name, v in state["inverses"].items()
        }
