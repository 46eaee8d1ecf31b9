"""Bring a use's inputs and output gradients to datum-major rows for ``kfac_approx='reduce'``.

The factor rules read the leading axis of ``x`` (``[M, ..., D_in]``, ``[M, C_in, *S]``) as
rows and the driver groups ``M = N · m`` rows into ``N`` data of ``m`` rows each. That needs
the datum's rows to be contiguous and leading: :func:`datum_major` moves the batch axis of
a use's :class:`~fxkfac.layers.BatchAxis` to the front and reorders a batch merged
behind another axis (``[S · N, E]``) to datum-major (``[N · S, E]``). ``expand`` sums over
all rows and needs none of this.
"""

from __future__ import annotations

import warnings

from torch import Tensor

from fxkfac.factors.rules import factor_rule
from fxkfac.layers import BatchAxis, LayerInfo, OpMatch


def datum_major(values: Tensor, layout: BatchAxis | None, offset: int = 0) -> Tensor:
    """``values`` with its batch rows at axis ``offset``, datum-major.

    Args:
        values: a use's input ``[*x.shape]`` (``offset=0``) or output gradients
            ``[K, *z.shape]`` (``offset=1``).
        layout: the use's batch layout; ``None`` (unknown) keeps the leading axis.
        offset: number of leading axes before the layer's own axes.

    Returns:
        A tensor whose axis ``offset`` has ``N · m`` rows, datum ``n`` owning rows
        ``[n m, (n + 1) m)``; the other axes keep their order.
    """
    if layout is None or layout.dim >= values.ndim - offset:
        return values
    dim = layout.dim + offset
    if dim != offset:
        values = values.movedim(dim, offset)
    if layout.outer > 1:
        batch = values.shape[offset] // layout.merged
        values = values.unflatten(offset, (layout.outer, batch, layout.inner))
        values = values.transpose(offset, offset + 1).flatten(offset, offset + 2)
    return values


def data_count(rows: int, layout: BatchAxis | None, batch_size: int | None, layer: LayerInfo) -> int:
    """``N``: the number of data among ``rows`` datum-major rows of one use.

    With an unknown layout the rows are taken as ``N · m`` datum-major when the batch size
    divides them (with a warning unless ``m = 1``), else as ``N = rows`` (each row a datum).
    """
    if layout is not None:
        return rows // layout.merged
    if batch_size is None or rows == batch_size:
        return rows
    if rows % batch_size == 0:
        warnings.warn(
            f"layer {layer.name}: batch layout unknown (compile with example_inputs= to probe it); "
            f"kfac_approx='reduce' reads its {rows} leading rows as {batch_size} data of "
            f"{rows // batch_size} consecutive rows each",
            stacklevel=4,
        )
        return batch_size
    warnings.warn(
        f"layer {layer.name}: batch layout unknown and its leading axis ({rows}) is not a "
        f"multiple of the batch size ({batch_size}); kfac_approx='reduce' treats each row as a datum",
        stacklevel=4,
    )
    return rows


def per_datum_inputs(x: Tensor, layer: LayerInfo, use: OpMatch, batch_size: int | None) -> Tensor:
    """Input features ``[N, m·S, G, D_in]`` of one use, grouped by datum.

    Args:
        x: the use's input ``[*x.shape]`` (any batch layout).
        layer: its layer.
        use: the use (its :class:`BatchAxis`).
        batch_size: ``N``, read only when the layout is unknown.
    """
    features = factor_rule(layer.kind).input_features(datum_major(x, use.batch), layer, use)
    data = data_count(features.shape[0], use.batch, batch_size, layer)
    return features.reshape(data, -1, *features.shape[2:])


def per_datum_gradients(grads: Tensor, layer: LayerInfo, use: OpMatch, batch_size: int | None) -> Tensor:
    """Output gradients ``[K, N, m·S, G, D_out]`` of one use, grouped by datum.

    Args:
        grads: gradients ``[K, *z.shape]`` w.r.t. the use's output, one per vector.
        layer: its layer.
        use: the use (its :class:`BatchAxis`).
        batch_size: ``N``, read only when the layout is unknown.
    """
    rows = factor_rule(layer.kind).output_gradients(datum_major(grads, use.batch, offset=1), layer)
    data = data_count(rows.shape[1], use.batch, batch_size, layer)
    return rows.reshape(rows.shape[0], data, -1, *rows.shape[3:])
