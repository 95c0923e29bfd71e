"""The ``stalk`` command line: keys, a listener, a client, the demo and the vector runner.

Every command uses only the public API and runs on asyncio or trio (``--backend``; the
global options ``--backend`` and ``-v`` are accepted before or after the command). An
expected failure is one readable line on stderr (``stalk: error: ...``) and exit status
1, never a traceback: an exception group from an anyio task group is reduced to the
errors inside it, and log records (the ``stalk`` logger's warnings, or with ``-v``/``-vv``
its INFO/DEBUG records too) are single lines as well. Ctrl-C ends any command with status
130 and standard output closed early (``stalk id | true``) with 141, both silently; a
usage error is argparse's status 2. :data:`EXIT_STATUSES` lists them for ``--help``.

An address is ``HOST:PORT`` (``[::1]:7417`` for IPv6), or ``unix:PATH`` for a unix domain
socket (``unix:@NAME`` for a Linux abstract name), in arguments and in everything the
commands print; known_peers keeps a unix socket's key under its absolute path.

Everything a peer chooses is untrusted text: a refusal reason (not even authenticated),
a CLOSE reason, the error messages that quote them, and the contents of spacks. The
command line writes such text only through :func:`escape`, which shows every character
that Python's ``repr()`` would escape as an escape sequence (``\\x1b``, ``\\u202e``), so
a peer cannot move the cursor, ring the bell, retitle the terminal, forge extra lines or
reorder a line with bidirectional controls.

Received spacks are printed as :func:`summarize` makes them (``stalk listen``, ``connect``
and ``send --wait`` alike): their bounded ``repr()`` (each ``str``/``bytes`` value
shortened to about :data:`~stalk.summary.VALUE_CHARS` characters and the line to about
:data:`~stalk.summary.SUMMARY_CHARS`) with the spack's size, built without ever making
the text of a whole large value. ``--full`` prints every value's whole ``repr()``
(:func:`full_text`), escaped the same way. ``--max-message-size`` sets
:attr:`stalk.Config.max_message_size`, the largest spack the peer may send us.

The package is cut by job, each module importing only the ones above it:

- :mod:`stalk.cli.output`: what the command line writes (peer text, errors, log lines),
  the exit statuses, and running a command on the event loop;
- :mod:`stalk.cli.values`: reading the command line's values (addresses, keys, spacks);
- :mod:`stalk.cli.keys`: ``keygen``, ``id``, ``forget``;
- :mod:`stalk.cli.authorities`: ``authority ...`` and ``cert ...``, and certificate trust;
- :mod:`stalk.cli.network`: ``listen``, ``connect``, ``send``;
- :mod:`stalk.cli.tools`: ``demo``, ``vectors``, ``bench``;
- :mod:`stalk.cli.parser`: the argparse parser;
- this module: :func:`main`, and the names tests and callers import from ``stalk.cli``.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence

from stalk.cli.output import (
    _OUTPUT,
    ANSWER_CHARS,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT_CLOSED,
    EXIT_STATUSES,
    EXIT_USAGE,
    SIZE_VALUES,
    _logging,
    _report,
    encoded_size,
    escape,
    full_text,
    summarize,
)
from stalk.cli.parser import _resolve_globals, build_parser
from stalk.cli.values import VALUES, parse_value

__all__ = [
    "ANSWER_CHARS",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_OUTPUT_CLOSED",
    "EXIT_STATUSES",
    "EXIT_USAGE",
    "SIZE_VALUES",
    "VALUES",
    "_logging",
    "_resolve_globals",
    "build_parser",
    "encoded_size",
    "escape",
    "full_text",
    "main",
    "parse_value",
    "summarize",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stalk`` console script; returns the exit status.

    Usage errors exit through ``SystemExit`` (status 2) as argparse does; every other
    ending is a status from :data:`EXIT_STATUSES`.
    """
    _OUTPUT.reset()
    for stream in (sys.stdout, sys.stderr):
        # Printable text a terminal's encoding cannot represent is escaped, not an error.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
        _resolve_globals(args)
        with _logging(args.verbose):
            status = int(args.run(args))
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 -- every failure is one line, never a traceback
        return _report(exc)
    return EXIT_OUTPUT_CLOSED if _OUTPUT.closed else status
