"""The README stays true: its methods table is the registry, its prose stays short (the table
grows with the registry), and it names every example script and every module of the library."""

from __future__ import annotations

import re
from pathlib import Path

import surgeon  # noqa: F401  (registers every method)
from surgeon.spec import METHODS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_PROSE_LINES = 350


def _table_rows() -> list[tuple[str, str, str, str]]:
    """(method, class, family, PEFT type) of every row between the methods markers."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- methods:begin -->\n(.*?)<!-- methods:end -->", text, re.S)
    assert block, "README.md has no <!-- methods:begin --> ... <!-- methods:end --> block"
    lines = [line for line in block.group(1).splitlines() if line.startswith("|")]
    header, rule, *rows = lines
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method",
        "class",
        "family",
        "PEFT type",
        "what it trains",
    ]
    assert set(rule.replace("|", "")) == {"-"}
    parsed = []
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 5 and cells[4], f"malformed methods row: {row}"
        parsed.append((cells[0].strip("`"), cells[1].strip("`"), cells[2], cells[3]))
    return parsed


def _registry_rows() -> list[tuple[str, str, str, str]]:
    return [
        (name, cls.__name__, cls.__module__.split(".")[-2], cls.peft_type or "-")
        for name, cls in METHODS.items()
    ]


def test_methods_table_is_the_registry():
    rows = _table_rows()
    assert len(rows) == len(set(rows)), "a method is listed twice"
    assert set(rows) == set(_registry_rows())


def test_methods_table_is_sorted_by_family_then_name():
    rows = _table_rows()
    assert rows == sorted(rows, key=lambda row: (row[2], row[0]))


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    prose = len(lines) - len(_table_rows())
    assert prose <= MAX_PROSE_LINES, (
        f"README.md has {prose} lines besides the methods table (at most {MAX_PROSE_LINES})"
    )


def test_readme_names_every_example_script():
    text = README.read_text(encoding="utf-8")
    scripts = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    assert scripts
    assert [s for s in scripts if s not in text] == []


def test_layout_names_every_module():
    text = README.read_text(encoding="utf-8")
    layout = re.search(r"## Layout\n(.*?)\n## ", text, re.S)
    assert layout, "README.md has no Layout section"
    modules = [p.stem for p in (ROOT / "surgeon").glob("*.py") if p.stem != "__init__"]
    assert [m for m in sorted(modules) if not re.search(rf"\b{m}\b", layout.group(1))] == []
