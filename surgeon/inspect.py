"""`cm.inspect()`: what was grafted where, as a table."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from surgeon.compiled import CompiledModel


@dataclass
class Row:
    target: str
    method: str
    adapter: str
    rank: int | None
    params: int
    region: str
    active: bool


def _shared_row(
    cm: CompiledModel, name: str, layers: list[tuple[str, nn.Module]], holders: Counter
) -> list[Row]:
    """One row for the parameters several of an adapter's layers share (VB-LoRA's bank,
    UniLoRA's θ_d), counted once rather than on every layer."""
    shared = {id(p): p for _, layer in layers for p in layer.parameters() if holders[id(p)] > 1}
    if not shared:
        return []
    return [
        Row(
            target=f"(shared by {max(holders[i] for i in shared)} layers)",
            method=cm.spec(name).name,
            adapter=name,
            rank=None,
            params=sum(p.numel() for p in shared.values()),
            region="-",
            active=name in cm.active,
        )
    ]


@dataclass
class Report:
    rows: list[Row]
    trainable: int
    total: int
    regions: int
    breaks: list[tuple[str, str, str]]
    regions_per_layer: float | None
    trace_seconds: float
    merged: list[str] = field(default_factory=list)
    specialised: int = 0
    refused: list[tuple[str, str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, cm: CompiledModel) -> Report:
        rows = []
        for name in cm.adapters:
            layers = list(cm.store.items(name))
            holders = Counter(id(p) for _, layer in layers for p in layer.parameters())
            for path, layer in layers:
                method = "copy" if layer.method == "copy" else cm.spec(name).name
                region = cm.graph.region_of(path)
                own = (p for p in layer.parameters() if holders[id(p)] == 1)
                rows.append(
                    Row(
                        target=path,
                        method=method,
                        adapter=name,
                        rank=getattr(layer, "rank", None),
                        params=sum(p.numel() for p in own),
                        region=(region.path or "<root>") if region is not None else "-",
                        active=name in cm.active,
                    )
                )
            rows += _shared_row(cm, name, layers, holders)
            if (call := cm.store.call(name)) is not None:
                params = sum(p.numel() for p in call.parameters())
                rows.append(
                    Row(
                        call.target,
                        cm.spec(name).name,
                        name,
                        None,
                        params,
                        call.where,
                        name in cm.active,
                    )
                )
        graph = cm.graph
        return cls(
            rows=rows,
            trainable=cm.num_trainable(),
            total=cm.num_parameters(),
            regions=len(graph.live()),
            breaks=[(b.path or "<root>", b.module_type, b.reason) for b in graph.breaks],
            regions_per_layer=graph.regions_per_layer(),
            trace_seconds=graph.trace_seconds,
            merged=cm.merged,
            specialised=sum(r.specialised for r in graph.live()),
            refused=graph.refused(),
        )

    def table(self) -> str:
        headers = ("target", "method", "adapter", "rank", "params", "region")
        body = [
            (
                r.target,
                r.method,
                r.adapter + ("" if r.active else " (inactive)"),
                "-" if r.rank is None else str(r.rank),
                f"{r.params:,}",
                r.region,
            )
            for r in self.rows
        ]
        widths = [
            max(len(h), *(len(row[i]) for row in body)) if body else len(h)
            for i, h in enumerate(headers)
        ]

        def line(cells):
            return "  ".join(
                c.rjust(w) if i in (3, 4) else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            )

        out = [line(headers), line(tuple("-" * w for w in widths))]
        out.extend(line(row) for row in body)
        return "\n".join(out)

    def summary(self) -> str:
        share = 100.0 * self.trainable / self.total if self.total else 0.0
        per_layer = f"{self.regions_per_layer:.1f}" if self.regions_per_layer is not None else "n/a"
        specialised = f"; {self.specialised} specialised at call time" if self.specialised else ""
        lines = [
            f"trainable params: {self.trainable:,} of {self.total:,} ({share:.4f}%)",
            f"regions: {self.regions} ({per_layer} per decoder layer{specialised}), "
            f"graph breaks: {len(self.breaks)}, traced in {self.trace_seconds * 1000:.0f} ms",
        ]
        if self.merged:
            lines.append(f"merged into the weights: {', '.join(self.merged)}")
        return "\n".join(lines)

    def breaks_table(self, limit: int = 20) -> str:
        shown = self.breaks[:limit]
        lines = [f"{path} ({kind}): {reason}" for path, kind, reason in shown]
        if len(self.breaks) > limit:
            lines.append(f"... and {len(self.breaks) - limit} more")
        lines += [
            f"{path}: runs its own forward for calls ({call}): {reason}"
            for path, call, reason in self.refused[:limit]
        ]
        return "\n".join(lines) or "(no graph breaks)"

    def __str__(self) -> str:
        return f"{self.table()}\n\n{self.summary()}"
