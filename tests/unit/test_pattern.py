"""Regular expressions are compiled at their first use (pattern.py, issue 22): `re`'s
compiler is Python, and the start path's modules compiled 35 patterns at every command's
start, about a ninth of its import time natively."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from nvdriver.pattern import Pattern

SRC = Path(__file__).resolve().parents[2] / "src" / "nvdriver"


def _compiled_at_import(tree: ast.Module) -> list[int]:
    """Lines of `re.compile(...)` run when the module is imported: in the module's or a
    class body's statements, not inside a function."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "compile"
                and isinstance(child.func.value, ast.Name)
                and child.func.value.id == "re"
            ):
                found.append(child.lineno)
            visit(child)

    visit(tree)
    return found


def test_no_module_compiles_a_regular_expression_when_it_is_imported() -> None:
    offenders = [
        f"{path.relative_to(SRC)}:{line}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "pattern.py"
        for line in _compiled_at_import(ast.parse(path.read_text()))
    ]
    assert offenders == [], "use nvdriver.pattern.Pattern: compiled at its first use"


def test_the_rule_sees_a_compile_at_import_and_not_one_in_a_function() -> None:
    source = (
        "import re\nA = re.compile('a')\nclass K:\n    B = re.compile('b')\n"
        "def f():\n    return re.compile('c')\n"
    )
    assert _compiled_at_import(ast.parse(source)) == [2, 4]


def test_a_pattern_is_compiled_at_its_first_match_and_once() -> None:
    broken = Pattern("(unclosed")  # nothing is compiled yet, so nothing fails yet
    with pytest.raises(re.error):
        broken.search("x")
    p = Pattern(r"^(\w+):\s*(-?\d+)\s*$", re.MULTILINE)
    assert p.findall("a: 1\nb: -2\nc: x") == [("a", "1"), ("b", "-2")]
    assert p.compiled is p.compiled
    assert p.compiled.flags & re.MULTILINE


def test_a_pattern_matches_as_re_does() -> None:
    p = Pattern(r"(?P<n>\d+)\.(\d+)")
    text = "v 535.261 and 6.12"
    assert p.match(text) is None
    found = p.search(text)
    assert found is not None and found.group("n") == "535"
    assert p.fullmatch("535.261") is not None and p.fullmatch("535.261x") is None
    assert [m.group(0) for m in p.finditer(text)] == ["535.261", "6.12"]
    assert p.sub("N", text) == "v N and N"
