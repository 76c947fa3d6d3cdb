"""The IR's views: marked region code, traced-vs-rewritten diffs, DOT/SVG rendering."""

from __future__ import annotations

import shutil

from zoo import ZOO

import surgeon


def compiled_mlp():
    return surgeon.compile(ZOO["mlp"].model(), surgeon.LoRA(rank=2, targets=("body.0",)))


def test_marked_code_tags_exactly_the_inserted_statements():
    cm = compiled_mlp()
    code = cm.graph.code("", marked=True)
    tagged = [line for line in code.splitlines() if line.endswith("# + lora[default]")]
    inserted = [n for n in cm.graph.region("").current.nodes if "surgeon" in n.meta]
    assert len(tagged) == len(inserted) > 0
    assert all("lora" in line or "torch." in line for line in tagged)
    assert "self.head(" in code and not any("self.head(" in line for line in tagged)
    assert cm.graph.code("", marked=False) == code.replace("  # + lora[default]", "")


def test_diff_shows_only_added_adapter_lines():
    cm = compiled_mlp()
    diff = cm.graph.diff("")
    added = [
        line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")
    ]
    assert diff.startswith("--- <root> (traced)\n+++ <root> (rewritten)\n")
    assert any("lora_A" in line for line in added)
    with cm.disabled():
        assert cm.graph.diff("") == "# region <root>: no changes\n"


def test_render_writes_svg_with_graphviz_and_dot_text_without(tmp_path):
    cm = compiled_mlp()
    dot = cm.graph.render(tmp_path / "g.dot")
    assert dot == tmp_path / "g.dot" and dot.read_text() == cm.graph.to_dot()
    written = cm.graph.render(tmp_path / "g.svg")
    if shutil.which("dot"):
        assert written == tmp_path / "g.svg" and "<svg" in written.read_text()
    else:
        assert written == tmp_path / "g.dot" and written.read_text().startswith("digraph")
