"""Inspect: what was grafted where, which modules broke tracing and why, the rewritten code of a
region with the inserted lines marked, a traced-vs-rewritten diff, the specialised region the
first call traces (the whole encoder), and the graph as SVG/DOT.

python examples/inspect_graph.py [graph.svg]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import load_minilm_classifier

import surgeon


def main() -> None:
    model, tokenizer = load_minilm_classifier()
    cm = surgeon.compile(model, surgeon.LoRA(rank=8, targets=("query", "value")))
    report = cm.inspect()
    print(report.table())
    print(f"\n{report.summary()}")
    print(f"\ngraph breaks (first 3):\n{report.breaks_table(limit=3)}")

    region = "bert.encoder.layer.0.attention.self.query"
    print(f"\n{cm.graph.code(region, marked=True)}")
    print(cm.graph.diff(region))

    # plain FX cannot trace BERT's layers (**kwargs, shape splats); the first call can
    cm(
        **tokenizer(
            ["the battery lasts all day", "broke in a week"], return_tensors="pt", padding=True
        )
    )
    print(f"after one call: {cm.inspect().summary().splitlines()[-1]}")
    (outer,) = cm.graph.traced()[:1]  # the outermost module that traced: here the whole model
    code = cm.graph.code(outer.path, marked=True).splitlines()
    print("\n".join(code[:6]) + f"\n    ... ({len(code)} lines)\n")

    graph = cm.graph.to_networkx()  # one node per FX node, for queries
    inserted = [n for n, data in graph.nodes(data=True) if data["adapter"]]
    print(f"networkx view: {graph.number_of_nodes()} nodes, {len(inserted)} inserted by adapters")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "graph.svg"
    written = cm.graph.render(out)  # SVG through graphviz when installed, DOT text otherwise
    print(f"graph written to {written}")


if __name__ == "__main__":
    main()
