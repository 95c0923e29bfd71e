"""The documentation site: it builds, its reference names every public name, and the
tutorial's programs run as written and print what the pages say they print."""

from __future__ import annotations

import html
import re
import subprocess
import sys
import zlib
from pathlib import Path

import anyio
import pytest

import stalk
import stalk.events
import stalk.sync

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
TUTORIAL = sorted((DOCS / "tutorial").glob("*.md"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built afresh, as ``make docs`` builds it (warnings are errors)."""
    pytest.importorskip("sphinx", reason="the docs extra is not installed: pip install '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    options = ["-W", "--keep-going", "-E", "-q", "-b", "html", "-d", str(out / "doctrees")]
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", *options, str(DOCS), str(out / "html")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    return out / "html"


def _inventory(site: Path) -> dict[str, str]:
    """``{name: "domain:role"}`` from the site's ``objects.inv`` (Sphinx's format 2)."""
    data = (site / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):  # four text lines, then the zlib-compressed entries
        header_end = data.index(b"\n", header_end) + 1
    entries = zlib.decompress(data[header_end:]).decode("utf-8")
    found = {}
    for line in entries.splitlines():
        match = re.match(r"(\S+)\s+(\S+:\S+)\s+", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_reference_documents_every_public_name(site: Path) -> None:
    inventory = _inventory(site)
    pages = "".join(path.read_text("utf-8") for path in (site / "reference").glob("*.html"))
    expected = (
        [f"stalk.{name}" for name in stalk.__all__]
        + [f"stalk.events.{name}" for name in stalk.events.__all__]
        + [f"stalk.sync.{name}" for name in stalk.sync.__all__]
    )
    missing = [name for name in expected if not inventory.get(name, "").startswith("py:")]
    assert missing == []
    unanchored = [name for name in expected if f'id="{name}"' not in pages]
    assert unanchored == []
    # Errors are documented as exceptions, the rest as what they are.
    assert inventory["stalk.ConnectionLost"] == "py:exception"
    assert inventory["stalk.Connection"] == "py:class"
    assert inventory["stalk.connect"] == "py:function"
    assert inventory["stalk.SpackValue"] == "py:data"


def test_public_aliases_carry_their_own_docs(site: Path) -> None:
    page = (site / "reference" / "spacks.html").read_text("utf-8")
    assert "A value a spack can carry" in page
    assert "str(object=" not in page  # not the docstring of str, the alias's type
    listening = (site / "reference" / "listening.html").read_text("utf-8")
    assert "TypeAliasForwardRef" not in listening


def test_spec_and_changelog_are_included_not_copied(site: Path) -> None:
    for page, source in (("spec", "SPEC.md"), ("changelog", "CHANGELOG.md")):
        stub = (DOCS / f"{page}.md").read_text("utf-8")
        assert f"{{include}} ../{source}" in stub
        assert "\n#" not in stub  # nothing of the file itself is copied in
        shown = html.unescape(re.sub(r"<[^>]+>", "", (site / f"{page}.html").read_text("utf-8")))
        shown = shown.replace("\u2019", "'")  # Sphinx's smart quotes
        text = (ROOT / source).read_text("utf-8")
        headings = re.findall(r"^#{1,3} (.+)$", text, re.MULTILINE)
        assert len(headings) > 3
        for heading in headings:
            assert re.sub(r"[`*]", "", heading) in shown, (page, heading)


def _program_blocks() -> list[tuple[str, int, str, str | None]]:
    """The tutorial's programs: ``(page, index, code, what it prints or None)``.

    A program is a fenced ``python`` block (fragments are ``code-block`` directives). When
    "It prints:" and a ``text`` block follow it, that is exactly its standard output.
    """
    blocks = []
    for path in TUTORIAL:
        text = path.read_text("utf-8")
        pattern = r"```python\n(.*?)```\n(?:\nIt prints:\n\n```text\n(.*?)```\n)?"
        for index, match in enumerate(re.finditer(pattern, text, re.DOTALL)):
            blocks.append((path.stem, index, match.group(1), match.group(2)))
    return blocks


PROGRAMS = _program_blocks()

#: Runs a tutorial program (stdin) on the backend named by argv[1]: anyio.run, the
#: blocking portal and stalk.sync.connect are made to use it, and the program must have
#: used at least one of them.
_RUNNER = """
import functools, sys
import anyio, anyio.from_thread, stalk.sync
backend, used = sys.argv[1], []
def on_backend(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        used.append(function.__name__)
        return function(*args, **{**kwargs, "backend": backend})
    return wrapper
anyio.run = on_backend(anyio.run)
anyio.from_thread.start_blocking_portal = on_backend(anyio.from_thread.start_blocking_portal)
stalk.sync.connect = on_backend(stalk.sync.connect)
exec(compile(sys.stdin.read(), "<tutorial>", "exec"), {"__name__": "__main__"})
sys.exit(0 if used else 3)
"""


def test_every_tutorial_page_has_a_program() -> None:
    pages = {page for page, *_ in PROGRAMS}
    assert pages == {path.stem for path in TUTORIAL} - {"index"}
    assert all(output is not None for *_, output in PROGRAMS)


@pytest.mark.parametrize(
    ("page", "index", "code", "output"),
    PROGRAMS,
    ids=[f"{page}-{index}" for page, index, *_ in PROGRAMS],
)
async def test_tutorial_program_runs_as_written(
    anyio_backend: str, page: str, index: int, code: str, output: str | None
) -> None:
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [sys.executable, "-c", _RUNNER, anyio_backend], input=code.encode(), check=False
        )
    assert result.returncode == 0, result.stderr.decode()
    assert output is not None, "say what the program prints"
    assert result.stdout.decode() == output


def _documented_tree() -> dict[str, str | None]:
    """``{error: its parent}`` from the nested list on the tutorial's errors page."""
    text = (DOCS / "tutorial" / "errors.md").read_text("utf-8")
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for indent, name in re.findall(r"^( *)- \{exc\}`~stalk\.(\w+)`", text, re.MULTILINE):
        depth = len(indent) // 2
        del stack[depth:]
        parents[name] = stack[-1][1] if stack else None
        stack.append((depth, name))
    return parents


def test_error_hierarchy_on_the_errors_page_is_the_real_one() -> None:
    tree = _documented_tree()
    errors = {
        name
        for name in stalk.__all__
        if isinstance(getattr(stalk, name), type) and issubclass(getattr(stalk, name), Exception)
    }
    assert set(tree) == errors
    for name, parent in tree.items():
        cls = getattr(stalk, name)
        stalk_bases = [base.__name__ for base in cls.__bases__ if issubclass(base, Exception)]
        if parent is None:
            assert cls is stalk.StalkError
        else:
            assert stalk_bases[0] == parent, (name, stalk_bases)
