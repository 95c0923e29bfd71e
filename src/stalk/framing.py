"""Byte-level framing: the preamble, the responder's verdict, and length-prefixed frames.

Theory of operation
-------------------
The byte stream of a stalk connection is (SPEC "Byte stream"):

- initiator -> responder: ``preamble (8 bytes)``, then frames;
- responder -> initiator: ``verdict (1 byte)``; ``0x00`` is followed by frames, any other
  value by ``reason length (u8) || reason (UTF-8)`` and the end of the connection.

A frame is ``length (u16 big-endian) || body``, the body being exactly one Noise message.
The functions here never look inside a body and never raise on a *partial* input: they
return ``None`` until enough bytes have arrived. They raise only when the bytes that did
arrive can never become valid, so a caller can report the error at the exact frame.

All parsers consume from a shared ``bytearray`` with ``del buf[:n]``; CPython deletes from the
front of a bytearray in O(1) amortized, so a stream of many frames costs linear time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from stalk.wire import (
    FRAME_HEADER_LEN,
    MAGIC,
    MAX_FRAME_BODY,
    MAX_REFUSAL_REASON,
    PATTERNS,
    PREAMBLE_LEN,
    Pattern,
)

__all__ = [
    "FramingError",
    "Preamble",
    "Refusal",
    "encode_frame",
    "encode_preamble",
    "encode_refusal",
    "frame_header",
    "read_frame",
    "read_preamble",
    "read_verdict",
]

_U16: Final = struct.Struct(">H")
#: The verdict byte that accepts the preamble and message 1 (frames follow).
VERDICT_ACCEPT: Final = 0x00


class FramingError(ValueError):
    """Bytes that can never become a valid preamble, verdict or frame.

    Internal: :mod:`stalk.handshake` and :mod:`stalk.session` translate it into the
    public error for the phase in which it happened.
    """


@dataclass(frozen=True, slots=True)
class Preamble:
    """The initiator's cleartext opening: protocol version and Noise pattern."""

    version: int
    pattern: Pattern


@dataclass(frozen=True, slots=True)
class Refusal:
    """A responder's refusal sent instead of handshake message 2 (unauthenticated)."""

    code: int
    reason: str


def encode_preamble(version: int, pattern: Pattern) -> bytes:
    """``MAGIC || version || pattern``: the 8 bytes an initiator sends first."""
    return MAGIC + bytes([version]) + pattern.encode("ascii")


def read_preamble(buf: bytearray) -> tuple[Preamble, bytes] | None:
    """Take the preamble off the front of ``buf``.

    :returns: the parsed preamble and its exact bytes (for the Noise prologue), or ``None``
        if fewer than 8 bytes have arrived.
    :raises FramingError: the magic is wrong (checked as soon as any byte differs, so a
        non-stalk client is rejected at once), or the pattern bytes are not ``XX``/``IK``.
        An unknown *version* is not an error here: the caller refuses it with a reason.
    """
    head = bytes(buf[: len(MAGIC)])
    if head != MAGIC[: len(head)]:
        raise FramingError("not a stalk peer (bad preamble magic)")
    if len(buf) < PREAMBLE_LEN:
        return None
    raw = bytes(buf[:PREAMBLE_LEN])
    pattern_bytes = raw[6:8]
    pattern = next((p for p in PATTERNS if p.encode("ascii") == pattern_bytes), None)
    if pattern is None:
        raise FramingError(f"unknown handshake pattern {pattern_bytes!r} in preamble")
    del buf[:PREAMBLE_LEN]
    return Preamble(version=raw[5], pattern=pattern), raw


def encode_refusal(code: int, reason: str) -> bytes:
    """The bytes of a refusal verdict; ``reason`` is truncated to 255 bytes of UTF-8."""
    if not 1 <= code <= 0xFF:
        raise ValueError(f"refusal code must be 1..255, not {code}")
    data = reason.encode("utf-8")[:MAX_REFUSAL_REASON]
    data = data.decode("utf-8", "ignore").encode("utf-8")  # never cut inside a character
    return bytes([code, len(data)]) + data


def read_verdict(buf: bytearray) -> Refusal | bool | None:
    """Take the responder's verdict off the front of ``buf``.

    :returns: ``True`` for accept (frames follow), a :class:`Refusal`, or ``None`` if the
        verdict is not complete yet.
    :raises FramingError: the refusal reason is not valid UTF-8.
    """
    if not buf:
        return None
    code = buf[0]
    if code == VERDICT_ACCEPT:
        del buf[:1]
        return True
    if len(buf) < 2 or len(buf) < 2 + buf[1]:
        return None
    length = buf[1]
    try:
        reason = bytes(buf[2 : 2 + length]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FramingError("refusal reason is not valid UTF-8") from exc
    del buf[: 2 + length]
    return Refusal(code=code, reason=reason)


def frame_header(length: int) -> bytes:
    """The 2-byte length prefix for a body of ``length`` bytes."""
    if not 0 < length <= MAX_FRAME_BODY:
        raise ValueError(f"frame body must be 1..{MAX_FRAME_BODY} bytes, not {length}")
    return _U16.pack(length)


def encode_frame(body: bytes) -> bytes:
    """``length (u16 BE) || body``."""
    return frame_header(len(body)) + body


def read_frame(buf: bytearray) -> bytes | None:
    """Take one frame off the front of ``buf`` and return its body.

    :returns: the body, or ``None`` if the frame is not complete yet.
    :raises FramingError: the length prefix is zero (no Noise message is empty).
    """
    if len(buf) < FRAME_HEADER_LEN:
        return None
    (length,) = _U16.unpack_from(buf)
    if length == 0:
        raise FramingError("zero-length frame")
    end = FRAME_HEADER_LEN + length
    if len(buf) < end:
        return None
    body = bytes(buf[FRAME_HEADER_LEN:end])
    del buf[:end]
    return body
