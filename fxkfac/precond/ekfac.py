"""Eigenvalue-corrected K-FAC (EKFAC): per-example second moments in the Kronecker eigenbasis.

George et al., 2018, *Fast Approximate Natural Gradient Descent in a Kronecker-factored
Eigenbasis*. A layer's curvature (GGN / Fisher) of ``rvec(W̃)`` is

    C = R Σ_{n,c} rvec(G_{n,c}) rvec(G_{n,c})ᵀ,   G_{n,c} = Σ_s g_{n,s,c} x̃_{n,s}ᵀ   [D_out, D_A]

with the inputs ``x̃`` (a trailing 1 for the bias) and the output gradients ``g`` of the
backpropagated vectors ``c`` — exactly the quantities of the K-FAC factors
(:mod:`fxkfac.factors.compute`); ``s`` runs over weight-sharing positions (sequence entries,
conv output pixels, the uses of a tied weight). K-FAC approximates ``C`` by ``B ⊗ A``, whose
eigenbasis is ``Q_B ⊗ Q_A`` with eigenvalues ``b_i a_j``. EKFAC keeps that basis and replaces
the eigenvalues by the exact diagonal of ``C`` in it (George et al., Eq. 10)::

    s_ij = R Σ_{n,c} (Q_Bᵀ G_{n,c} Q_A)_ij²

With this scaling, a single datum without weight sharing gives ``s = b aᵀ`` (``G_{n,c}`` are
rank one and ``B ⊗ A`` is then exact), and in general ``s`` is the best diagonal fit of
``C`` in the K-FAC eigenbasis (in Frobenius norm).

Cost: ``Q_Bᵀ G Q_A = Σ_s (Q_Bᵀ g_s)(Q_Aᵀ x̃_s)ᵀ`` is formed from rotated inputs and
gradients. Without weight sharing ``G`` is rank one and ``s`` is a single GEMM of squared
rotated vectors (the cost of a weight gradient). With weight sharing the per-example
matrices ``[K, N, D_out, D_A]`` are materialized in chunks of the batch (or, when cheaper,
the pairwise form ``Σ_{s,t} (g_s ∘ g_t)(x̃_s ∘ x̃_t)ᵀ`` is used): per-example gradients of a
big layer are inherently expensive — that is the price of the correction.

A factor kept diagonal (``max_factor_dim``) has the identity as its eigenbasis: the
correction is then computed in the coordinates of that side (both sides diagonal gives the
exact diagonal of ``C``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxkfac.capture import Capture
from fxkfac.factors.compute import _accumulation_dtype, capture_batch_size, layer_indices
from fxkfac.factors.datum_rows import per_datum_gradients, per_datum_inputs

Basis = tuple[Tensor | None, Tensor | None]
"""``(Q_A [G, D_A, D_A] | None, Q_B [G, D_B, D_B] | None)``; ``None`` is the identity."""

CHUNK_ELEMENTS = 1 << 24
"""Upper bound on the elements of one chunk's per-example matrices (weight sharing)."""


def rotated_inputs(features: Tensor, basis_A: Tensor | None, bias: bool) -> Tensor:
    """``Q_Aᵀ x̃`` for inputs ``[N, S, G, D_in]`` -> ``[N, S, G, D_A]`` (``x̃ = [x; 1]`` with bias).

    The bias column is added without materializing ``x̃``: ``Q_Aᵀ x̃ = Q_A[:D_in]ᵀ x + Q_A[D_in]``.
    """
    if basis_A is None:
        if not bias:
            return features
        return torch.cat([features, features.new_ones(*features.shape[:-1], 1)], dim=-1)
    dim = features.shape[-1]
    rotated = torch.einsum("nsgd,gde->nsge", features, basis_A[:, :dim])
    return rotated + basis_A[:, dim] if bias else rotated


def rotated_gradients(grads: Tensor, basis_B: Tensor | None) -> Tensor:
    """``Q_Bᵀ g`` for output gradients ``[K, N, S, G, D_B]`` (same shape)."""
    if basis_B is None:
        return grads
    return torch.einsum("knsgd,gde->knsge", grads, basis_B)


def corrected_eigenvalues(inputs: Tensor, grads: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """``Σ_{k,n} (Σ_s g_{k,n,s} x_{n,s}ᵀ)²`` per group (entrywise square), unscaled by ``R``.

    Args:
        inputs: rotated inputs ``Q_Aᵀ x̃``, ``[N, S, G, D_A]``.
        grads: rotated output gradients ``Q_Bᵀ g``, ``[K, N, S, G, D_B]``.
        chunk_elements: bound on the elements of the intermediates of one chunk of data.

    Returns:
        ``[G, D_B, D_A]``.
    """
    num_vectors, batch, positions, groups, dim_B = grads.shape
    dim_A = inputs.shape[-1]
    if positions == 1:  # rank-one per-example matrices: (g xᵀ)² = g² (x²)ᵀ, one GEMM
        return torch.einsum("ngi,ngj->gij", grads.square().sum(0)[:, 0], inputs[:, 0].square())
    result = inputs.new_zeros(groups, dim_B, dim_A)
    pair_size = positions * positions * (dim_B + dim_A)
    matrix_size = num_vectors * dim_B * dim_A
    pairwise = pair_size < matrix_size
    per_datum = groups * min(pair_size, matrix_size)
    step = max(1, chunk_elements // max(1, per_datum))
    for start in range(0, batch, step):
        x, g = inputs[start : start + step], grads[:, start : start + step]
        if pairwise:  # Σ_{s,t} (Σ_k g_s ∘ g_t)(x_s ∘ x_t)ᵀ
            grad_pairs = torch.einsum("knsgi,kntgi->nstgi", g, g)
            input_pairs = torch.einsum("nsgj,ntgj->nstgj", x, x)
            result += torch.einsum("nstgi,nstgj->gij", grad_pairs, input_pairs)
        else:  # per-example matrices of this chunk
            per_example = torch.einsum("knsgi,nsgj->kngij", g, x)
            result += per_example.square().sum((0, 1))
    return result


class EigenvalueCorrection:
    """Accumulates ``Σ_{n,c} (Q_Bᵀ G_{n,c} Q_A)²`` per layer over chunks of output gradients.

    It has the ``add`` interface of :class:`~fxkfac.factors.compute.GradFactorAccumulator`
    and is fed the same gradients during the K-FAC backward. Layers whose eigenbasis is
    known (and not due for recomputation) are projected at once; for the others the
    gradients are kept until :meth:`result` receives the basis computed from this step's
    factors.

    Args:
        capture: the capture of this forward pass (inputs ``x``).
        names: names of the layers to correct.
        bases: ``{layer name: (Q_A, Q_B)}`` of the layers whose basis is already fixed.
    """

    def __init__(self, capture: Capture, names: frozenset[str], bases: dict[str, Basis]):
        self.capture = capture
        self.bases = bases
        self.indices = [i for i in layer_indices(capture) if capture.layers[i].name in names]
        self.sums: dict[int, Tensor] = {}
        self.pending: dict[int, list[Tensor]] = {}
        self._inputs: dict[int, Tensor] = {}

    def _features(self, index: int) -> Tensor:
        """Inputs ``[N, S, G, D_in]`` of all uses (uses with one batch size share ``S``)."""
        layer = self.capture.layers[index]
        batch_size = capture_batch_size(self.capture)
        features = []
        for slot, use in zip(self.capture.slots_of(index), layer.matches, strict=True):
            x = self.capture.inputs[slot].detach()
            features.append(per_datum_inputs(x.to(_accumulation_dtype(x.dtype)), layer, use, batch_size))
        return _join(features, dim=1 if _same_batch(features, 0) else 0)

    def _gradients(self, index: int, grads_by_slot: dict[int, Tensor | None], num_vectors: int) -> Tensor:
        """Output gradients ``[K, N, S, G, D_B]`` of all uses (zeros for an unused output)."""
        layer = self.capture.layers[index]
        batch_size = capture_batch_size(self.capture)
        per_use = []
        for slot, use in zip(self.capture.slots_of(index), layer.matches, strict=True):
            grads = grads_by_slot.get(slot)
            if grads is None:
                x = self.capture.inputs[slot]
                grads = x.new_zeros((num_vectors, *self.capture.output_shapes[slot]))
            grads = grads.detach().to(_accumulation_dtype(grads.dtype))
            per_use.append(per_datum_gradients(grads, layer, use, batch_size))
        return _join(per_use, dim=2 if _same_batch(per_use, 1) else 1)

    def _project(self, index: int, grads: Tensor, basis: Basis) -> Tensor:
        layer = self.capture.layers[index]
        if index not in self._inputs:
            self._inputs[index] = rotated_inputs(self._features(index), basis[0], layer.bias is not None)
        return corrected_eigenvalues(self._inputs[index], rotated_gradients(grads, basis[1]))

    def add(self, grads_by_slot: dict[int, Tensor | None], num_vectors: int) -> None:
        """Add gradients ``[K, *z.shape]`` per tap slot (``None``: the output is unused)."""
        for index in self.indices:
            grads = self._gradients(index, grads_by_slot, num_vectors)
            basis = self.bases.get(self.capture.layers[index].name)
            if basis is None:
                self.pending.setdefault(index, []).append(grads)
                continue
            total = self._project(index, grads, basis)
            self.sums[index] = total if index not in self.sums else self.sums[index] + total

    def result(self, reduction_factor: float, bases: dict[str, Basis]) -> dict[str, Tensor]:
        """``{layer name: s [G, D_B, D_A]}`` with ``s = R Σ_{n,c} (Q_Bᵀ G_{n,c} Q_A)²``.

        Args:
            reduction_factor: ``R`` of the loss for this batch.
            bases: the bases the preconditioner uses now. A layer projected earlier in
                another basis (the basis changed in between) is left out.
        """
        for index, chunks in self.pending.items():
            basis = bases.get(self.capture.layers[index].name)
            if basis is None:  # the layer's factor update was skipped: no basis, no correction
                continue
            for grads in chunks:
                total = self._project(index, grads, basis)
                self.sums[index] = total if index not in self.sums else self.sums[index] + total
        self.pending = {}
        self._inputs = {}
        result = {}
        for index, total in self.sums.items():
            name = self.capture.layers[index].name
            used = self.bases.get(name)
            if used is not None and not _same_basis(used, bases.get(name)):
                continue
            result[name] = total * reduction_factor
        return result


def _same_batch(tensors: list[Tensor], axis: int) -> bool:
    return all(t.shape[axis] == tensors[0].shape[axis] for t in tensors)


def _join(tensors: list[Tensor], dim: int) -> Tensor:
    """Concatenate the uses of a tied weight: along positions, or along data (other batch sizes)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _same_basis(first: Basis, second: Basis | None) -> bool:
    return second is not None and all(a is b for a, b in zip(first, second, strict=True))
