"""Bounded text for spacks: what ``repr(spack)`` and the command line show.

A spack can hold 16 MiB of one value or a million small ones, and the ``repr()`` Python
builds for its values would be as large (a ``bytes`` value's repr up to four times its
size). :func:`render` writes the same text as long as it stays short, and past that shows a
prefix of each ``str`` and ``bytes`` value followed by ``... (N more bytes)`` (or
``characters``) and stops listing a container's values with ``... (N more values)`` once
the text is long enough. Only what is shown is ever turned into text, so rendering costs
time and memory in proportion to the text, not to the spack.

Received spacks hold only :data:`~stalk.spack.Received` values; a spack built locally may
hold anything until it is encoded, so every other object is rendered too, and bounded
(``reprlib``), and containers nested deeper than :data:`~stalk.wire.MAX_DEPTH` (which no
received spack has; a list that contains itself is one) are shown as ``[...]``.

This module is part of the sans-IO core: it does no I/O.
"""

from __future__ import annotations

import reprlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from stalk.wire import MAX_DEPTH

__all__ = ["SUMMARY_CHARS", "VALUE_CHARS", "plural", "render"]

#: The most characters one ``str`` or ``bytes`` value takes in a rendering (its quotes and
#: the ``... (N more bytes)`` note aside).
VALUE_CHARS: Final = 200
#: A rendering adds no further value once it is this long: with one last value and the
#: notes of nested containers, the text stays under 2,600 characters.
SUMMARY_CHARS: Final = 1000
#: Ints wider than this are shown by their width: ``repr`` of a huge int is slow, and
#: raises past 4,300 digits (no spack can carry more than 64 bits anyway).
_INT_BITS: Final = 256

#: Bounded reprs for objects no spack can carry (a locally built spack may hold them).
_OTHER: Final = reprlib.Repr()
_OTHER.maxother = 80
_OTHER.maxstring = 80


def plural(number: int, noun: str) -> str:
    """``noun``, or its plural unless ``number`` is 1."""
    return noun if number == 1 else f"{noun}s"


class _Renderer:
    """Builds the bounded text of a spack's values (see :func:`render`)."""

    def __init__(self, value_chars: int, total_chars: int) -> None:
        self.parts: list[str] = []
        self.left = total_chars
        self.value_chars = value_chars
        self.shortened = False
        self.depth = 0

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.left -= len(text)

    def value(self, value: Any) -> None:
        kind = type(value)
        if kind is str:
            self.sliced(value, len(value), "characters")
        elif kind is bytes:
            self.sliced(memoryview(value), len(value), "bytes")
        elif kind is bytearray or (kind is memoryview and value.c_contiguous):
            self.add(f"{kind.__name__}(")
            data = memoryview(value).cast("B")
            self.sliced(data, len(data), "bytes")
            self.add(")")
        elif kind is list:
            self.items("[", value, len(value), "]", self.value)
        elif kind is tuple:
            self.items("(", value, len(value), ",)" if len(value) == 1 else ")", self.value)
        elif kind is dict:
            self.items("{", value.items(), len(value), "}", self.entry)
        elif kind is array:
            if value:
                self.items(f"array({value.typecode!r}, [", value, len(value), "])", self.value)
            else:
                self.add(f"array({value.typecode!r})")
        elif kind is int and value.bit_length() > _INT_BITS:
            self.add(f"<int of {value.bit_length()} bits>")
        elif value is None or kind in (bool, int, float) or isinstance(value, float):
            self.add(repr(value))  # at most a few dozen characters (Float32 included)
        else:
            self.add(_OTHER.repr(value))

    def entry(self, item: tuple[Any, Any]) -> None:
        self.value(item[0])
        self.add(": ")
        self.value(item[1])

    def sliced(self, value: str | memoryview, length: int, unit: str) -> None:
        """A prefix of ``value`` whose repr fits in ``value_chars``, and what is left."""
        shown = min(length, self.value_chars)
        while True:
            head = value[:shown]
            text = repr(head if isinstance(head, str) else bytes(head))
            if len(text) <= self.value_chars + 3 or shown <= 1:
                break
            shown = max(1, shown * self.value_chars // len(text))
        self.add(text)
        if shown < length:
            self.add(f"... ({length - shown} more {unit})")
            self.shortened = True

    def items(
        self,
        opening: str,
        items: Iterable[Any],
        count: int,
        closing: str,
        show: Callable[[Any], None],
    ) -> None:
        if self.depth > MAX_DEPTH and count:
            self.add(f"{opening}...{closing}")
            self.shortened = True
            return
        self.depth += 1
        self.add(opening)
        for index, item in enumerate(items):
            if index:
                self.add(", ")
            if self.left <= 0:
                self.add(f"... ({count - index} more {plural(count - index, 'value')})")
                self.shortened = True
                break
            show(item)
        self.add(closing)
        self.depth -= 1


def render(
    values: Sequence[Any],
    *,
    value_chars: int = VALUE_CHARS,
    total_chars: int = SUMMARY_CHARS,
) -> tuple[str, bool]:
    """The bounded text ``Spack(...)`` of ``values``, and whether it was shortened.

    Unshortened, the text is exactly what ``Spack(`` + the values' ``repr()`` joined by
    ``, `` + ``)`` would be (for the values receiving produces). Shortened, each ``str`` and
    ``bytes`` value shows about ``value_chars`` characters followed by ``... (N more
    bytes)`` (``characters`` for a string), and a container stops listing its values once
    the text reaches ``total_chars``, with ``... (N more values)``.
    """
    renderer = _Renderer(value_chars, total_chars)
    renderer.items("Spack(", values, len(values), ")", renderer.value)
    return "".join(renderer.parts), renderer.shortened
