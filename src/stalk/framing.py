"""Byte-level framing: the preamble, the responder's verdict, and length-prefixed frames.

Theory of operation
-------------------
The byte stream of a stalk connection is (SPEC "Byte stream"):

- initiator -> responder: ``preamble (8 bytes)``, then frames;
- responder -> initiator: ``verdict (1 byte)``; ``0x00`` is followed by frames, any other
  value by ``reason length (u8) || reason (UTF-8)`` and the end of the connection.

A frame is ``length (u16 big-endian) || body``, the body being exactly one Noise message.

:class:`FrameReader` is the one reader of that stream, for the handshake and the transport
phase alike. It never looks inside a frame body and never raises on a *partial* input: it
returns ``None`` until enough bytes have arrived, and raises only when the bytes that did
arrive can never become valid, so the caller reports the error at the exact frame.
"""

from __future__ import annotations

import struct
from collections import deque
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
    "VERDICT_MAX",
    "FrameReader",
    "FramingError",
    "Preamble",
    "Refusal",
    "encode_frame",
    "encode_preamble",
    "encode_refusal",
    "frame_header",
]

_U16: Final = struct.Struct(">H")
#: The verdict byte that accepts the preamble and message 1 (frames follow).
VERDICT_ACCEPT: Final = 0x00
#: The most bytes a verdict takes: the code, the reason's length and the longest reason.
VERDICT_MAX: Final = 2 + MAX_REFUSAL_REASON


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
    """A responder's refusal sent instead of handshake message 2 (unauthenticated).

    ``received`` is the start of the stream the refusal was read from (at most
    :data:`VERDICT_MAX` bytes, the refusal first): what a non-stalk service answered when
    its first byte merely looks like a refusal code.
    """

    code: int
    reason: str
    received: bytes


def encode_preamble(version: int, pattern: Pattern) -> bytes:
    """``MAGIC || version || pattern``: the 8 bytes an initiator sends first."""
    return MAGIC + bytes([version]) + pattern.encode("ascii")


def encode_refusal(code: int, reason: str) -> bytes:
    """The bytes of a refusal verdict; ``reason`` is truncated to 255 bytes of UTF-8."""
    if not 1 <= code <= 0xFF:
        raise ValueError(f"refusal code must be 1..255, not {code}")
    data = reason.encode("utf-8")[:MAX_REFUSAL_REASON]
    data = data.decode("utf-8", "ignore").encode("utf-8")  # never cut inside a character
    return bytes([code, len(data)]) + data


def frame_header(length: int) -> bytes:
    """The 2-byte length prefix for a body of ``length`` bytes."""
    if not 0 < length <= MAX_FRAME_BODY:
        raise ValueError(f"frame body must be 1..{MAX_FRAME_BODY} bytes, not {length}")
    return _U16.pack(length)


def encode_frame(body: bytes) -> bytes:
    """``length (u16 BE) || body``."""
    return frame_header(len(body)) + body


class FrameReader:
    """Received bytes in; the preamble, the verdict and frames out (both phases).

    Unconsumed bytes are ``_in[_pos:]`` followed by the chunks in ``_more``. Chunks are kept
    as the ``bytes`` they came in and a frame is handed out as a place in one of them, so
    frames are decrypted straight out of the received chunks; only a frame split across
    chunks is copied, alone, to join its pieces. The preamble and the verdict are read
    from a copy of the stream's first bytes (at most 8 and 257 of them).
    """

    __slots__ = ("_in", "_more", "_pos", "eof")

    def __init__(self) -> None:
        self._in: bytes | bytearray | memoryview = b""
        self._pos = 0
        # Created when a second chunk waits: an empty deque costs 0.7 KiB per connection.
        self._more: deque[bytes | memoryview] | None = None
        #: The transport reached its end: no byte follows what is buffered.
        self.eof = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer a chunk (``b""`` marks EOF); the caller may reuse a bytearray it passed."""
        if not data:
            self.eof = True
            return
        chunk = data if type(data) is bytes else bytes(data)
        if self._pos == len(self._in) and not self._more:
            self._in, self._pos = chunk, 0
        elif self._more is None:
            self._more = deque((chunk,))
        else:
            self._more.append(chunk)

    @property
    def buffered(self) -> bool:
        """Whether any received byte is not consumed yet (``unconsumed``, without counting)."""
        return self._pos < len(self._in) or bool(self._more)

    @property
    def unconsumed(self) -> int:
        """Received bytes not consumed yet."""
        return len(self._in) - self._pos + sum(map(len, self._more or ()))

    def discard(self) -> None:
        """Forget every buffered byte (nothing after the peer's CLOSE is read)."""
        self._in, self._pos = b"", 0
        self._more = None

    def peek(self, size: int) -> bytes:
        """Up to ``size`` unconsumed bytes, copied, without consuming them."""
        head = bytes(memoryview(self._in)[self._pos : self._pos + size])
        for chunk in self._more or ():
            if len(head) >= size:
                break
            head += bytes(memoryview(chunk)[: size - len(head)])
        return head

    def _consume(self, size: int) -> None:
        while size:
            available = len(self._in) - self._pos
            if size < available:
                self._pos += size
                return
            size -= available
            self._in, self._pos = (self._more.popleft(), 0) if self._more else (b"", 0)
            if not self._more:
                self._more = None

    def preamble(self) -> tuple[Preamble, bytes] | None:
        """Take the preamble.

        :returns: the parsed preamble and its exact bytes (for the Noise prologue), or
            ``None`` if fewer than 8 bytes have arrived.
        :raises FramingError: the magic is wrong (checked as soon as any byte differs, so
            a non-stalk client is rejected at once), or the pattern bytes are not
            ``XX``/``IK``. An unknown *version* is not an error here: the caller refuses it
            with a reason.
        """
        raw = self.peek(PREAMBLE_LEN)
        if raw[: len(MAGIC)] != MAGIC[: len(raw)]:
            raise FramingError("not a stalk peer (bad preamble magic)")
        if len(raw) < PREAMBLE_LEN:
            return None
        pattern_bytes = raw[6:8]
        pattern = next((p for p in PATTERNS if p.encode("ascii") == pattern_bytes), None)
        if pattern is None:
            raise FramingError(f"unknown handshake pattern {pattern_bytes!r} in preamble")
        self._consume(PREAMBLE_LEN)
        return Preamble(version=raw[5], pattern=pattern), raw

    def verdict(self) -> Refusal | bool | None:
        """Take the responder's verdict.

        :returns: ``True`` for accept (frames follow), a :class:`Refusal`, or ``None`` if
            the verdict is not complete yet.
        :raises FramingError: the refusal reason is not valid UTF-8.
        """
        head = self.peek(VERDICT_MAX)
        if not head:
            return None
        if head[0] == VERDICT_ACCEPT:
            self._consume(1)
            return True
        if len(head) < 2 or len(head) < 2 + head[1]:
            return None
        length = head[1]
        try:
            reason = head[2 : 2 + length].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FramingError("refusal reason is not valid UTF-8") from exc
        self._consume(2 + length)
        return Refusal(code=head[0], reason=reason, received=head)

    def frame_length(self) -> int | None:
        """The next frame's body length, once its header has arrived (nothing consumed)."""
        head = self.peek(FRAME_HEADER_LEN)
        return _U16.unpack(head)[0] if len(head) == FRAME_HEADER_LEN else None

    def frame(self) -> tuple[bytes | bytearray | memoryview, int, int] | None:
        """Take the next complete frame: ``(buffer, start, end)`` of its body, or ``None``.

        The buffer is the received chunk itself (or the copy that joined a split frame);
        the caller reads ``buffer[start:end]`` and nothing here writes to it again.

        :raises FramingError: a zero-length frame (no Noise message is empty).
        """
        while True:
            buf, pos = self._in, self._pos
            available = len(buf) - pos
            if available >= FRAME_HEADER_LEN:
                (length,) = _U16.unpack_from(buf, pos)
                if length == 0:
                    raise FramingError("zero-length frame")
                end = pos + FRAME_HEADER_LEN + length
                if end <= len(buf):
                    if end == len(buf) and not self._more:
                        self._in, self._pos = b"", 0
                    else:
                        self._pos = end
                    return buf, pos + FRAME_HEADER_LEN, end
            if not self._more:
                if pos:
                    # Keep only the start of the next frame, not the chunk it came in.
                    self._in, self._pos = bytes(memoryview(buf)[pos:]), 0
                return None
            if available:
                self._join_split_frame()
            else:
                self._in, self._pos = self._more.popleft(), 0
                if not self._more:
                    self._more = None  # an idle connection holds no empty deque

    def _join_split_frame(self) -> None:
        """Copy the frame that starts at ``_pos`` and goes on in ``_more`` into one buffer.

        Takes exactly the bytes that frame needs (or all there are): the copy is at most
        one frame, whatever the chunk sizes.
        """
        if type(self._in) is bytearray and not self._pos:
            joined = self._in  # a frame being joined already: grow it in place (a trickle)
        else:
            joined = bytearray(memoryview(self._in)[self._pos :])
        more = self._more
        while more:
            if len(joined) < FRAME_HEADER_LEN:
                need = FRAME_HEADER_LEN - len(joined)
            else:
                need = FRAME_HEADER_LEN + _U16.unpack_from(joined)[0] - len(joined)
            if need <= 0:
                break
            chunk = more[0]
            if len(chunk) <= need:
                joined += chunk
                more.popleft()
            else:
                with memoryview(chunk) as view:
                    joined += view[:need]
                more[0] = memoryview(chunk)[need:]
        self._in, self._pos = joined, 0
        if not more:
            self._more = None
