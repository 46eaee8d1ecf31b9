"""Rich reports: the layer table, highlighted generated code, and one layer's rewrite."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.syntax import Syntax
from rich.table import Table

if TYPE_CHECKING:
    from fxkfac.compiled_module import CompiledModule
    from fxkfac.layers import LayerInfo


def format_bytes(count: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


LAYER_COLUMNS = ("layer", "kind", "call", "weight", "A", "B", "groups", "uses", "factor memory")
"""Columns of the layer table (plain :meth:`CompiledModule.summary` and the rich one)."""


def factor_entries(layer: LayerInfo) -> int:
    """Entries of one layer's full factors ``A`` and ``B`` (all groups)."""
    return layer.groups * (layer.input_factor_dim**2 + layer.output_factor_dim**2)


def factor_bytes(layer: LayerInfo, kmod: CompiledModule) -> int:
    """Bytes of one layer's full factors ``A`` and ``B``.

    At least float32: low-precision models accumulate their factors in float32.
    """
    return factor_entries(layer) * max(kmod.named_model_parameters()[layer.weight].element_size(), 4)


def layer_rows(kmod: CompiledModule) -> list[tuple[str, ...]]:
    """One row of :data:`LAYER_COLUMNS` per captured layer."""
    return [
        (
            layer.name,
            layer.kind,
            layer.call_form,
            "×".join(map(str, layer.weight_shape)),
            str(layer.input_factor_dim),
            str(layer.output_factor_dim),
            str(layer.groups),
            str(len(layer.nodes)),
            format_bytes(factor_bytes(layer, kmod)),
        )
        for layer in kmod.layers
    ]


def layer_table(kmod: CompiledModule, fisher_type: str = "mc", kfac_approx: str = "expand") -> Table:
    """Rich table: name, kind, call form, weight shape, A/B sizes, factor memory, settings."""
    table = Table(title=f"K-FAC layers (fisher_type={fisher_type!r}, kfac_approx={kfac_approx!r})")
    for column in LAYER_COLUMNS:
        table.add_column(column, justify="right" if column in ("A", "B", "groups", "uses") else "left")
    for row in layer_rows(kmod):
        table.add_row(*row)
    total = sum(factor_bytes(layer, kmod) for layer in kmod.layers)
    table.caption = f"{len(kmod.layers)} layers, {format_bytes(total)} of factors; tracer: {kmod.tracer}"
    return table


def uncaptured_table(kmod: CompiledModule) -> Table:
    """Rich table of the parameters K-FAC does not precondition, with reasons."""
    table = Table(title=f"{len(kmod.uncaptured)} parameters not preconditioned by K-FAC")
    table.add_column("parameter")
    table.add_column("reason")
    for name, reason in kmod.uncaptured.items():
        table.add_row(name, reason)
    return table


def code_view(kmod: CompiledModule) -> Syntax:
    """The generated Python, syntax-highlighted."""
    return Syntax(kmod.code.strip(), "python", line_numbers=True)


def rewrite_view(kmod: CompiledModule, layer_name: str) -> Group:
    """Before/after lines of the generated code around one layer's op(s)."""
    layer = kmod.layer(layer_name)
    names = set(layer.nodes) | {node.name for match in layer.matches for node in match.op_nodes}
    before = [line for line in kmod.traced.code.splitlines() if any(f"{n} = " in line for n in names)]
    after = [
        line
        for line in kmod.code.splitlines()
        if any(f"{n} = " in line or f"tap({n}," in line.replace("_tap(", "tap(") for n in names)
    ]
    return Group(
        f"[bold]{layer_name}[/] before the rewrite:",
        Syntax(textwrap.dedent("\n".join(before)) or "(no code line)", "python"),
        "after the rewrite:",
        Syntax(textwrap.dedent("\n".join(after)), "python"),
    )


def print_summary(kmod: CompiledModule, console: Console | None = None, **settings: str) -> None:
    """Print the layer table and the uncaptured parameters."""
    console = console or Console()
    console.print(layer_table(kmod, **settings))
    if kmod.uncaptured:
        console.print(uncaptured_table(kmod))
    else:
        console.print("every parameter is preconditioned by K-FAC")
