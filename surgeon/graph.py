"""The IR as users see it: regions (FX graphs), graph breaks, code, networkx and DOT views."""

from __future__ import annotations

import difflib
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from surgeon.targets import layer_index
from surgeon.trace import Break, Region


class Graph:
    """The traced model: sound regions plus the modules that broke tracing.

    ``specialised``: the broken modules that are traced again at call time, per kind of call
    (surgeon/specialise.py); once one has run a variant it is the region of its subtree
    (`live`). ``specialising = False`` keeps every call on the plain regions.
    """

    def __init__(
        self,
        regions: list[Region],
        breaks: list[Break],
        trace_seconds: float,
        specialised: list[Region] | None = None,
    ) -> None:
        self.regions = regions
        self.breaks = breaks
        self.trace_seconds = trace_seconds
        self.specialised = specialised or []
        self.specialising = True

    def __repr__(self) -> str:
        adapted = sum(1 for r in self.regions if r.graph is not None)
        return f"Graph({len(self.regions)} regions, {adapted} rewritten, {len(self.breaks)} breaks)"

    def installable(self) -> list[Region]:
        return [*self.regions, *self.specialised]

    def traced(self) -> list[Region]:
        """Specialised regions that hold at least one traced variant."""
        return [
            r for r in self.specialised if any(isinstance(v, list) for v in r.variants.values())
        ]

    def live(self) -> list[Region]:
        """The regions calls run through now: outermost traced specialised regions, and the
        plain regions outside them."""
        traced = self.traced()
        outer = [
            r for r in traced if not any(_inside(r.path, o.path) for o in traced if o is not r)
        ]
        rest = [r for r in self.regions if not any(_inside(r.path, o.path) for o in outer)]
        return outer + rest

    def refused(self) -> list[tuple[str, str, str]]:
        """(path, kind of call, reason) for each call a specialised region could not trace."""
        return [
            (r.path or "<root>", _call_kind(key), reason)
            for r in self.specialised
            for key, reason in r.variants.items()
            if isinstance(reason, str)
        ]

    def region(self, path: str) -> Region:
        for region in (*self.regions, *self.specialised):
            if region.path == path:
                return region
        known = ", ".join(repr(r.path) for r in self.regions[:10])
        raise KeyError(
            f"no region at {path!r}; regions: {known}{' ...' if len(self.regions) > 10 else ''}"
        )

    def region_of(self, module_path: str) -> Region | None:
        """The region whose subtree holds ``module_path`` (a traced specialised one first)."""
        best = None
        for region in self.live():
            if _inside(module_path, region.path) and (
                best is None or len(region.path) > len(best.path)
            ):
                best = region
        return best

    def rewritten(self) -> Iterator[Region]:
        return (r for r in self.installable() if r.graph is not None)

    def code(self, path: str | None = None, marked: bool = False) -> str:
        """Python code of one region (by module path), or of every rewritten region.

        ``marked``: end each line an adapter pass inserted with ``# + <method>[<adapter>]``.
        """
        if path is not None:
            return _region_code(self.region(path), marked)
        chosen = list(self.rewritten()) or self.regions
        return "\n".join(_region_code(r, marked) for r in chosen)

    def diff(self, path: str) -> str:
        """Unified diff of one region's code: as traced vs as it runs now."""
        region = self.region(path)
        name = region.path or "<root>"
        before = _graph_source(region.base).splitlines(keepends=True)
        after = _graph_source(region.current).splitlines(keepends=True)
        lines = difflib.unified_diff(before, after, f"{name} (traced)", f"{name} (rewritten)")
        return "".join(lines) or f"# region {name}: no changes\n"

    def regions_per_layer(self) -> float | None:
        """Mean number of regions a decoder layer's adaptable layers are spread over (a region
        spanning several layers counts for each); None for models without numbered layers."""
        counts: Counter[int] = Counter()
        for region in self.live():
            for index in _layers_spanned(region):
                counts[index] += 1
        return sum(counts.values()) / len(counts) if counts else None

    def to_networkx(self) -> nx.DiGraph:
        """One node per FX node (``"<region>::<node>"``), with op, target, region and adapter attributes."""
        g = nx.DiGraph()
        for region in self.live():
            prefix = region.path or "<root>"
            for node in region.current.nodes:
                tag = node.meta.get("surgeon", {})
                g.add_node(
                    f"{prefix}::{node.name}",
                    op=node.op,
                    target=_target_name(node),
                    region=prefix,
                    adapter=tag.get("adapter"),
                    method=tag.get("method"),
                )
                for src in node.all_input_nodes:
                    g.add_edge(f"{prefix}::{src.name}", f"{prefix}::{node.name}")
        return g

    def to_dot(self, path: str | Path | None = None) -> str:
        """Graphviz DOT text, one cluster per region, inserted adapter nodes filled."""
        g = self.to_networkx()
        lines = ["digraph surgeon {", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
        by_region: dict[str, list[str]] = {}
        for n, data in g.nodes(data=True):
            by_region.setdefault(data["region"], []).append(n)
        for i, (region, nodes) in enumerate(by_region.items()):
            lines.append(f"  subgraph cluster_{i} {{")
            lines.append(f"    label={_quote(region)};")
            for n in nodes:
                data = g.nodes[n]
                label = f"{data['op']}\\n{data['target']}"
                style = ', style=filled, fillcolor="#ffd59e"' if data["adapter"] else ""
                lines.append(f"    {_quote(n)} [label={_quote(label)}{style}];")
            lines.append("  }")
        lines.extend(f"  {_quote(a)} -> {_quote(b)};" for a, b in g.edges)
        lines.append("}")
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def render(self, path: str | Path) -> Path:
        """Write the graph as SVG (``*.svg``, through graphviz's ``dot`` when installed) or as DOT
        text; returns the file written, which is ``<path>.dot`` when SVG was asked for and graphviz
        is missing."""
        path = Path(path)
        dot = self.to_dot()
        if path.suffix.lower() != ".svg":
            path.write_text(dot, encoding="utf-8")
            return path
        executable = shutil.which("dot")
        if executable is None:
            fallback = path.with_suffix(".dot")
            fallback.write_text(dot, encoding="utf-8")
            return fallback
        svg = subprocess.run(
            [executable, "-Tsvg"], input=dot.encode(), capture_output=True, check=True
        ).stdout
        path.write_bytes(svg)
        return path

    def check(self) -> None:
        """The IR's invariants; raise AssertionError naming the region that breaks one."""
        for region in self.regions:
            region.base.lint()
            if region.graph is None:
                continue
            region.graph.lint()
            targets = {n.target for n in region.base.nodes if n.op == "call_module"}
            kept = {
                n.target
                for n in region.graph.nodes
                if n.op == "call_module" and "surgeon" not in n.meta
            }
            # a fused op (passes/fuse.py) calls its base layer's weights itself
            kept |= {
                n.meta["surgeon"]["fused"]
                for n in region.graph.nodes
                if "fused" in n.meta.get("surgeon", {})
            }
            kept |= {  # base calls an adapter spelled out (a 4-bit layer's dequantize + matmul)
                n.meta["surgeon"]["replaces"]
                for n in region.graph.nodes
                if "replaces" in n.meta.get("surgeon", {})
            }
            assert targets == kept, (
                f"region {region.path!r}: base layer calls changed: {targets ^ kept}"
            )
            for node in region.graph.nodes:
                if "surgeon" in node.meta:
                    assert node.meta["surgeon"].get("adapter"), (
                        f"region {region.path!r}: untagged {node}"
                    )


def _inside(path: str, outer: str) -> bool:
    return outer == "" or path == outer or path.startswith(outer + ".")


def _layers_spanned(region: Region) -> set[int]:
    """Decoder-layer indices of the layers a region's graph calls (or of its own path)."""
    own = layer_index(region.path + ".")
    if own is not None:
        return {own}
    prefix = f"{region.path}." if region.path else ""
    return {
        i
        for node in region.base.nodes
        if node.op == "call_module" and (i := layer_index(f"{prefix}{node.target}.")) is not None
    }


def _call_kind(key: Any) -> str:
    """A specialisation key as people read it: the arguments' kinds."""
    parts = [_kind(k) for k in key.args] + [f"{name}={_kind(k)}" for name, k in key.kwargs]
    return ", ".join(parts) + ("" if key.training else " (eval)")


def _kind(key: Any) -> str:
    head = key[0]
    if head is torch.Tensor:
        return f"{str(key[1]).removeprefix('torch.')} tensor"
    if head is object:
        return key[1].__name__
    if head in (tuple, list):
        return "(" + ", ".join(_kind(k) for k in key[1]) + ")"
    if head is dict:
        return "{" + ", ".join(f"{n}: {_kind(k)}" for n, k in key[1]) + "}"
    if isinstance(head, type) and issubclass(head, dict):  # a ModelOutput
        return head.__name__
    return repr(key[1])


def _region_code(region: Region, marked: bool = False) -> str:
    if region.specialised and not region.base.nodes:
        return f"# region {region.path or '<root>'} ({region.module_type}): specialised at its first call; not traced yet\n"
    graph = region.current
    kind = ", leaf" if region.leaf else ", specialised" if region.specialised else ""
    header = f"# region {region.path or '<root>'} ({region.module_type}{kind})"
    body = _graph_source(graph)
    if marked:
        body = _mark_inserted(graph, body)
    return f"{header}\n{body}\n"


def _graph_source(graph: fx.Graph) -> str:
    lines = graph.python_code("self").src.splitlines()
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def _mark_inserted(graph: fx.Graph, source: str) -> str:
    """FX writes one statement per node, ``<name> = ...``: tag the statements of inserted nodes."""
    tags = {
        node.name: f"{tag.get('method')}[{tag.get('adapter')}]"
        for node in graph.nodes
        if (tag := node.meta.get("surgeon"))
    }
    lines = []
    for line in source.splitlines():
        name = line.strip().split(" = ", 1)[0]
        lines.append(f"{line}  # + {tags[name]}" if " = " in line and name in tags else line)
    return "\n".join(lines)


def _target_name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", None) or str(target)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\\\\n", "\\n") + '"'
