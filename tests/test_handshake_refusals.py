"""SPEC 5's table of handshake failures, and SPEC 8's payload strictness, row by row.

Each test feeds a stalk :class:`~stalk.session.Session` the bytes of one failure (built
with the hostile peers of ``tests/adversarial/peers.py``, which hold real keys) and checks
what the table says it sends: a refusal code before the verdict, an authenticated CLOSE
once XX message 3 was read, or nothing at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import partial

import anyio
import msgpack
import pytest

from adversarial.peers import READY, Initiator, Responder, rec
from helpers import drain, take_all
from stalk.config import Config
from stalk.connection import Connection
from stalk.errors import HandshakeFailed, InvalidPeerKey, PeerIdentityMismatch, PeerRefused
from stalk.events import HandshakeComplete, PeerIdentified
from stalk.framing import encode_frame
from stalk.handshake import Params, decode_params
from stalk.identity import Identity
from stalk.listener import listen
from stalk.records import decode_close
from stalk.session import Role, Session, SessionState
from stalk.wire import MAX_CLEARTEXT_PAYLOAD, MAX_HANDSHAKE_PAYLOAD, CloseCode, RecordKind

# -- helpers ---------------------------------------------------------------------------------


def frame_body(data: bytes | bytearray) -> bytes:
    """The body of the one frame ``data`` holds."""
    length = int.from_bytes(data[:2], "big")
    assert len(data) == 2 + length, "not exactly one frame"
    return bytes(data[2:])


def refusal(data: bytes | bytearray) -> int:
    """The code of the refusal verdict that is the whole of ``data``."""
    assert data, "nothing was sent"
    assert data[0] != 0, "the responder answered instead of refusing"
    assert len(data) == 2 + data[1], "bytes after the refusal"
    return data[0]


def fails(session: Session, error: type[HandshakeFailed] = HandshakeFailed) -> HandshakeFailed:
    """Drain ``session``, which must fail with ``error`` (not a key error unless named)."""
    with pytest.raises(HandshakeFailed) as info:
        drain(session)
    assert isinstance(info.value, error), repr(info.value)
    if not issubclass(error, InvalidPeerKey):
        assert not isinstance(info.value, InvalidPeerKey), repr(info.value)
    assert session.state is SessionState.FAILED
    return info.value


def responder() -> tuple[Session, Identity]:
    identity = Identity.generate()
    return Session(Role.RESPONDER, identity), identity


def after_xx_msg2(init: Initiator) -> Session:
    """A stalk responder that read ``init``'s XX message 1 and sent message 2."""
    server, _ = responder()
    server.receive_data(init.opening())
    assert drain(server) == []
    answer = take_all(server)
    assert answer[:1] == b"\x00"
    init.read_msg2(frame_body(answer[1:]))
    return server


def close_code(init: Initiator, data: bytes | bytearray) -> int:
    """The code of the one CLOSE record that is the whole of the responder's answer."""
    records = init.transport().open(frame_body(data))
    assert [r.kind for r in records] == [RecordKind.CLOSE]
    code, _ = decode_close(records[0].body)
    return code


IK_MSG1 = 32 + 48 + 16  # keys and tags of IK message 1, payload not counted
XX_MSG1 = 32


# -- SPEC 5: failures before the verdict: a refusal with the table's code ---------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"G", id="first-byte"),
        pytest.param(b"STALX", id="fifth-byte"),
        pytest.param(b"\x16\x03\x01", id="tls"),
    ],
)
def test_bad_magic_is_unsupported_at_the_first_wrong_byte(data: bytes) -> None:
    server, _ = responder()
    server.receive_data(data)
    fails(server)
    assert refusal(take_all(server)) == CloseCode.UNSUPPORTED


@pytest.mark.parametrize("preamble", [b"STALK\x02XX", b"STALK\x00IK", b"STALK\x01NN"])
def test_unknown_version_or_pattern_is_unsupported(preamble: bytes) -> None:
    server, _ = responder()
    server.receive_data(preamble)
    fails(server)
    assert refusal(take_all(server)) == CloseCode.UNSUPPORTED


@pytest.mark.parametrize(
    ("preamble", "length"),
    [
        pytest.param(b"STALK\x01XX", 0, id="xx-zero-length"),
        pytest.param(b"STALK\x01IK", 0, id="ik-zero-length"),
        pytest.param(b"STALK\x01XX", XX_MSG1 - 1, id="xx-short"),
        pytest.param(b"STALK\x01IK", 1, id="ik-1-byte"),
        pytest.param(b"STALK\x01IK", IK_MSG1 - 1, id="ik-short"),
        pytest.param(b"STALK\x01XX", XX_MSG1 + MAX_CLEARTEXT_PAYLOAD + 1, id="xx-payload-1025"),
        pytest.param(b"STALK\x01IK", IK_MSG1 + MAX_HANDSHAKE_PAYLOAD + 1, id="ik-payload-3073"),
        pytest.param(b"STALK\x01IK", 65_535, id="ik-65535"),
    ],
)
def test_bad_message_1_length_is_refused_from_the_header_alone(
    preamble: bytes, length: int
) -> None:
    # Only the 2-byte header arrives: the responder refuses without waiting for a body.
    server, _ = responder()
    server.receive_data(preamble + length.to_bytes(2, "big"))
    fails(server)
    assert refusal(take_all(server)) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("cut", [32, 52, 80, IK_MSG1 - 1, IK_MSG1 + 31])
def test_short_ik_message_1_is_a_protocol_error_not_decrypt_failed(cut: int) -> None:
    # A real IK message 1 cut short, in a frame of its (shorter) length. Noise alone would
    # fail to authenticate the truncated s or payload, which reads as "wrong responder key"
    # (DECRYPT_FAILED); the message is malformed, whatever key it was made for.
    server, identity = responder()
    msg1 = Initiator(server=identity.public).msg1()
    assert len(msg1) > cut
    server.receive_data(b"STALK\x01IK" + encode_frame(msg1[:cut]))
    error = fails(server)
    assert refusal(take_all(server)) == (
        CloseCode.PROTOCOL_ERROR if cut < IK_MSG1 else CloseCode.DECRYPT_FAILED
    ), error


@pytest.mark.parametrize("ik", [False, True])
def test_bad_ephemeral_is_invalid_key(ik: bool) -> None:
    server, identity = responder()
    server.receive_data(Initiator(server=identity.public if ik else None, twin_e=True).opening())
    fails(server, InvalidPeerKey)
    assert refusal(take_all(server)) == CloseCode.INVALID_KEY


def test_ik_static_twin_is_invalid_key() -> None:
    server, identity = responder()
    server.receive_data(Initiator(server=identity.public, twin_s=True).opening())
    fails(server, InvalidPeerKey)
    assert refusal(take_all(server)) == CloseCode.INVALID_KEY


def test_ik_message_1_for_another_key_is_decrypt_failed() -> None:
    server, _ = responder()
    server.receive_data(Initiator(server=Identity.generate().public).opening())
    fails(server)
    assert refusal(take_all(server)) == CloseCode.DECRYPT_FAILED


def test_ik_initiator_reads_decrypt_failed_as_identity_mismatch() -> None:
    server, _ = responder()
    pinned = Identity.generate().public
    client = Session(Role.INITIATOR, Identity.generate(), peer=pinned)
    server.receive_data(take_all(client))
    fails(server)
    client.receive_data(take_all(server))
    error = fails(client, PeerIdentityMismatch)
    assert pinned.fingerprint in str(error)


@pytest.mark.parametrize("ik", [False, True])
def test_malformed_message_1_payload_is_a_protocol_error(ik: bool) -> None:
    server, identity = responder()
    server.receive_data(
        Initiator(server=identity.public if ik else None, msg1_payload=b"\x91\x01").opening()
    )
    fails(server)
    assert refusal(take_all(server)) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("keep", [0, 3, 8, 9, 10, 40])
def test_eof_before_message_1_is_complete_is_a_protocol_error(keep: int) -> None:
    server, identity = responder()
    opening = Initiator(server=identity.public).opening()
    if keep:
        server.receive_data(opening[:keep])
    server.receive_data(b"")
    error = fails(server)
    assert "closed the connection" in str(error)
    assert refusal(take_all(server)) == CloseCode.PROTOCOL_ERROR


def test_ik_authorization_refusal_is_not_authorized() -> None:
    server, identity = responder()
    server.receive_data(Initiator(server=identity.public).opening())
    events = drain(server)
    assert isinstance(events[0], PeerIdentified)
    server.refuse("no")
    assert refusal(take_all(server)) == CloseCode.NOT_AUTHORIZED
    assert server.state is SessionState.CLOSED


async def _never_called(conn: Connection) -> None:
    raise AssertionError("a failed handshake reached the handler")


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"STALK\x01XX", id="preamble"),
        pytest.param(b"STALK\x01IK\x00\x80" + bytes(40), id="part-of-ik-msg1"),
    ],
)
async def test_deadline_before_the_verdict_sends_nothing(anyio_backend: str, sent: bytes) -> None:
    deadline = 0.2
    config = Config(handshake_timeout=deadline)
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(
                listen, "127.0.0.1", 0, _never_called, identity=Identity.generate(), config=config
            )
        )
        async with await anyio.connect_tcp(host, port) as stream:
            started = anyio.current_time()
            if sent:
                await stream.send(sent)
            received = bytearray()
            with (
                anyio.fail_after(5),
                contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError),
            ):
                while True:
                    received += await stream.receive()
            elapsed = anyio.current_time() - started
        tg.cancel_scope.cancel()
    assert received == b""
    assert deadline * 0.9 <= elapsed < deadline + 2


@pytest.mark.parametrize(
    ("ik", "length"),
    [
        pytest.param(False, 0, id="xx-zero-length"),
        pytest.param(False, 95, id="xx-short"),
        pytest.param(False, 96 + MAX_HANDSHAKE_PAYLOAD + 1, id="xx-long"),
        pytest.param(True, 47, id="ik-short"),
        pytest.param(True, 48 + MAX_HANDSHAKE_PAYLOAD + 1, id="ik-long"),
    ],
)
def test_initiator_refuses_a_bad_message_2_length_from_the_header(ik: bool, length: int) -> None:
    server_identity = Identity.generate()
    client = Session(
        Role.INITIATOR, Identity.generate(), peer=server_identity.public if ik else None
    )
    take_all(client)
    client.receive_data(b"\x00" + length.to_bytes(2, "big"))
    fails(client)
    assert take_all(client) == b""


# -- SPEC 5: after the verdict: an authenticated CLOSE once XX msg3 was read, else nothing ------


def test_xx_msg3_bad_payload_gets_an_authenticated_protocol_error() -> None:
    init = Initiator(msg3_payload=b"\x92\x01\x02")
    server = after_xx_msg2(init)
    server.receive_data(encode_frame(init.msg3()))
    error = fails(server)
    assert "not a msgpack map" in str(error)
    assert close_code(init, take_all(server)) == CloseCode.PROTOCOL_ERROR


def test_xx_msg3_twin_static_gets_an_authenticated_invalid_key() -> None:
    init = Initiator(twin_s=True)
    server = after_xx_msg2(init)
    server.receive_data(encode_frame(init.msg3()))
    fails(server, InvalidPeerKey)
    assert close_code(init, take_all(server)) == CloseCode.INVALID_KEY


def test_xx_authorization_refusal_gets_an_authenticated_not_authorized() -> None:
    init = Initiator()
    server = after_xx_msg2(init)
    server.receive_data(encode_frame(init.msg3()))
    assert isinstance(drain(server)[0], PeerIdentified)
    server.refuse("no")
    assert close_code(init, take_all(server)) == CloseCode.NOT_AUTHORIZED


def _flip_last(body: bytes) -> bytes:
    return body[:-1] + bytes([body[-1] ^ 1])


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda m: encode_frame(_flip_last(m)), id="tag-flipped"),
        pytest.param(lambda m: encode_frame(m[:63]), id="short-frame"),
        pytest.param(
            lambda m: (64 + MAX_HANDSHAKE_PAYLOAD + 1).to_bytes(2, "big"), id="long-header"
        ),
        pytest.param(lambda m: b"\x00\x00", id="zero-length"),
        pytest.param(lambda m: encode_frame(m)[:20] + b"", id="eof-inside"),
    ],
)
def test_xx_msg3_that_cannot_be_read_gets_nothing(make: Callable[[bytes], bytes]) -> None:
    init = Initiator()
    server = after_xx_msg2(init)
    server.receive_data(make(init.msg3()))
    server.receive_data(b"")
    fails(server)
    assert take_all(server) == b""


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(lambda t: t.seal(rec(RecordKind.PING, b"x")), id="ping-not-ready"),
        pytest.param(lambda t: t.seal(READY + READY), id="ready-twice"),
        pytest.param(lambda t: encode_frame(b"\x00" * 19), id="garbage"),
        pytest.param(lambda t: b"", id="eof"),
    ],
)
def test_ik_bad_confirmation_gets_nothing(first: Callable[[object], bytes]) -> None:
    server, identity = responder()
    init = Initiator(server=identity.public)
    server.receive_data(init.opening())
    assert isinstance(drain(server)[0], PeerIdentified)
    server.accept()
    answer = take_all(server)
    init.read_msg2(frame_body(answer[1:]))
    data = first(init.transport())
    if data:
        server.receive_data(data)
    server.receive_data(b"")
    fails(server)
    assert take_all(server) == b""


# -- SPEC 8: handshake payload strictness ----------------------------------------------------


def pack_map(pairs: Sequence[tuple[object, object]], fmt: str = "fixmap") -> bytes:
    """A msgpack map with ``pairs`` in order (repeats kept), in the given map format."""
    n = len(pairs)
    head = {
        "fixmap": bytes([0x80 | n]),
        "map16": b"\xde" + n.to_bytes(2, "big"),
        "map32": b"\xdf" + n.to_bytes(4, "big"),
    }[fmt]
    return head + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)


GOOD = [("version", 1), ("max_message_size", 1 << 20)]

#: id -> (payload, valid?)
PAYLOADS: dict[str, tuple[bytes, bool]] = {
    "fixmap": (pack_map(GOOD), True),
    "map16": (pack_map(GOOD, "map16"), True),
    "map32": (pack_map(GOOD, "map32"), True),
    "unknown_keys_any_values": (
        pack_map([*GOOD, ("later", {1: [1, 2], b"k": None}), ("z", 1.5)]),
        True,
    ),
    "unknown_value_with_repeated_inner_keys": (
        pack_map([*GOOD, ("later", None)])[:-1] + pack_map([("a", 1), ("a", 2)]),
        True,
    ),
    "duplicate_max_message_size": (pack_map([*GOOD, ("max_message_size", 1 << 30)]), False),
    "duplicate_version": (pack_map([("version", 1), *GOOD]), False),
    "duplicate_unknown_key": (pack_map([*GOOD, ("x", 1), ("x", 1)]), False),
    "int_key": (pack_map([*GOOD, (7, 1)]), False),
    "bin_key": (pack_map([*GOOD, (b"x", 1)]), False),
    "trailing_byte": (pack_map(GOOD) + b"\xc0", False),
    "two_maps": (pack_map(GOOD) + pack_map(GOOD), False),
    "array": (msgpack.packb([1, 1 << 20]), False),
    "empty": (b"", False),
    "oversize_3073": (pack_map([*GOOD, ("pad", b"\x00" * 3034)]), False),
    "version_bool": (pack_map([("version", True), GOOD[1]]), False),
    "max_message_size_bool": (pack_map([GOOD[0], ("max_message_size", True)]), False),
    "max_message_size_float": (pack_map([GOOD[0], ("max_message_size", 1048576.0)]), False),
}


def test_payload_table_sizes() -> None:
    assert len(PAYLOADS["oversize_3073"][0]) == MAX_HANDSHAKE_PAYLOAD + 1
    assert PAYLOADS["map32"][0][0] == 0xDF


@pytest.mark.parametrize("name", PAYLOADS)
def test_decode_params(name: str) -> None:
    payload, valid = PAYLOADS[name]
    if valid:
        assert decode_params(payload) == Params(version=1, max_message_size=1 << 20)
    else:
        with pytest.raises(HandshakeFailed):
            decode_params(payload)


def test_a_duplicate_key_never_takes_the_last_value() -> None:
    payload, _ = PAYLOADS["duplicate_max_message_size"]
    with pytest.raises(HandshakeFailed, match="repeats a map key"):
        decode_params(payload)


def test_payload_errors_do_not_echo_received_text() -> None:
    secret = "s3cr3t-" * 20
    for payload in (
        pack_map([("version", secret), GOOD[1]]),
        pack_map([*GOOD, (secret, 1), (secret, 2)]),
        pack_map([GOOD[0], ("max_message_size", secret)]),
    ):
        with pytest.raises(HandshakeFailed) as info:
            decode_params(payload)
        assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize("name", PAYLOADS)
def test_responder_ik_message_1_payload(name: str) -> None:
    payload, valid = PAYLOADS[name]
    server, identity = responder()
    server.receive_data(Initiator(server=identity.public, msg1_payload=payload).opening())
    if valid:
        assert isinstance(drain(server)[0], PeerIdentified)
        return
    fails(server)
    assert refusal(take_all(server)) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("name", PAYLOADS)
def test_responder_xx_message_3_payload(name: str) -> None:
    payload, valid = PAYLOADS[name]
    init = Initiator(msg3_payload=payload)
    server = after_xx_msg2(init)
    server.receive_data(encode_frame(init.msg3()))
    if valid:
        assert isinstance(drain(server)[0], PeerIdentified)
        return
    fails(server)
    data = take_all(server)
    if len(payload) > MAX_HANDSHAKE_PAYLOAD:
        assert data == b""  # refused from the frame header: nothing was decrypted
    else:
        assert close_code(init, data) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "name", ["fixmap", "map32", "duplicate_unknown_key", "int_key", "trailing_byte", "array"]
)
def test_responder_xx_message_1_payload(name: str) -> None:
    # XX message 1 carries a map that need not hold the parameters: only its shape counts.
    payload, valid = PAYLOADS[name]
    server, _ = responder()
    server.receive_data(Initiator(msg1_payload=payload).opening())
    if valid:
        assert drain(server) == []
        assert take_all(server)[:1] == b"\x00"
        return
    fails(server)
    assert refusal(take_all(server)) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("name", PAYLOADS)
@pytest.mark.parametrize("ik", [False, True])
def test_initiator_message_2_payload(name: str, ik: bool) -> None:
    payload, valid = PAYLOADS[name]
    server_identity = Identity.generate()
    resp = Responder(identity=server_identity, msg2_payload=payload)
    client = Session(
        Role.INITIATOR, Identity.generate(), peer=server_identity.public if ik else None
    )
    opening = take_all(client)
    resp.start(bytes(opening[:8]))
    assert resp.noise is not None
    resp.noise.read_message(frame_body(opening[8:]))
    client.receive_data(b"\x00" + encode_frame(resp.msg2()))
    if not valid:
        fails(client)
        assert take_all(client) == b""  # no message 3, no READY
        return
    events = drain(client)
    if ik:
        assert isinstance(events[0], HandshakeComplete)
        assert client.peer_max_message_size == 1 << 20
    else:
        assert events == []
        resp.noise.read_message(frame_body(take_all(client)))


def test_peer_refused_carries_every_refusal_code() -> None:
    for code in CloseCode:
        if not 1 <= code <= 255:
            continue
        client = Session(Role.INITIATOR, Identity.generate())
        take_all(client)
        client.receive_data(bytes([code, 2]) + b"no")
        error = fails(client, PeerRefused)
        assert isinstance(error, PeerRefused)
        assert error.code == code
        assert code.name in str(error)


HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\n400 Bad Request"
)


@pytest.mark.parametrize(
    ("answer", "error", "verdict"),
    [
        # A refusal: the bytes it was read from, and what followed it.
        (bytes([CloseCode.BUSY, 2]) + b"no", PeerRefused, bytes([CloseCode.BUSY, 2]) + b"no"),
        # An HTTP server: 'H' reads as refusal code 72 with an 84-byte reason ('T').
        (HTTP_ANSWER, PeerRefused, HTTP_ANSWER),
        # A reason that is not UTF-8, and a verdict the stream ends inside (EOF follows).
        (b"\x05\x02\xff\xfe", HandshakeFailed, b"\x05\x02\xff\xfe"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", HandshakeFailed, b"SSH-2.0-OpenSSH_9.6\r\n"),
        (b"", HandshakeFailed, None),
    ],
)
def test_a_failed_verdict_carries_the_bytes_it_was_read_from(
    answer: bytes, error: type[HandshakeFailed], verdict: bytes | None
) -> None:
    client = Session(Role.INITIATOR, Identity.generate())
    take_all(client)
    client.receive_data(answer)
    client.receive_data(b"")
    failure = fails(client, error)
    assert failure.verdict == verdict
    if isinstance(failure, PeerRefused) and answer == HTTP_ANSWER:
        assert failure.code == ord("H")


def test_a_long_answer_keeps_only_the_verdict_s_bytes() -> None:
    client = Session(Role.INITIATOR, Identity.generate())
    take_all(client)
    answer = b"HTTP/1.1 200 OK\r\n" + b"x" * 1000
    client.receive_data(answer)
    assert fails(client, PeerRefused).verdict == answer[:257]


def test_a_failure_after_the_verdict_carries_no_verdict() -> None:
    client = Session(Role.INITIATOR, Identity.generate())
    take_all(client)
    client.receive_data(b"\x00" + encode_frame(bytes(40)))  # accepted, then a bad message 2
    assert fails(client).verdict is None
