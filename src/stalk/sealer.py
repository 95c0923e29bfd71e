"""The sending side's output: plaintexts in, the bytes for the transport out.

Theory of operation
-------------------
A :class:`Sealer` owns the sending :class:`~stalk._noise.TransportCipher` and its rekey
policy, and it is the only place where anything is encrypted. The session hands it
cleartext (handshake messages, a refusal) and, once the cipher exists, the plaintexts a
:class:`~stalk.records.RecordWriter` packed. Nothing is encrypted then: plaintexts wait,
first in, first out, until the driver takes output (:meth:`Sealer.take`), and each call
encrypts about one output buffer more (:data:`OUTPUT_FRAMES` Noise messages, about 2 MiB).
So the bytes and nonces on the wire are exactly those of encrypting everything at once,
only the time moves: a large spack is never held as ciphertext all at once, its first
bytes leave while the rest waits, and receiving (which queues PONGs) never encrypts.

Each frame's header is packed in place and its ciphertext encrypted straight into the
output buffer: one copy of each plaintext byte. Each plaintext is encrypted as soon as it
is built, into a buffer sized for what follows it (a flush's size, given with it; the
source's backlog, below), so what is held at once is that buffer and a plaintext or two.
Building a buffer's worth of plaintexts before encrypting them would hold twice that,
about 4 MiB, where glibc's allocator starts giving the heap's top back to the kernel
after each buffer and faulting it in again (7 page faults for each 16 KiB spack).

With channels, the session also attaches the :class:`~stalk.mux.Mux` as a
:class:`PlaintextSource`: when nothing pushed waits, :meth:`Sealer.take` asks it for
plaintexts, built at that moment (which is what makes channels take turns fairly), and
never once a CLOSE was pushed.

Two shortcuts for a lone plaintext flushed when nothing waits to be encrypted (the common
small ``send()``): it is held as it is rather than queued as an iterator of one, and
:meth:`Sealer.take` encrypts it by the same code (:meth:`Sealer.push_one`); or, for a
caller that writes it at once, it is encrypted and handed back there and then
(:meth:`Sealer.seal_one`). ``tests/test_sealer.py`` runs both against the general path:
the same bytes, in the same order.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator
from typing import Final, Protocol

from stalk._noise import TAGLEN, TransportCipher
from stalk.errors import LocalProtocolError, NonceExhausted
from stalk.wire import FRAME_HEADER_LEN, MAX_NOISE_MESSAGE, RECORD_CAPACITY, RecordKind

__all__ = ["OUTPUT_FRAMES", "REKEY_RECORD", "PlaintextSource", "Sealer"]

#: A REKEY record on channel 0 with an empty body: kind, channel, length. Packed plaintexts
#: stop at RECORD_CAPACITY, which keeps room for it in every Noise message.
REKEY_RECORD: Final = bytes((RecordKind.REKEY, 0, 0))
#: Noise messages per output buffer: about 2 MiB of full ones. Small enough that a large
#: spack is never ciphertext all at once; large enough that sealing the next buffer rarely
#: leaves the socket idle: measured against 1 MiB steps, `stalk bench` moved 1 MiB spacks
#: 17-22% faster and 256 KiB batches 13% (both backends).
OUTPUT_FRAMES: Final = 32
#: Buffers smaller than this are joined into one write (a preamble and its first message,
#: many small frames); larger ones are handed out as they are.
_JOIN_BELOW: Final = 64 * 1024
_FRAME: Final = struct.Struct(">H")
#: The most a plaintext grows by when sealed: header, tag, and a REKEY record.
_OVERHEAD: Final = FRAME_HEADER_LEN + TAGLEN + len(REKEY_RECORD)
#: The largest frame: a header and the largest Noise message.
_MAX_FRAME: Final = FRAME_HEADER_LEN + MAX_NOISE_MESSAGE
#: The most plaintext bytes an output buffer holds after its first.
_BUFFER_REST: Final = (OUTPUT_FRAMES - 1) * RECORD_CAPACITY


class PlaintextSource(Protocol):
    """Builds plaintexts only when the sealer asks (:class:`~stalk.mux.Mux`)."""

    def next_plaintext(self) -> bytearray | None:
        """The next plaintext, or ``None`` when nothing can go now."""

    def sendable(self) -> bool:
        """Whether :meth:`next_plaintext` would give one."""

    def contended(self) -> bool:
        """Whether several channels are taking turns (seal one plaintext at a time)."""

    def backlog(self) -> int:
        """About how many bytes the next plaintexts will carry (sizes the output buffer).

        Too little only ends a buffer early; too much costs zeroed bytes given back.
        """


class _Flushed:
    """Plaintexts flushed together, not encrypted yet, with the next one looked ahead.

    :param final: the last plaintext ends with CLOSE (no REKEY may follow it).
    :param size: their bytes, if known (sizes the output buffers; 0: one frame each).
    """

    __slots__ = ("final", "left", "next", "plaintexts")

    def __init__(self, plaintexts: Iterator[bytearray], final: bool, size: int = 0) -> None:
        self.plaintexts = plaintexts
        self.final = final
        self.left = size
        self.next = next(plaintexts, None)


class Sealer:
    """Encrypts flushed plaintexts into frames, in order, as output is taken.

    :param rekey_after_messages: REKEY after this many Noise messages since the last one...
    :param rekey_after_bytes: ...or this many plaintext bytes, whichever comes first.
    """

    __slots__ = (
        "_after_bytes",
        "_after_messages",
        "_bytes",
        "_cipher",
        "_exhausted",
        "_flushed",
        "_lone",
        "_messages",
        "_out",
        "_requested",
        "_source",
        "closed",
        "rekeys",
    )

    def __init__(self, rekey_after_messages: int, rekey_after_bytes: int) -> None:
        self._cipher: TransportCipher | None = None
        self._after_messages = rekey_after_messages
        self._after_bytes = rekey_after_bytes
        self._messages = 0  # Noise messages sealed since the last rekey
        self._bytes = 0  # their plaintext bytes
        self._requested = False
        # Created when something is flushed: an empty deque costs 0.7 KiB per connection.
        self._flushed: deque[_Flushed] | None = None
        # A lone plaintext flushed when nothing else waited (then _flushed is None).
        self._lone: bytearray | None = None
        self._out: list[bytes | bytearray] = []  # ready for the transport, in order
        self._exhausted: NonceExhausted | None = None
        self._source: PlaintextSource | None = None
        #: A plaintext ending with CLOSE was pushed: nothing may follow it.
        self.closed = False
        #: How many times the cipher was rekeyed.
        self.rekeys = 0

    @property
    def cipher(self) -> TransportCipher | None:
        """The sending cipher, once the handshake produced it."""
        return self._cipher

    def start(self, cipher: TransportCipher) -> None:
        """Begin the transport phase with the handshake's sending cipher."""
        self._cipher = cipher

    @property
    def pending(self) -> bool:
        """Whether :meth:`take` has anything."""
        return bool(
            self._out
            or self._flushed
            or self._lone is not None
            or (self._source is not None and not self.closed and self._source.sendable())
        )

    def attach(self, source: PlaintextSource) -> None:
        """Take plaintexts from ``source`` whenever nothing pushed waits (channels' data)."""
        self._source = source

    def add_cleartext(self, data: bytes) -> None:
        """Queue bytes that need no encryption (handshake messages, a refusal)."""
        self._out.append(data)

    def push(self, plaintexts: Iterator[bytearray], *, final: bool = False, size: int = 0) -> None:
        """Queue plaintexts for encryption, after everything queued before them.

        :param final: the last one ends with CLOSE, which must stay the last record (and
            nothing is sent after it, so rekeying then would be pointless).
        :param size: their bytes, if known: output buffers are then sized to hold them
            (up to :data:`OUTPUT_FRAMES` frames each) rather than one frame each.
        :raises ~stalk.LocalProtocolError: no cipher yet, or a CLOSE was pushed already.
        :raises ~stalk.NonceExhausted: the cipher has no nonce left (nothing more is sent).
        """
        if self._exhausted is not None:
            raise self._exhausted
        if self._cipher is None or self.closed:
            raise LocalProtocolError("nothing can be sent now")
        if self._flushed is None:
            self._flushed = deque()
        if self._lone is not None:  # it was flushed first
            self._flushed.append(_Flushed(iter((self._lone,)), final=False))
            self._lone = None
        self._flushed.append(_Flushed(plaintexts, final, size))
        self.closed = final

    @property
    def idle(self) -> bool:
        """Whether a plaintext can be sealed at once: nothing waits, and sending is possible."""
        return (
            not self._out
            and self._lone is None
            and self._flushed is None
            and self._cipher is not None
            and self._exhausted is None
            and not self.closed
        )

    def seal_one(self, plaintext: bytearray) -> bytearray:
        """Encrypt one plaintext (not ending with CLOSE) now; its frame, for the transport.

        The buffer :meth:`push_one` then :meth:`take` would give. Only when :attr:`idle`
        (else the frame would overtake what waits).

        :raises ~stalk.LocalProtocolError: not idle.
        :raises ~stalk.NonceExhausted: the cipher has no nonce left (nothing more is sent).
        """
        if not self.idle:
            raise LocalProtocolError("a plaintext is sealed at once only when nothing waits")
        return self._seal_lone(plaintext)

    def seal_idle(self, plaintext: bytearray) -> bytearray:
        """:meth:`seal_one` for a caller that checked :attr:`idle` itself."""
        return self._seal_lone(plaintext)

    def push_one(self, plaintext: bytearray) -> None:
        """:meth:`push` for one plaintext (not ending with CLOSE), without an iterator."""
        idle = self._lone is None and self._flushed is None
        if idle and self._cipher is not None and self._exhausted is None and not self.closed:
            self._lone = plaintext
            return
        self.push(iter((plaintext,)))

    def request_rekey(self) -> None:
        """Rekey after the next Noise message (the policy does it anyway)."""
        self._requested = True

    def take(self) -> bytes | bytearray:
        """The next buffer for the transport, ``b""`` when there is none.

        Hands out what is encrypted already or, when nothing is, encrypts the next output
        buffer's worth; small buffers are joined into one write of up to about 2 MiB.

        :raises ~stalk.NonceExhausted: the cipher ran out of nonces; what was not
            encrypted is dropped, and nothing more is ever sent.
        """
        out = self._out
        if not out:
            if (lone := self._lone) is not None:
                self._lone = None
                return self._seal_lone(lone)
            if self._flushed:
                sealed = 0
                while self._flushed and sealed < _JOIN_BELOW:  # small flushes share a write
                    sealed += self._seal_next()
            elif self._source is None or self.closed or not self._seal_source():
                return b""  # nothing is taken from the source once CLOSE was pushed
        if len(out) == 1 or len(out[0]) >= _JOIN_BELOW:
            return out.pop(0)
        count = size = 0
        for piece in out:
            if size and (size + len(piece) > OUTPUT_FRAMES * 65_537 or len(piece) >= _JOIN_BELOW):
                break
            count += 1
            size += len(piece)
        joined = b"".join(out[:count])
        del out[:count]
        return joined

    def _rekey_due(self) -> bool:
        """SPEC "Rekey": requested, or the policy's message or byte count is reached."""
        return (
            self._requested
            or self._messages >= self._after_messages
            or self._bytes >= self._after_bytes
        )

    def _seal_lone(self, plaintext: bytearray) -> bytearray:
        """Encrypt ``plaintext`` as a frame in a buffer of its own and return it."""
        cipher = self._cipher
        if cipher is None:  # pragma: no cover - callers checked
            raise LocalProtocolError("nothing to seal")
        rekey = self._count(plaintext, may_rekey=True)
        out = bytearray(_FRAME.pack(len(plaintext) + TAGLEN))
        try:
            out += cipher.encrypt(plaintext)
        except NonceExhausted as exc:
            self._exhausted = exc
            raise
        if rekey:
            self._rekeyed(cipher)
        return out

    def _seal_next(self) -> int:
        """Encrypt up to :data:`OUTPUT_FRAMES` queued plaintexts into one output buffer.

        Each is encrypted as the flush's iterator builds it, into a buffer sized from the
        flush's bytes left; the buffer ends when the next would not fit.

        :returns: the size of that buffer.
        """
        flushed = self._flushed
        if not flushed or (plaintext := flushed[0].next) is None:  # pragma: no cover
            raise LocalProtocolError("nothing to seal")  # (take() seals only what waits)
        size = len(plaintext) + _OVERHEAD
        if (rest := min(flushed[0].left - len(plaintext), _BUFFER_REST)) > 0:
            # Room for the rest of the flush, up to a buffer's worth: its bytes, and the
            # overhead of as many plaintexts as packing fills them into (each but the last
            # more than half full) and one more.
            size += rest + (2 * rest // RECORD_CAPACITY + 2) * _OVERHEAD
        run = self._flushed_run(flushed, plaintext, size)
        del plaintext  # held by the run alone, until sealed
        return self._seal_run(bytearray(size), run)

    def _flushed_run(
        self, flushed: deque[_Flushed], plaintext: bytearray, size: int
    ) -> Iterator[tuple[bytearray, bool]]:
        """``plaintext`` (the first flush's next) and those after it that fit ``size`` bytes.

        Each comes with whether it may carry a REKEY; the flush leaves the queue once all
        its plaintexts are taken.
        """
        entry = flushed[0]
        used = 0  # at least the frames' bytes so far
        for _ in range(OUTPUT_FRAMES):
            entry.next = following = next(entry.plaintexts, None)
            entry.left -= len(plaintext)
            used += len(plaintext) + _OVERHEAD
            yield plaintext, not (entry.final and following is None)
            if following is None:
                flushed.popleft()
                if not flushed:
                    self._flushed = None  # an idle connection holds no empty deque
                return
            if used + len(following) + _OVERHEAD > size:
                return
            plaintext = following

    def _seal_source(self) -> int:
        """Encrypt the source's next plaintexts into one output buffer; its size (0: none).

        Up to :data:`OUTPUT_FRAMES` of them while one channel is sending alone; one while
        several take turns, so each waits behind about one Noise message of the others.
        Each is encrypted as it is built, into a buffer with room for the first and as
        many largest frames as the source's :meth:`~PlaintextSource.backlog` fills; the
        buffer ends when that room does.
        """
        source = self._source
        if source is None:  # pragma: no cover - take() checked
            raise LocalProtocolError("nothing to seal")
        plaintext = source.next_plaintext()
        if plaintext is None:
            return 0
        size = len(plaintext) + _OVERHEAD
        frames = 1
        if not source.contended() and (backlog := source.backlog()):
            frames += min(OUTPUT_FRAMES - 1, -(-backlog // RECORD_CAPACITY))
            size += (frames - 1) * _MAX_FRAME
        run = _source_run(source, plaintext, frames)
        del plaintext  # held by the run alone, until sealed
        return self._seal_run(bytearray(size), run)

    def _seal_run(self, out: bytearray, plaintexts: Iterator[tuple[bytearray, bool]]) -> int:
        """Encrypt each ``(plaintext, may_rekey)`` into ``out`` as a frame, as it comes.

        Queues the part of ``out`` filled for the transport, and returns its size.
        """
        cipher = self._cipher
        if cipher is None:  # pragma: no cover - take() checked
            raise LocalProtocolError("nothing to seal")
        view = memoryview(out)
        offset = 0
        try:
            for plaintext, may_rekey in plaintexts:
                offset = self._seal_frame(cipher, plaintext, view, offset, may_rekey=may_rekey)
        except NonceExhausted as exc:
            self._exhausted = exc
            self._flushed = None
            raise
        finally:
            view.release()  # ``out`` may be resized once no view of it is left
        if offset < len(out):
            del out[offset:]
        self._out.append(out)
        return offset

    def _seal_frame(
        self,
        cipher: TransportCipher,
        plaintext: bytearray,
        out: memoryview,
        offset: int,
        *,
        may_rekey: bool,
    ) -> int:
        """Encrypt one plaintext into ``out`` at ``offset`` as a frame; where it ends.

        Applies the rekey policy: a REKEY record ends the plaintext when one is due, unless
        ``may_rekey`` is false (the plaintext ends with CLOSE, which must stay last).
        """
        rekey = self._count(plaintext, may_rekey=may_rekey)
        size = len(plaintext) + TAGLEN
        _FRAME.pack_into(out, offset, size)
        start = offset + FRAME_HEADER_LEN
        end = start + size
        cipher.encrypt_into(plaintext, out[start:end])
        if rekey:
            self._rekeyed(cipher)
        return end

    def _count(self, plaintext: bytearray, *, may_rekey: bool) -> bool:
        """Count a plaintext about to be sealed; whether it carries a REKEY (appended here).

        The rekey policy: a REKEY record ends the plaintext when one is due, unless
        ``may_rekey`` is false (the plaintext ends with CLOSE, which must stay last).
        """
        self._messages += 1
        self._bytes += len(plaintext)
        rekey = may_rekey and self._rekey_due()
        if rekey:
            plaintext.extend(REKEY_RECORD)
        return rekey

    def _rekeyed(self, cipher: TransportCipher) -> None:
        """The plaintext carrying a REKEY was sealed: the next ones use the new key."""
        cipher.rekey()
        self.rekeys += 1
        self._requested = False
        self._messages = 0
        self._bytes = 0


def _source_run(
    source: PlaintextSource, plaintext: bytearray, frames: int
) -> Iterator[tuple[bytearray, bool]]:
    """``plaintext`` and the source's next ones, each built once the one before is sealed.

    At most ``frames`` of them, and only one while the source is contended.
    """
    while True:
        yield plaintext, True
        frames -= 1
        if not frames or source.contended():
            return
        following = source.next_plaintext()
        if following is None:
            return
        plaintext = following
