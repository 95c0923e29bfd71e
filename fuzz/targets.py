"""Fuzz entry points over stalk's receive path, with the keys in the harness.

Each target is a pure function of one ``bytes`` input: it builds fresh sessions with fixed
static and ephemeral keys (so every run is reproducible from the input alone), feeds the
input where a hostile peer's bytes would go, and checks invariants. A target returns
normally when stalk behaved; it raises when stalk did not:

- a StalkError is expected behaviour for hostile input and is caught here;
- any other exception escaping stalk is a bug and propagates unchanged;
- :class:`Bug` (an AssertionError) reports a broken invariant: a wrong error type, a
  delivered spack that was never sent or does not re-encode canonically, an answer to a
  rejected message...

Because the keys are fixed, a valid transcript recorded here *replays*: a responder built
with the recorded ephemeral key accepts the recorded initiator bytes, so a fuzzer that
mutates the seeds (:func:`seeds`) gets past the handshake and the AEAD into the transport
phase. The transport targets go further: their input is a *plaintext*, which the harness
encrypts with the session's real transport key (taken from a live session once, and
checked against that session's own cipher), so every input reaches the record parser.

Targets (see :data:`TARGETS`):

- :func:`fuzz_preamble`: an initiator's first bytes, checked against an independent model
  of the preamble rules (SPEC "Preamble"), fed whole and in two chunks;
- :func:`fuzz_handshake_responder`: the initiator's byte stream, to a responder;
- :func:`fuzz_handshake_initiator`: the responder's byte stream, to an XX and an IK
  initiator that each sent a real message 1;
- :func:`fuzz_transport_records`: one transport plaintext, to an open session;
- :func:`fuzz_transport_messages`: several plaintexts (``u16`` length-prefixed), encrypted
  with consecutive nonces, following REKEY records, to one open session;
- :func:`fuzz_spack`: :func:`~stalk.spack.decode_spack`, checked against an independent
  implementation of the SPEC's validity rules on top of plain msgpack.

The transport targets compare everything the session did (events, error type, and the
records it sent back, decrypted with its own key) with an independent model of SPEC
"Records", "Messages, batching and fragmentation" and "Error handling".

This module must stay importable without atheris or hypothesis: ``fuzz/run_atheris.py``
and ``tests/test_fuzz.py`` drive it.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stalk.errors import (
    ConnectionLost,
    HandshakeFailed,
    MalformedSpack,
    MessageLimitExceeded,
    ProtocolError,
    StalkError,
)
from stalk.events import (
    NEED_DATA,
    PAUSED,
    CloseReceived,
    Event,
    HandshakeComplete,
    MessageReceived,
    PeerIdentified,
    PongReceived,
)
from stalk.identity import Identity
from stalk.reassembly import JOIN_LIMIT as JOIN
from stalk.session import Role, Session, SessionConfig
from stalk.spack import Float32, Spack, SpackDecoder, decode_spack
from stalk.wire import Pattern

__all__ = [
    "TARGETS",
    "Bug",
    "Target",
    "fuzz_handshake_initiator",
    "fuzz_handshake_responder",
    "fuzz_preamble",
    "fuzz_spack",
    "fuzz_transport_messages",
    "fuzz_transport_records",
    "same_value",
    "seeds",
]

CLIENT: Final = Identity.from_private_bytes(hashlib.sha256(b"fuzz client static").digest())
SERVER: Final = Identity.from_private_bytes(hashlib.sha256(b"fuzz server static").digest())
CLIENT_EPHEMERAL: Final = hashlib.sha256(b"fuzz client ephemeral").digest()
SERVER_EPHEMERAL: Final = hashlib.sha256(b"fuzz server ephemeral").digest()

#: The transport targets' receiver advertises the smallest limit SPEC allows, so that the
#: MESSAGE_TOO_LARGE path is reachable with small inputs.
RECEIVER_LIMIT: Final = 1024
MAX_PLAINTEXT: Final = 65_519
MAX_MESSAGES: Final = 64
MAX_NONCE: Final = 2**64 - 1

# Record kinds and close codes, written out here rather than imported: the models below
# are meant to be independent of stalk's code.
MESSAGE, FRAGMENT, CLOSE, PING, PONG, REKEY, READY = range(1, 8)
NORMAL, DECRYPT_FAILED, PROTOCOL_ERROR, MESSAGE_TOO_LARGE, INVALID_KEY = 0, 2, 5, 6, 10
#: SPEC "Canonical keys": the field prime, and the canonical low-order u-coordinates.
P25519: Final = 2**255 - 19
LOW_ORDER_U: Final = frozenset(
    {
        0,
        1,
        P25519 - 1,
        int.from_bytes(
            bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
            "little",
        ),
        int.from_bytes(
            bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
            "little",
        ),
    }
)


def bad_key(raw: bytes) -> bool:
    """Whether 32 bytes are no canonical, usable X25519 key (SPEC "Canonical keys")."""
    u = int.from_bytes(raw, "little")
    return u >= P25519 or u in LOW_ORDER_U


class Bug(AssertionError):
    """stalk broke an invariant on this input."""


class Target(Protocol):
    """A fuzz target: returns if stalk behaved on ``data``, raises if not."""

    def __call__(self, data: bytes) -> None: ...


def check(condition: object, message: str) -> None:
    """Raise :class:`Bug` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise Bug(message)


# -- type-exact comparison and canonical re-encoding -----------------------------------------------


def same_value(a: object, b: object) -> bool:
    """Equality that also requires equal types everywhere (1 is not True, nor 1.0).

    Floats compare by their bits, so NaNs compare equal to themselves.
    """
    if type(a) is not type(b):
        return False
    if isinstance(a, Spack) and isinstance(b, Spack):
        return same_value(list(a), list(b))
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple))
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        keys_a = [(type(k), k) for k in a]
        keys_b = [(type(k), k) for k in b]
        return keys_a == keys_b and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, array):
        assert isinstance(b, array)
        return a.typecode == b.typecode and a.tobytes() == b.tobytes()
    return a == b


def check_canonical(spack: Spack) -> bytes:
    """A decoded spack must re-encode, decode to itself, and re-encode to the same bytes."""
    try:
        encoded = spack.encode()
    except StalkError as exc:
        raise Bug(f"a decoded spack does not re-encode: {exc!r}: {spack!r}") from exc
    try:
        again = decode_spack(encoded)
    except StalkError as exc:
        raise Bug(f"a re-encoded spack does not decode: {exc!r}: {spack!r}") from exc
    check(same_value(list(again), list(spack)), f"re-encoding changed {spack!r} to {again!r}")
    check(again.encode() == encoded, f"re-encoding {spack!r} is not a fixed point")
    return encoded


# -- driving sessions ------------------------------------------------------------------------------


def new_session(
    role: Role, pattern: Pattern = "XX", config: SessionConfig | None = None
) -> Session:
    """A session with the fixed keys; an initiator pins SERVER for IK."""
    if role is Role.INITIATOR:
        return Session(
            Role.INITIATOR,
            CLIENT,
            peer=SERVER.public if pattern == "IK" else None,
            config=config,
            ephemeral_for_testing_only=CLIENT_EPHEMERAL,
        )
    return Session(
        Role.RESPONDER, SERVER, config=config, ephemeral_for_testing_only=SERVER_EPHEMERAL
    )


def take_all(session: Session) -> bytes:
    """Everything the session has to send now: data_to_send() until it returns b"".

    tests/helpers.take_all, which this file cannot import.
    """
    pieces: list[bytes | bytearray] = []
    while data := session.data_to_send():
        pieces.append(data)
    return b"".join(pieces)


@dataclass
class Run:
    """What a session did with some input."""

    events: list[Event] = field(default_factory=list)
    error: StalkError | None = None
    #: Whether the error was raised before EOF was fed.
    error_before_eof: bool = False
    output: bytes = b""


def pull(session: Session, run: Run) -> None:
    """Take every event now available (accepting any identified peer)."""
    while True:
        event = session.next_event()
        if event is NEED_DATA:
            return
        if event is PAUSED:
            run.output += take_all(session)  # what it owes, then it reads on
            continue
        if isinstance(event, CloseReceived):
            if event not in run.events:
                run.events.append(event)
            return
        check(
            not any(isinstance(e, CloseReceived) for e in run.events),
            f"{event!r} after a CLOSE",
        )
        run.events.append(event)
        if isinstance(event, PeerIdentified):
            session.accept()


def drive(session: Session, chunks: Iterable[bytes], *, eof: bool = True) -> Run:
    """Feed ``chunks`` then EOF; stop at the first StalkError (anything else propagates)."""
    run = Run()
    at_eof = False
    try:
        for chunk in chunks:
            if chunk:  # an empty chunk would mean EOF
                session.receive_data(chunk)
                pull(session, run)
        run.output += take_all(session)
        if eof:
            at_eof = True
            session.receive_data(b"")
            pull(session, run)
    except StalkError as exc:
        run.error = exc
        run.error_before_eof = not at_eof
        try:
            session.next_event()
        except StalkError as again:
            check(again is exc, f"the error changed from {exc!r} to {again!r}")
        else:
            raise Bug(f"next_event() returned after {exc!r}") from exc
    run.output += take_all(session)
    return run


def split_point(data: bytes) -> int:
    """A data-dependent (so reproducible) place to cut ``data`` in two."""
    if len(data) < 2:
        return len(data)
    return 1 + int.from_bytes(hashlib.sha256(data).digest()[:4], "big") % (len(data) - 1)


def same_run(a: Run, b: Run, what: str) -> None:
    """Chunking must not change what a session does."""
    check(a.events == b.events, f"{what}: events differ with chunking: {a.events} / {b.events}")
    check(
        type(a.error) is type(b.error),
        f"{what}: errors differ with chunking: {a.error!r} / {b.error!r}",
    )


# -- seed transcripts ------------------------------------------------------------------------------

SEED_SPACKS: Final = (
    Spack(None, True, 0, -1, 2**64 - 1, 1.5, Float32(0.25), "é", b"\x00"),
    Spack([1, [2]], (3, "t"), {"k": b"v", b"k": None}, array("i", [1, -1])),
    Spack(),
    Spack("batched", 1),
    Spack("batched", 2),
    Spack("after rekey", b"x" * 300),
)
SEED_PINGS: Final = (b"ping", b"")
SEED_CLOSE_REASON: Final = "seed done"


@dataclass(frozen=True)
class Transcript:
    """Every byte each side of a seed session wrote."""

    c2s: bytes
    s2c: bytes


@functools.cache
def transcript(pattern: Pattern) -> Transcript:
    """Record a complete session in both directions with the same script.

    Both sides send :data:`SEED_SPACKS` (some batched, a REKEY before the last), ping each
    other, and close.
    """
    client = new_session(Role.INITIATOR, pattern)
    server = new_session(Role.RESPONDER, pattern)
    wire = {Role.INITIATOR: bytearray(), Role.RESPONDER: bytearray()}

    def pump() -> None:  # tests/helpers.pump, which fuzz/ cannot import
        moved = True
        while moved:
            moved = False
            for src, dst, role in (
                (client, server, Role.INITIATOR),
                (server, client, Role.RESPONDER),
            ):
                data = take_all(src)
                if data:
                    moved = True
                    wire[role] += data
                    dst.receive_data(data)
                    pull(dst, Run())

    pump()
    for session in (client, server):
        session.send(SEED_SPACKS[0])
        session.send(SEED_SPACKS[1])
        session.send(SEED_SPACKS[2])
        session.queue(SEED_SPACKS[3])
        session.queue(SEED_SPACKS[4])
        session.flush()
        for payload in SEED_PINGS:
            session.ping(payload)
        pump()
        session.request_rekey()
        session.send(SEED_SPACKS[5])
        pump()
    for session in (client, server):
        session.close(0, SEED_CLOSE_REASON)
        pump()
    return Transcript(bytes(wire[Role.INITIATOR]), bytes(wire[Role.RESPONDER]))


def check_seeded_run(run: Run, peer: Identity, what: str) -> None:
    """Invariants of a session fed (a mutation of) a seed transcript."""
    for event in run.events:
        if isinstance(event, (PeerIdentified, HandshakeComplete)):
            # Only the holder of the private key can authenticate; the fuzzer is not it.
            check(event.peer == peer.public, f"{what}: authenticated a stranger: {event!r}")
    delivered = [e.spack for e in run.events if isinstance(e, MessageReceived)]
    for index, spack in enumerate(delivered):
        check_canonical(spack)
        check(
            index < len(SEED_SPACKS) and same_value(list(spack), list(SEED_SPACKS[index])),
            f"{what}: delivered spack {index} was never sent in that position: {spack!r}",
        )
    pongs = [e.payload for e in run.events if isinstance(e, PongReceived)]
    check(list(SEED_PINGS[: len(pongs)]) == pongs, f"{what}: unexpected pongs {pongs!r}")
    closes = [e for e in run.events if isinstance(e, CloseReceived)]
    check(
        closes in ([], [CloseReceived(0, SEED_CLOSE_REASON)]),
        f"{what}: a CLOSE nobody sent: {closes!r}",
    )
    if run.error is not None:
        check(
            isinstance(run.error, (HandshakeFailed, ProtocolError, ConnectionLost)),
            f"{what}: unexpected error type {run.error!r}",
        )
        if not any(isinstance(e, HandshakeComplete) for e in run.events):
            check(
                isinstance(run.error, HandshakeFailed),
                f"{what}: {run.error!r} before the handshake completed",
            )
    else:
        check(closes, f"{what}: the input ended without CLOSE but no error was raised")


# -- preamble --------------------------------------------------------------------------------------


def preamble_verdict(data: bytes) -> int | None:
    """Our own reading of SPEC "Preamble": the refusal code the responder must send.

    ``None`` when the preamble is acceptable (or incomplete).
    """
    magic = b"STALK"
    head = data[: len(magic)]
    if head != magic[: len(head)]:
        return 1
    if len(data) < 8:
        return None
    if data[5] != 1 or data[6:8] not in (b"XX", b"IK"):
        return 1
    return None


def parse_refusal(output: bytes) -> int:
    """A refusal must be exactly ``code || length || reason (UTF-8)``; return the code."""
    check(len(output) >= 2 and output[0] != 0, f"not a refusal: {output!r}")
    check(len(output) == 2 + output[1], f"refusal with trailing bytes: {output!r}")
    try:
        output[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Bug(f"refusal reason is not UTF-8: {output!r}") from exc
    return output[0]


def fuzz_preamble(data: bytes) -> None:
    """An initiator's opening bytes to a responder, whole and in two chunks."""
    whole = drive(new_session(Role.RESPONDER), [data])
    cut = split_point(data)
    split = drive(new_session(Role.RESPONDER), [data[:cut], data[cut:]])
    same_run(whole, split, "preamble")
    verdict = preamble_verdict(data)
    if verdict is not None:
        check(
            isinstance(whole.error, HandshakeFailed) and not whole.events,
            f"a bad preamble was not refused: {whole.error!r}",
        )
        check(parse_refusal(whole.output) == verdict, f"refusal {whole.output!r} for {data!r}")
        if data[:5] != b"STALK"[: len(data[:5])]:
            # Rejected at the first wrong byte: no need to wait for more, nor for EOF.
            check(whole.error_before_eof, "a wrong magic byte was only noticed at EOF")
    elif len(data) < 8:
        check(
            isinstance(whole.error, HandshakeFailed) and not whole.error_before_eof,
            f"an incomplete preamble then EOF gave {whole.error!r}",
        )
        check(parse_refusal(whole.output) == PROTOCOL_ERROR, f"refusal {whole.output!r}")
    elif not whole.events:
        # A good preamble: the verdict is about message 1 now.
        check(isinstance(whole.error, HandshakeFailed), f"{whole.error!r} in message 1")
        if whole.output[:1] != b"\x00":
            code = parse_refusal(whole.output)
            check(code in (DECRYPT_FAILED, PROTOCOL_ERROR, INVALID_KEY), f"refusal {code}")
            if code == INVALID_KEY:
                # Without the responder's key only the cleartext e can be the bad key.
                e = data[10:42]
                check(len(e) == 32 and bad_key(e), f"INVALID_KEY for e = {e.hex()}")
    check_seeded_run(whole, CLIENT, "preamble")


# -- handshakes ------------------------------------------------------------------------------------


def fuzz_handshake_responder(data: bytes) -> None:
    """``data`` as the initiator's whole byte stream, to a responder (auto-accepting)."""
    whole = drive(new_session(Role.RESPONDER), [data])
    check_seeded_run(whole, CLIENT, "responder")
    cut = split_point(data)
    split = drive(new_session(Role.RESPONDER), [data[:cut], data[cut:]])
    same_run(whole, split, "responder")


def fuzz_handshake_initiator(data: bytes) -> None:
    """``data`` as the responder's reply to a real XX and a real IK message 1."""
    pattern: Pattern
    for pattern in ("XX", "IK"):
        whole = drive(new_session(Role.INITIATOR, pattern), [data])
        check_seeded_run(whole, SERVER, f"{pattern} initiator")
        cut = split_point(data)
        split = drive(new_session(Role.INITIATOR, pattern), [data[:cut], data[cut:]])
        same_run(whole, split, f"{pattern} initiator")


# -- transport: the harness's own Noise transport cipher -------------------------------------------


class HarnessCipher:
    """Noise AESGCM transport encryption (Noise §5.1, §4.2 Rekey, §12.4 nonce format)."""

    def __init__(self, key: bytes, nonce: int = 0) -> None:
        self.key = key
        self.nonce = nonce

    @staticmethod
    def _nonce(n: int) -> bytes:
        return b"\x00" * 4 + n.to_bytes(8, "big")

    def encrypt(self, plaintext: bytes) -> bytes:
        out = AESGCM(self.key).encrypt(self._nonce(self.nonce), plaintext, b"")
        self.nonce += 1
        return out

    def decrypt(self, ciphertext: bytes) -> bytes:
        out = AESGCM(self.key).decrypt(self._nonce(self.nonce), ciphertext, b"")
        self.nonce += 1
        return out

    def rekey(self) -> None:
        self.key = AESGCM(self.key).encrypt(self._nonce(MAX_NONCE), b"\x00" * 32, b"")[:32]


@dataclass(frozen=True)
class TransportKeys:
    """The fixed XX session's transport keys and the initiator bytes that produce them."""

    handshake: bytes
    c2s: bytes
    s2c: bytes


def _cipher_key(session: Session, direction: str) -> bytes:
    # stalk keeps no public handle on its keys
    cipher = session._sealer.cipher if direction == "send" else session._receiver._cipher  # type: ignore[union-attr]
    key = cipher._key  # type: ignore[union-attr]
    check(isinstance(key, bytes) and len(key) == 32, "cannot find the transport key")
    assert isinstance(key, bytes)
    return key


@functools.cache
def transport_keys() -> TransportKeys:
    """Run the fixed XX handshake once; take both transport keys and check them."""
    client = new_session(Role.INITIATOR)
    server = new_session(Role.RESPONDER, config=SessionConfig(max_message_size=RECEIVER_LIMIT))
    msg1 = take_all(client)
    server.receive_data(msg1)
    pull(server, Run())
    client.receive_data(take_all(server))
    pull(client, Run())
    msg3 = take_all(client)
    handshake = msg1 + msg3
    server.receive_data(msg3)
    pull(server, Run())
    ready = take_all(server)
    keys = TransportKeys(handshake, _cipher_key(client, "send"), _cipher_key(server, "send"))
    # The harness's cipher must agree with the sessions' own.
    probe = bytes((PING, 0, 1, 42))
    check(
        HarnessCipher(keys.c2s).encrypt(probe) == _real_encrypt(client, probe),
        "harness cipher disagrees with the session's",
    )
    check(
        HarnessCipher(keys.s2c).decrypt(ready[2:]) == bytes((READY, 0, 0)),
        "harness cannot read the responder's READY",
    )
    return keys


def _real_encrypt(session: Session, plaintext: bytes) -> bytes:
    cipher = session._sealer.cipher
    check(cipher is not None, "no send cipher")
    assert cipher is not None
    return cipher.encrypt(plaintext)


def open_receiver() -> Session:
    """A responder in the OPEN state of the fixed XX session (its READY already sent)."""
    keys = transport_keys()
    server = new_session(Role.RESPONDER, config=SessionConfig(max_message_size=RECEIVER_LIMIT))
    server.receive_data(keys.handshake)
    run = Run()
    pull(server, run)
    check(
        [type(e) for e in run.events] == [PeerIdentified, HandshakeComplete],
        f"replaying the fixed handshake gave {run.events!r}",
    )
    take_all(server)  # verdict, message 2, READY (nonce 0)
    return server


# -- transport: an independent model of SPEC "Records" ---------------------------------------------


@dataclass(frozen=True)
class Rec:
    kind: int
    body: bytes


def _uvarint(data: bytes, pos: int, max_bytes: int) -> tuple[int, int] | None:
    """A minimal LEB128 of at most ``max_bytes`` bytes, or None."""
    value = 0
    for i in range(max_bytes):
        if pos + i >= len(data):
            return None
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i:
                return None
            return value, pos + i + 1
    return None


def _close_ok(body: bytes) -> bool:
    if len(body) < 2 or len(body) - 2 > 1024:
        return False
    try:
        body[2:].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def parse_plaintext(plaintext: bytes) -> list[Rec] | None:
    """The records of one transport plaintext, or None if SPEC says it is invalid."""
    if not plaintext:
        return None
    records: list[Rec] = []
    pos = 0
    while pos < len(plaintext):
        if records and records[-1].kind in (CLOSE, REKEY):
            return None
        kind = plaintext[pos]
        if not MESSAGE <= kind <= READY:
            return None
        channel = _uvarint(plaintext, pos + 1, 5)
        if channel is None or channel[0] != 0:
            return None
        length = _uvarint(plaintext, channel[1], 3)
        if length is None or length[0] > len(plaintext) - length[1]:
            return None
        pos = length[1] + length[0]
        body = plaintext[length[1] : pos]
        if (
            (kind in (READY, REKEY) and body)
            or (kind in (PING, PONG) and len(body) > 1024)
            or (kind == FRAGMENT and not body)
            or (kind == CLOSE and not _close_ok(body))
        ):
            return None
        records.append(Rec(kind, body))
    return records


@dataclass
class Expected:
    """What a session must do with a list of plaintexts (model of SPEC §11-13, §18)."""

    #: ("message", Spack) | ("pong", bytes) | ("close", code, reason), in order.
    events: list[tuple[Any, ...]] = field(default_factory=list)
    #: PONG bodies the session must send back, in order.
    pongs: list[bytes] = field(default_factory=list)
    #: The close code of the error CLOSE the session must send, if it must reject.
    reject: int | None = None
    closed: bool = False
    #: Whether the harness must rekey after each plaintext.
    rekeys: list[bool] = field(default_factory=list)


class _Pieces:
    """The pieces so far of a spack in pieces, checked as the receiver checks them.

    A fragmented spack is refused at the first piece after which it can never be valid
    (SPEC "Messages, batching and fragmentation"): stalk's own piecewise decoder, itself
    checked against the one-shot decoder (tests/test_weigh.py), says when that is. Pieces
    that total at most JOIN bytes are joined first and only checked at the end.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.fragments: list[bytes] = []
        self.prefix: SpackDecoder | None = None

    def failure(self, body: bytes) -> int | None:
        """The close code if a piece of this size takes the spack over the limit."""
        over = sum(map(len, self.fragments)) + len(body) > self.limit
        return MESSAGE_TOO_LARGE if over else None

    def fragment(self, body: bytes) -> int | None:
        """Take a FRAGMENT; the close code if the spack can never be valid."""
        self.fragments.append(body)
        try:
            if self.prefix is not None:
                self.prefix.feed(body)
            elif sum(map(len, self.fragments)) > JOIN:
                self.prefix = SpackDecoder(self.limit)
                self.prefix.feed(b"".join(self.fragments))
        except MalformedSpack:
            return PROTOCOL_ERROR
        except MessageLimitExceeded:
            return MESSAGE_TOO_LARGE
        return None

    def message(self, body: bytes) -> Spack | int:
        """Take the final MESSAGE: the spack, or the close code."""
        whole = b"".join([*self.fragments, body])
        self.fragments = []
        self.prefix = None
        try:
            return decode_spack(whole)
        except MalformedSpack:
            return PROTOCOL_ERROR


def model(plaintexts: list[bytes], limit: int) -> Expected:
    expected = Expected()
    pieces = _Pieces(limit)
    for plaintext in plaintexts:
        if expected.closed:  # bytes after the CLOSE message are never read
            return expected
        records = parse_plaintext(plaintext)
        if records is None:
            expected.reject = PROTOCOL_ERROR
            return expected
        events: list[tuple[Any, ...]] = []
        pongs: list[bytes] = []
        for record in records:
            failure = None
            if record.kind in (MESSAGE, FRAGMENT):
                failure = pieces.failure(record.body)
                if failure is None and record.kind == FRAGMENT:
                    failure = pieces.fragment(record.body)
                elif failure is None:
                    spack = pieces.message(record.body)
                    if isinstance(spack, Spack):
                        events.append(("message", spack))
                    else:
                        failure = spack
            elif record.kind == PING:
                pongs.append(record.body)
            elif record.kind == PONG:
                pass  # unsolicited (this receiver sent no PING): discarded
            elif record.kind == CLOSE:
                (code,) = struct.unpack(">H", record.body[:2])
                if pieces.fragments and code == NORMAL:
                    # A clean end would pass the cut spack off as whole (SPEC "Messages").
                    failure = PROTOCOL_ERROR
                else:
                    # An error CLOSE may cut a spack: what it left incomplete is dropped.
                    pieces = _Pieces(limit)
                    events.append(("close", code, record.body[2:].decode("utf-8")))
                    expected.closed = True
            elif record.kind == READY:
                failure = PROTOCOL_ERROR
            if failure is not None:
                expected.reject = failure
                return expected
        expected.events += events
        expected.pongs += pongs
        expected.rekeys.append(records[-1].kind == REKEY)
    return expected


def _frames(data: bytes) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        end = pos + 2 + int.from_bytes(data[pos : pos + 2], "big")
        check(end <= len(data), f"the session wrote a partial frame: {data[pos:]!r}")
        yield data[pos + 2 : end]
        pos = end


def _transport(plaintexts: list[bytes]) -> None:
    keys = transport_keys()
    expected = model(plaintexts, RECEIVER_LIMIT)
    cipher = HarnessCipher(keys.c2s)
    wire = bytearray()
    for index, plaintext in enumerate(plaintexts):
        wire += (len(plaintext) + 16).to_bytes(2, "big") + cipher.encrypt(plaintext)
        if index < len(expected.rekeys) and expected.rekeys[index]:
            cipher.rekey()
    session = open_receiver()
    run = drive(session, [bytes(wire)])

    # Events: exactly the model's, each spack type-exact and canonical.
    got: list[tuple[Any, ...]] = []
    for event in run.events:
        if isinstance(event, MessageReceived):
            check_canonical(event.spack)
            got.append(("message", event.spack))
        elif isinstance(event, PongReceived):
            got.append(("pong", event.payload))
        elif isinstance(event, CloseReceived):
            got.append(("close", event.code, event.reason))
        else:
            raise Bug(f"unexpected event {event!r}")
    check(
        len(got) == len(expected.events)
        and all(
            a[0] == b[0] and same_value(list(a[1:]), list(b[1:]))
            for a, b in zip(got, expected.events, strict=True)
        ),
        f"events {got!r}, expected {expected.events!r}",
    )

    # The error: a ProtocolError at the rejected message, else a truncation unless closed.
    if expected.reject is not None:
        check(isinstance(run.error, ProtocolError), f"{run.error!r}, expected a ProtocolError")
        check(
            isinstance(run.error, MessageLimitExceeded) == (expected.reject == MESSAGE_TOO_LARGE),
            f"{run.error!r} for close code {expected.reject}",
        )
    elif expected.closed:
        check(run.error is None, f"{run.error!r} after a clean CLOSE")
    else:
        check(isinstance(run.error, ConnectionLost), f"{run.error!r}, expected ConnectionLost")

    # What the session sent back: PONGs for accepted messages, then the error CLOSE.
    replies = HarnessCipher(keys.s2c, nonce=1)
    sent: list[Rec] = []
    for body in _frames(run.output):
        try:
            plaintext = replies.decrypt(body)
        except InvalidTag as exc:
            raise Bug("the session sent a message its peer cannot decrypt") from exc
        records = parse_plaintext(plaintext)
        check(records is not None, f"the session sent invalid records: {plaintext!r}")
        assert records is not None
        sent += records
        if records[-1].kind == REKEY:
            replies.rekey()
    wanted = [Rec(PONG, body) for body in expected.pongs]
    if expected.reject is not None:
        check(sent and sent[-1].kind == CLOSE, f"no error CLOSE was sent: {sent!r}")
        code = struct.unpack(">H", sent[-1].body[:2])[0] if sent else None
        check(code == expected.reject, f"error CLOSE code {code}, expected {expected.reject}")
        sent = sent[:-1]  # nothing of the rejected message is answered (SPEC 11, 18)
    check(sent == wanted, f"the session sent {sent!r}, expected {wanted!r}")


def fuzz_transport_records(data: bytes) -> None:
    """``data`` is one transport plaintext (at most 65519 bytes are used)."""
    _transport([data[:MAX_PLAINTEXT]])


def split_messages(data: bytes) -> list[bytes]:
    """``data`` as ``u16 length || plaintext`` pieces (a short last piece is kept)."""
    plaintexts: list[bytes] = []
    pos = 0
    while pos + 2 <= len(data) and len(plaintexts) < MAX_MESSAGES:
        length = int.from_bytes(data[pos : pos + 2], "big")
        plaintexts.append(data[pos + 2 : pos + 2 + min(length, MAX_PLAINTEXT)])
        pos += 2 + length
    return plaintexts


def join_messages(plaintexts: Iterable[bytes]) -> bytes:
    """The inverse of :func:`split_messages`."""
    return b"".join(len(p).to_bytes(2, "big") + p for p in plaintexts)


def fuzz_transport_messages(data: bytes) -> None:
    """``data`` is several plaintexts (see :func:`split_messages`), sent in order."""
    _transport(split_messages(data))


# -- spack: an independent model of SPEC "Spack encoding" ------------------------------------------

_ITEM_SIZES: Final = {16: 1, 17: 1, 18: 2, 19: 2, 20: 4, 21: 4, 22: 8, 23: 8, 24: 4, 25: 8}
_MAX_DEPTH: Final = 32


class _Map:
    """A msgpack map as its list of pairs (so repeated keys stay visible)."""

    def __init__(self, pairs: list[tuple[Any, Any]]) -> None:
        self.pairs = pairs


def _plain_unpack(data: bytes) -> Any:
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=False,
        use_list=True,
        object_pairs_hook=_Map,
        ext_hook=msgpack.ExtType,
    )


def _valid(node: Any, depth: int) -> bool:
    """SPEC rules 2-10 over plain msgpack output; ``node`` is a container at ``depth``."""
    if depth > _MAX_DEPTH:
        return False
    children = [v for pair in node.pairs for v in pair] if isinstance(node, _Map) else node
    if isinstance(node, _Map):
        keys = [(type(k), k) for k, _ in node.pairs]
        if any(t not in (str, bytes) for t, _ in keys) or len(set(keys)) != len(keys):
            return False
    for child in children:
        if isinstance(child, (list, _Map)):
            if not _valid(child, depth + 1):
                return False
        elif isinstance(child, msgpack.ExtType):
            if not _valid_ext(child, depth + 1):
                return False
        elif not isinstance(child, (type(None), bool, int, float, str, bytes)):
            return False  # msgpack's own Timestamp (ext -1)
    return True


def _valid_ext(ext: msgpack.ExtType, depth: int) -> bool:
    if ext.code == 1:
        return len(ext.data) == 4
    if ext.code == 2:
        try:
            inner = _plain_unpack(ext.data)
        except Exception:  # noqa: BLE001 - any msgpack failure means "not one array"
            return False
        return isinstance(inner, list) and _valid(inner, depth)
    size = _ITEM_SIZES.get(ext.code)
    return size is not None and len(ext.data) % size == 0


def spec_valid(data: bytes) -> bool:
    """Whether ``data`` is a valid spack encoding, by SPEC alone."""
    try:
        top = _plain_unpack(data)
    except Exception:  # noqa: BLE001 - invalid msgpack, truncated, trailing, too deep...
        return False
    return isinstance(top, list) and _valid(top, 0)


def fuzz_spack(data: bytes) -> None:
    """:func:`~stalk.spack.decode_spack` against the SPEC's rules; canonical re-encoding."""
    try:
        spack = decode_spack(data)
    except MalformedSpack:
        check(not spec_valid(data), f"a valid spack was rejected: {data.hex()}")
        return
    check(spec_valid(data), f"an invalid spack was accepted: {data.hex()} -> {spack!r}")
    check_canonical(spack)
    check(len(spack) == len(_plain_unpack(data)), "element count changed")


# -- seeds and the registry ------------------------------------------------------------------------


def _transport_seeds() -> list[bytes]:
    big = Spack(b"f" * 900).encode()  # fragmented below, within the 1024-byte limit
    huge = Spack(b"h" * 1100).encode()  # over the limit

    def rec(kind: int, body: bytes = b"") -> bytes:
        n = len(body)
        length = bytes([n]) if n < 0x80 else bytes([n & 0x7F | 0x80, n >> 7])
        return bytes([kind, 0]) + length + body

    return [
        rec(MESSAGE, b"\x90"),
        rec(MESSAGE, SEED_SPACKS[0].encode()) + rec(MESSAGE, SEED_SPACKS[1].encode()),
        rec(FRAGMENT, big[:700]) + rec(PING, b"p") + rec(MESSAGE, big[700:]),
        rec(PING, b"x" * 1024) + rec(PONG, b"y") + rec(REKEY),
        rec(MESSAGE, b"\x91\xc0") + rec(CLOSE, b"\x00\x00bye"),
        rec(FRAGMENT, b"\x92") + rec(MESSAGE, b"\x01\x02"),
        rec(READY),
        rec(FRAGMENT, huge[:600]) + rec(MESSAGE, huge[600:]),
        rec(MESSAGE, b"\x91\xc1"),
        # Edge cases, each one rule of SPEC section 11/12 away from valid:
        rec(FRAGMENT, b"\x92") + rec(CLOSE, b"\x00\x00"),  # CLOSE NORMAL cutting a spack
        rec(FRAGMENT, b"\x92") + rec(CLOSE, b"\x00\x05oops"),  # an error CLOSE may cut one
        rec(FRAGMENT, b"\x91"),  # EOF during a fragmented spack
        rec(MESSAGE, huge),  # over the limit in one piece
        rec(PING, b"x" * 1025),  # PING body over 1024 bytes
        bytes([MESSAGE, 1, 1, 0x90]),  # channel 1
        bytes([MESSAGE, 0x80, 0x00, 1, 0x90]),  # non-minimal channel varint
        bytes([MESSAGE, 0, 0x81, 0x00, 0x90]),  # non-minimal length varint
        rec(REKEY) + rec(MESSAGE, b"\x90"),  # a record after REKEY
        bytes([8, 0, 0]),  # unknown kind
        rec(CLOSE, b"\x00\x00\xff"),  # CLOSE reason not UTF-8
    ]


def seeds(target: str) -> list[bytes]:
    """Valid (and a few interesting invalid) inputs to start fuzzing ``target`` from."""
    xx, ik = transcript("XX"), transcript("IK")
    if target == "preamble":
        return [xx.c2s[:8], ik.c2s[:8], xx.c2s[:43], b"STALK\x02XX", b"GET / HTTP/1.1\r\n"]
    if target == "handshake_responder":
        return [xx.c2s, ik.c2s]
    if target == "handshake_initiator":
        return [xx.s2c, ik.s2c]
    if target == "transport_records":
        return _transport_seeds()
    if target == "transport_messages":
        plain = _transport_seeds()
        return [
            join_messages(plain[:3]),
            join_messages([plain[3], plain[0], plain[2]]),
            join_messages([b"\x02\x00\x02\x92\x01", b"\x06\x00\x00", b"\x01\x00\x01\x02"]),
            join_messages([plain[4], plain[0]]),  # a message after the CLOSE message
            join_messages([plain[0], plain[10]]),  # a fragment left open at EOF
        ]
    if target == "spack":
        return [s.encode() for s in SEED_SPACKS] + [
            b"\x91\xd6\x02\x92\x01\xa1a",
            b"\x91" * 32 + b"\x90",
        ]
    raise KeyError(target)


#: Every target by the name ``fuzz/run_atheris.py`` and ``tests/test_fuzz.py`` use.
TARGETS: Final[dict[str, Target]] = {
    "preamble": fuzz_preamble,
    "handshake_responder": fuzz_handshake_responder,
    "handshake_initiator": fuzz_handshake_initiator,
    "transport_records": fuzz_transport_records,
    "transport_messages": fuzz_transport_messages,
    "spack": fuzz_spack,
}
