"""Reading the command line's values: addresses, keys, sizes, durations, spack values.

The ``type=`` functions the parser calls, the :class:`stalk.Config` the options make, and
the identity file a command names (:func:`_load_identity`).
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import shlex
from pathlib import Path
from typing import Final, TypeAlias

import stalk
from stalk.cli.output import CommandError, escape
from stalk.identity import Identity, PublicIdentity
from stalk.known_peers import stalk_home
from stalk.spack import Spack, SpackValue

#: Where ``stalk listen PORT`` listens: this machine only.
DEFAULT_LISTEN_HOST: Final = "127.0.0.1"
#: How an argument names a unix domain socket: ``unix:/run/app.sock`` (``unix:@name`` for a
#: Linux abstract name).
UNIX_PREFIX: Final = "unix:"

#: How ``connect`` and ``send`` read a value (one function: :func:`parse_value`).
VALUES: Final = (
    "VALUE: a Python literal when it reads as one (42, -1.5, True, None, b'raw', 'text', "
    "[1, 2], (1, 2) for a tuple, {'k': 1}), else the text itself (hello world). Quote a "
    "number to send it as text: \"'42'\"."
)

#: Where a command connects or listens: ``(host, port)``, or a unix socket's path.
_Address: TypeAlias = "tuple[str, int] | str"


def _config(args: argparse.Namespace) -> stalk.Config:
    if args.max_message_size is None:
        return stalk.Config()
    return stalk.Config(max_message_size=args.max_message_size)


def _address(text: str, *, default_host: str | None = None) -> _Address:
    """Where to connect or listen, as an argument names it.

    ``HOST:PORT`` (``[::1]:7417`` for IPv6), ``PORT`` alone given a default host, or
    ``unix:PATH`` (a unix domain socket: the path made absolute; ``unix:@NAME``: a Linux
    abstract name, ``"\\0NAME"``).
    """
    if text.startswith(UNIX_PREFIX):
        path = text[len(UNIX_PREFIX) :]
        if not path or path == "@":
            raise argparse.ArgumentTypeError(f"expected unix:PATH, got {escape(repr(text))}")
        return "\0" + path[1:] if path.startswith("@") else os.path.abspath(path)
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_host is None:
            raise argparse.ArgumentTypeError(
                f"expected HOST:PORT or unix:PATH, got {escape(repr(text))}"
            )
        host, port = default_host, text
    host = host.strip("[]") or (default_host or "")
    if not host:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT or unix:PATH, got {escape(repr(text))}"
        )
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {escape(repr(port))}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} out of range (0-65535)")
    return host, number


def _listen_address(text: str) -> _Address:
    """``[HOST:]PORT`` or ``unix:PATH`` for ``stalk listen``: the host defaults to 127.0.0.1."""
    return _address(text, default_host=DEFAULT_LISTEN_HOST)


def _peer_key(text: str) -> PublicIdentity:
    """The server key given to ``--peer``; a fingerprint is refused with how to get the key."""
    if text.startswith("SHA256:"):
        raise argparse.ArgumentTypeError(
            f"{escape(text)} is a fingerprint, not a key: --peer takes the server's public "
            "key, stalk:..., which 'stalk id' prints on the server (as does the first line "
            "of 'stalk listen')"
        )
    try:
        return PublicIdentity.from_string(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _message_size(text: str) -> int:
    """A ``--max-message-size`` that :class:`stalk.Config` accepts."""
    try:
        size = int(text)
        stalk.Config(max_message_size=size)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return size


def _socket_mode(text: str) -> int:
    """A unix socket file's mode, in octal (``600``, ``0o660``)."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {escape(repr(text))}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text} out of range (0-777)")
    return mode


def _seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {escape(repr(text))}") from None
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text}")
    return seconds


def parse_value(text: str) -> SpackValue:
    """One spack value as ``send`` reads each VALUE and ``connect`` each line (:data:`VALUES`).

    A Python literal (``42``, ``-1.5``, ``b'raw'``, ``[1, 2]``, ``'42'``) is that value;
    any other text is the text itself.
    """
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text
    return value  # type: ignore[no-any-return]


def _send_value(text: str) -> SpackValue:
    """A ``send`` VALUE: :func:`parse_value`, refused at once if a spack cannot carry it."""
    value = parse_value(text)
    try:
        Spack(value).encode()
    except stalk.InvalidSpackValue as exc:
        reason = str(exc).removeprefix("spack element 0: ")
        raise argparse.ArgumentTypeError(f"{escape(text)}: {reason}") from None
    return value


def _identity_path(value: str | None) -> Path:
    return Path(value).expanduser() if value else stalk_home() / "identity"


def _load_identity(path: Path, given: str | None) -> Identity:
    """Our identity from ``path``; a missing one says how to create it."""
    try:
        return Identity.load(path)
    except stalk.IdentityFileError as exc:
        hint = ""
        if not path.exists() and not path.is_symlink():
            command = "stalk keygen" + (f" -f {shlex.quote(given)}" if given else "")
            hint = f"; create one with '{command}'"
        raise CommandError(f"{exc}{hint}") from exc


#: Units a ``--valid`` duration may end with, in seconds.
_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: What ``--valid`` accepts, for its help and its errors.
DURATION_FORMAT: Final = "a number and a unit, s, m, h, d or w: 90m, 24h, 30d; seconds if no unit"


def _duration(text: str) -> int:
    """A ``--valid`` DURATION in whole seconds: ``24h``, ``90m``, ``30d``, ``3600``."""
    number, unit = text.strip(), "s"
    if number[-1:].lower() in _DURATION_UNITS:
        number, unit = number[:-1], number[-1:].lower()
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {escape(repr(text))} ({DURATION_FORMAT})"
        ) from None
    seconds = value * _DURATION_UNITS[unit]
    if not 1 <= seconds <= 100 * 365 * 86400:
        raise argparse.ArgumentTypeError(
            f"a duration must be between 1 second and 100 years, not {escape(text)}"
        )
    return round(seconds)


def _serial(text: str) -> int:
    try:
        serial = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a serial number: {escape(repr(text))}") from None
    if not 0 <= serial < 2**64:
        raise argparse.ArgumentTypeError(f"a serial is between 0 and 2^64-1, not {serial}")
    return serial


def _key_argument(text: str) -> PublicIdentity:
    """A stalk key named on the command line; a fingerprint is refused with how to get the key."""
    if text.startswith("SHA256:"):
        raise argparse.ArgumentTypeError(
            f"{escape(text)} is a fingerprint, not a key: give the public key, stalk:..., "
            "which 'stalk id' prints"
        )
    try:
        return PublicIdentity.from_string(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tcp_only(address: _Address, command: str) -> tuple[str, int]:
    """``HOST:PORT``: the online authority serves and is reached over TCP only."""
    if isinstance(address, str):
        raise CommandError(f"{command} works over TCP: give HOST:PORT, not unix:PATH")
    return address
