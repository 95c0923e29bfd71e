"""The shape of the code: no class grows past one job's size (README "Architecture")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "stalk"
#: Lines of code a class may have, docstrings, comments and blank lines aside.
MAX_CLASS_CODE_LINES = 300


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
                and first.end_lineno is not None
            ):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def class_code_lines(source: str) -> dict[str, int]:
    """Each class of ``source`` (qualified by its enclosing classes): its lines of code."""
    tree = ast.parse(source)
    text = source.splitlines()
    docstrings = _docstring_lines(tree)
    sizes: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef) and child.end_lineno is not None:
                name = prefix + child.name
                sizes[name] = sum(
                    1
                    for number in range(child.lineno, child.end_lineno + 1)
                    if number not in docstrings
                    and (line := text[number - 1].strip())
                    and not line.startswith("#")
                )
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return sizes


def test_the_count_leaves_out_docstrings_comments_and_blank_lines() -> None:
    source = '''
class A:
    """Docstring,
    on two lines."""

    # a comment
    x = 1

    def f(self) -> int:
        """One line."""
        return self.x

    class B:
        y = 2
'''
    assert class_code_lines(source) == {"A": 6, "A.B": 2}


@pytest.mark.parametrize(
    "path", sorted(SOURCE.rglob("*.py")), ids=lambda path: str(path.relative_to(SOURCE))
)
def test_no_class_is_over_300_lines_of_code(path: Path) -> None:
    over = {
        name: size
        for name, size in class_code_lines(path.read_text(encoding="utf-8")).items()
        if size > MAX_CLASS_CODE_LINES
    }
    assert over == {}, f"split these by job (README 'Architecture'): {over}"
