"""Sphinx configuration for stalk's documentation site (``make docs``).

Sphinx, because stalk's docstrings are already written for it (``:param:``, ``:raises:``
and ``:class:`` roles), so autodoc renders them as they are; MyST so that the tutorial,
SPEC.md and CHANGELOG.md are Markdown, the last two included from the repository root.
"""

from __future__ import annotations

import enum
import sys
import typing
from typing import Any

import sphinx.util.inspect
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

import stalk

project = "stalk"
author = "the stalk authors"
copyright = "the stalk authors"
release = stalk.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
# docs/design/ holds design notes that are not part of the site yet.
exclude_patterns = ["_build", "design"]

# Markdown: GitHub-style anchors for headings, so SPEC.md's contents links work here too.
myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

# The reference: members in source order, signatures with their annotations.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "both"  # a class's docstring, then its initializer's
# The public aliases by name in signatures, instead of what they expand to.
autodoc_type_aliases = {
    name: name
    for name in (
        "Authorize",
        "ChannelHandler",
        "ConnectionHandler",
        "MessageHandler",
        "Received",
        "SpackValue",
    )
}
# Sphinx writes an alias inside a union or a generic (``Authorize | None``) by the repr of
# its placeholder, ``TypeAliasForwardRef('Authorize')``: its name is what belongs there.
# Before 9.0 the placeholder could not be part of a union at all (sphinx-doc/sphinx#14004),
# which left every annotation of such a signature unevaluated.
_AliasRef: Any = sphinx.util.inspect.TypeAliasForwardRef
_AliasRef.__repr__ = lambda self: str(self.name)
if "__or__" not in vars(_AliasRef):
    _AliasRef.__or__ = lambda self, other: typing.Union[self, other]  # noqa: UP007
    _AliasRef.__ror__ = lambda self, other: typing.Union[other, self]  # noqa: UP007
add_module_names = False
python_display_short_literal_types = True
python_maximum_signature_line_length = 80  # longer: one parameter a line

# Code blocks without a language (SPEC's diagrams and byte layouts) are plain text.
highlight_language = "none"

html_theme = "furo"
html_title = f"stalk {release}"
html_static_path: list[str] = []

# Every cross-reference must resolve, except to what the site does not document: the
# standard library and the dependencies (no intersphinx: the build works offline) and
# stalk's implementation modules, which docstrings name for readers of the code.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(collections\.abc|contextlib|os|pathlib|types|typing)\..*"),
    (r"py:.*", r"(anyio|cryptography|msgpack)(\..*)?"),
    (r"py:mod", r"stalk\..*"),
    # The type variables of Spack.unpack's overloads: private, nothing to link to.
    (r"py:class", r"stalk\.spack\._T\d"),
]


#: Classes made by a function, not by calling them: their signature is not shown (nor
#: an enum's, whose members are all there is).
NO_PUBLIC_INITIALIZER = {
    "stalk.Channel",
    "stalk.Connection",
    "stalk.Listener",
    "stalk.sync.SyncConnection",
}

_log = logging.getLogger("stalk.docs")


def _hide_signature(  # noqa: PLR0917 - the arguments Sphinx passes
    app: Sphinx,
    what: str,
    name: str,
    obj: object,
    options: object,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    """Show no constructor arguments for enums and :data:`NO_PUBLIC_INITIALIZER`."""
    is_enum = isinstance(obj, type) and issubclass(obj, enum.Enum)
    if what == "class" and (is_enum or name in NO_PUBLIC_INITIALIZER):
        return "", None
    return None


def _data_docs(  # noqa: PLR0917 - the arguments Sphinx passes
    app: Sphinx, what: str, name: str, obj: object, options: Any, lines: list[str]
) -> None:
    """Document a public variable or type alias from its ``#:`` comment.

    ``stalk.SpackValue`` and the like are re-exported values (a string, a ``Callable``),
    so autodoc finds no docstring of theirs (or the one of ``str``): their doc comment is
    in the module that defines them. A public name without one fails the build.
    """
    if what != "data" or not name.startswith("stalk."):
        return
    home, _, short = name.rpartition(".")
    if ("", short) in ModuleAnalyzer.for_module(home).find_attr_docs():
        return  # documented where it is documented: autodoc found it
    for module in sorted(m for m in sys.modules if m.startswith("stalk.")):
        docs = ModuleAnalyzer.for_module(module).find_attr_docs().get(("", short))
        if docs:
            lines[:] = [*docs, ""]
            break
    else:
        _log.warning("%s has no #: doc comment where it is defined", name)
        return
    if isinstance(obj, str) and short != "__version__":  # an alias written as a string
        lines.extend([f"Alias of ``{obj}``.", ""])


def _alias_reference(app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: Any) -> Any:
    """Resolve an annotation naming a public alias (``SpackValue``) to its entry.

    Annotations are looked up as classes, and an alias is documented as data; Sphinx 9
    falls back from one to the other by itself, earlier versions do not.
    """
    target = node.get("reftarget", "").removeprefix("stalk.")
    if node.get("refdomain") != "py" or target not in autodoc_type_aliases:
        return None
    python = env.get_domain("py")
    return python.resolve_xref(
        env, node["refdoc"], app.builder, "data", f"stalk.{target}", node, contnode
    )


def setup(app: Sphinx) -> None:
    """Connect the hooks above."""
    app.connect("autodoc-process-signature", _hide_signature)
    app.connect("autodoc-process-docstring", _data_docs)
    app.connect("missing-reference", _alias_reference)
