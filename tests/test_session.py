"""Two sans-IO sessions back to back: handshakes, spacks, close, and failures."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import itertools
import tracemalloc
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import connected_pair, drain, make_pair, take_all
from stalk import reassembly
from stalk.errors import (
    ConnectionClosed,
    ConnectionLost,
    DecryptionFailed,
    HandshakeFailed,
    InvalidSpackValue,
    LocalProtocolError,
    MessageLimitExceeded,
    MessageTooLarge,
    PeerIdentityMismatch,
    PeerRefused,
    ProtocolError,
)
from stalk.events import (
    NEED_DATA,
    ChannelMessageReceived,
    CloseReceived,
    Event,
    HandshakeComplete,
    MessageReceived,
    PeerIdentified,
    PongReceived,
)
from stalk.framing import encode_frame
from stalk.identity import Identity
from stalk.records import encode_uvarint
from stalk.session import Role, Session, SessionConfig, SessionState
from stalk.spack import Float32, Spack, SpackValue
from stalk.wire import CloseCode, Pattern, RecordKind


def messages(events: Sequence[object]) -> list[Spack]:
    return [e.spack for e in events if isinstance(e, MessageReceived)]


# -- handshakes ------------------------------------------------------------------------


@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
def test_handshake_authenticates_both_sides(ik: bool) -> None:
    client_id, server_id = Identity.generate(), Identity.generate()
    pair = make_pair(ik=ik, client_identity=client_id, server_identity=server_id)
    pair.pump()
    pattern: Pattern = "IK" if ik else "XX"
    identified = pair.server_events[0]
    assert identified == PeerIdentified(client_id.public, pattern)
    (client_done,) = pair.client_events
    server_done = pair.server_events[1]
    assert isinstance(client_done, HandshakeComplete)
    assert isinstance(server_done, HandshakeComplete)
    assert client_done.peer == server_id.public
    assert server_done.peer == client_id.public
    assert client_done.pattern == server_done.pattern == pattern
    assert client_done.handshake_hash == server_done.handshake_hash
    assert len(client_done.handshake_hash) == 32
    assert pair.client.peer == server_id.public
    assert pair.server.handshake_hash == client_done.handshake_hash
    assert pair.client.state is pair.server.state is SessionState.OPEN


def test_each_handshake_has_a_fresh_hash() -> None:
    server_id = Identity.generate()
    a = connected_pair(ik=True, server_identity=server_id)
    b = connected_pair(ik=True, server_identity=server_id)
    assert a.client.handshake_hash != b.client.handshake_hash


def test_ik_responder_answers_nothing_before_authorization() -> None:
    server_id = Identity.generate()
    pair = make_pair(ik=True, server_identity=server_id)
    pair.server.receive_data(take_all(pair.client))
    event = pair.server.next_event()
    assert isinstance(event, PeerIdentified)
    assert pair.server.state is SessionState.AUTHORIZING
    assert take_all(pair.server) == b""  # no message 2, no DH spent yet
    assert pair.server.peer is None  # identified, not yet authenticated


def test_xx_message_one_carries_no_identity() -> None:
    client_id = Identity.generate()
    pair = make_pair(client_identity=client_id)
    opening = take_all(pair.client)
    assert opening[:8] == b"STALK\x01XX"
    assert client_id.public.raw not in opening


def test_ik_with_wrong_key_fails_with_identity_mismatch() -> None:
    real, pinned = Identity.generate(), Identity.generate()
    client = Session(Role.INITIATOR, Identity.generate(), peer=pinned.public)
    server = Session(Role.RESPONDER, real)
    server.receive_data(take_all(client))
    with pytest.raises(HandshakeFailed):
        server.next_event()
    client.receive_data(take_all(server))
    with pytest.raises(PeerIdentityMismatch) as info:
        client.next_event()
    assert info.value.expected == pinned.public
    assert pinned.public.fingerprint in str(info.value)
    assert client.state is SessionState.FAILED
    with pytest.raises(PeerIdentityMismatch):  # terminal: the same error again
        client.next_event()


@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
def test_refused_peer_gets_a_clear_error(ik: bool) -> None:
    pair = make_pair(ik=ik, authorize=False)
    with pytest.raises(PeerRefused) as info:
        pair.pump()
    assert info.value.code == CloseCode.NOT_AUTHORIZED
    assert info.value.reason == "you are not on the list"
    assert pair.server.state is SessionState.CLOSED
    assert not messages(pair.server_events)


def test_unknown_version_is_refused_as_unsupported() -> None:
    pair = make_pair()
    opening = bytearray(take_all(pair.client))
    opening[5] = 2
    pair.server.receive_data(bytes(opening))
    with pytest.raises(HandshakeFailed, match="version 2"):
        pair.server.next_event()
    pair.client.receive_data(take_all(pair.server))
    with pytest.raises(PeerRefused) as info:
        pair.client.next_event()
    assert info.value.code == CloseCode.UNSUPPORTED


@pytest.mark.parametrize("opening", [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00\x01", b"S"])
def test_non_stalk_client_is_rejected_at_once(opening: bytes) -> None:
    server = Session(Role.RESPONDER, Identity.generate())
    server.receive_data(opening)
    if opening == b"S":  # a valid prefix: wait for more, then fail at EOF
        assert server.next_event() is NEED_DATA
        server.receive_data(b"")
    with pytest.raises(HandshakeFailed):
        server.next_event()


def test_downgrade_from_ik_to_xx_fails() -> None:
    server_id = Identity.generate()
    pair = make_pair(ik=True, server_identity=server_id)
    opening = bytearray(take_all(pair.client))
    opening[6:8] = b"XX"
    pair.server.receive_data(bytes(opening))
    # The responder runs XX over an IK message 1: the "cleartext payload" it reads is the
    # encrypted static key, which is no msgpack map, so the handshake fails right there.
    with pytest.raises(HandshakeFailed, match="msgpack"):
        pair.server.next_event()


def test_replayed_ik_message_one_never_connects() -> None:
    server_id = Identity.generate()
    pair = make_pair(ik=True, server_identity=server_id)
    recorded = take_all(pair.client)
    # An attacker replays the recording to a fresh responder with the same key.
    replay = Session(Role.RESPONDER, server_id)
    replay.receive_data(recorded)
    assert isinstance(replay.next_event(), PeerIdentified)
    replay.accept()
    assert take_all(replay)  # message 2 goes out...
    assert replay.peer is None  # ...but the initiator is not reported as connected
    assert replay.state is SessionState.CONFIRMING
    with pytest.raises(LocalProtocolError):
        replay.send(Spack("secret"))
    replay.receive_data(encode_frame(b"\x00" * 40))  # the attacker cannot forge READY
    with pytest.raises(HandshakeFailed):
        replay.next_event()


def test_replayed_ik_message_one_then_eof_is_a_failed_handshake() -> None:
    server_id = Identity.generate()
    client = Session(Role.INITIATOR, Identity.generate(), peer=server_id.public)
    replay = Session(Role.RESPONDER, server_id)
    replay.receive_data(take_all(client))
    replay.next_event()
    replay.accept()
    replay.receive_data(b"")
    with pytest.raises(HandshakeFailed, match="before confirming"):
        replay.next_event()


def test_eof_during_handshake_is_a_failed_handshake() -> None:
    pair = make_pair()
    pair.server.receive_data(take_all(pair.client)[:20])
    pair.server.receive_data(b"")
    with pytest.raises(HandshakeFailed, match="during the handshake"):
        pair.server.next_event()


def test_accept_outside_authorization_is_local_error() -> None:
    server = Session(Role.RESPONDER, Identity.generate())
    with pytest.raises(LocalProtocolError):
        server.accept()
    with pytest.raises(ValueError, match="initiator"):
        Session(Role.RESPONDER, Identity.generate(), peer=Identity.generate().public)


def test_send_before_handshake_is_local_error() -> None:
    pair = make_pair()
    with pytest.raises(LocalProtocolError):
        pair.client.send(Spack(1))


# -- spacks ---------------------------------------------------------------------------


EVERY_TYPE = Spack(
    None,
    True,
    False,
    0,
    -(2**63),
    2**64 - 1,
    1.5,
    Float32(0.25),
    "",
    "héllo",
    b"",
    b"\x00\xff",
    [1, [2, [3]]],
    (1, "two", (3.0,)),
    {"k": {"n": [None]}, b"raw": b"v"},
    array.array("d", [1.0, 2.5]),
    array.array("B", b"\x00\x01"),
)


@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
def test_spacks_of_every_type_both_ways(ik: bool) -> None:
    pair = connected_pair(ik=ik)
    pair.client.send(EVERY_TYPE)
    pair.server.send(EVERY_TYPE)
    pair.pump()
    assert messages(pair.server_events) == [EVERY_TYPE]
    assert messages(pair.client_events) == [EVERY_TYPE]


def test_empty_spack_round_trips() -> None:
    pair = connected_pair()
    pair.client.send(Spack())
    pair.pump()
    assert messages(pair.server_events) == [Spack()]


def test_queued_spacks_are_batched_into_one_noise_message() -> None:
    pair = connected_pair()
    for i in range(100):
        pair.client.queue(Spack(i, "x" * 10))
    pair.client.flush()
    wire = take_all(pair.client)
    frame_len = int.from_bytes(wire[:2], "big")
    assert len(wire) == 2 + frame_len  # one frame carries all hundred
    pair.server.receive_data(wire)
    assert messages(drain(pair.server)) == [Spack(i, "x" * 10) for i in range(100)]


def test_large_spack_is_fragmented_and_reassembled() -> None:
    payload = bytes(range(256)) * 20_000  # 5 MB
    pair = connected_pair()
    pair.client.send(Spack("big", payload))
    wire = take_all(pair.client)
    assert len(wire) > len(payload)
    pair.server.receive_data(wire)
    (spack,) = messages(drain(pair.server))
    assert spack[0] == "big"
    assert spack[1] == payload


@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
def test_fifty_mebibyte_spack_with_raised_limit(ik: bool) -> None:
    limit = SessionConfig(max_message_size=64 << 20)
    pair = connected_pair(ik=ik, client_config=limit, server_config=limit)
    payload = hashlib.sha256(b"seed").digest() * (50 * 1024 * 1024 // 32)
    pair.client.send(Spack(payload, array.array("q", range(1000))))
    pair.pump(chunk=1 << 20)
    (spack,) = messages(pair.server_events)
    assert spack[0] == payload
    assert spack[1] == array.array("q", range(1000))


def test_spack_over_peer_limit_is_refused_before_queueing() -> None:
    small = SessionConfig(max_message_size=4096)
    pair = connected_pair(server_config=small)
    assert pair.client.peer_max_message_size == 4096
    with pytest.raises(MessageTooLarge):
        pair.client.send(Spack(b"x" * 5000))
    assert take_all(pair.client) == b""
    pair.client.send(Spack(b"x" * 4000))  # still usable
    pair.pump()
    assert len(messages(pair.server_events)) == 1


def test_peer_exceeding_our_limit_is_a_protocol_error() -> None:
    small = SessionConfig(max_message_size=4096)
    pair = connected_pair(server_config=small)
    # A misbehaving client ignores the advertised limit.
    pair.client._sender.writer.add_message(Spack(b"x" * 200_000).encode())
    pair.client._sender.push(pair.client._sender.writer)
    pair.server.receive_data(take_all(pair.client))
    with pytest.raises(MessageLimitExceeded):
        drain(pair.server)
    pair.client.receive_data(take_all(pair.server))
    (close,) = drain(pair.client)
    assert isinstance(close, CloseReceived)
    assert close.code == CloseCode.MESSAGE_TOO_LARGE


def test_invalid_value_raises_before_anything_is_queued() -> None:
    pair = connected_pair()
    with pytest.raises(TypeError):
        pair.client.send(Spack({1, 2}))  # type: ignore[arg-type]
    assert take_all(pair.client) == b""
    pair.client.send(Spack("ok"))
    pair.pump()
    assert messages(pair.server_events) == [Spack("ok")]


def test_byte_at_a_time_delivery() -> None:
    pair = make_pair(ik=True)
    pair.pump(chunk=1)
    pair.client.send(Spack("a", b"b" * 70_000))
    pair.client.send(Spack("c"))
    pair.pump(chunk=1)
    assert messages(pair.server_events) == [Spack("a", b"b" * 70_000), Spack("c")]


def test_trickled_frame_is_joined_in_place_not_recopied() -> None:
    """A frame arriving a byte at a time grows one buffer: joining it costs linear time.

    Re-copying the partial frame on every byte would make a trickling peer cost the
    receiver quadratic work (about 2 GB of copying for one 64 KiB frame).
    """
    pair = connected_pair()
    pair.client.send(Spack(b"t" * 60_000))
    wire = take_all(pair.client)
    pair.server.receive_data(wire[:10])
    assert drain(pair.server) == []
    joined = None
    for offset in range(10, len(wire) - 1):
        pair.server.receive_data(wire[offset : offset + 1])
        assert drain(pair.server) == []
        joined = joined or pair.server._reader._in
        assert pair.server._reader._in is joined
    pair.server.receive_data(wire[-1:])
    assert messages(drain(pair.server)) == [Spack(b"t" * 60_000)]


def test_a_large_spack_is_encrypted_as_the_transport_takes_it() -> None:
    """Sending 32 MiB holds a few MiB at a time (the same at 4 or 64 MiB), not the spack."""
    limit = SessionConfig(max_message_size=64 << 20)
    pair = connected_pair(client_config=limit, server_config=limit)
    payload = bytes(32 << 20)
    tracemalloc.start()
    try:
        pair.client.send(Spack(payload))
        written = 0
        largest = 0
        # data_to_send() directly: its own behaviour (about 2 MiB encrypted per call) is
        # the point of this test.
        while chunk := pair.client.data_to_send():
            written += len(chunk)
            largest = max(largest, len(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written > len(payload)
    assert largest <= (2 << 20) + (64 << 10)
    assert peak < 8 << 20
    assert not pair.client.has_output


def test_records_queued_behind_a_large_spack_keep_their_order() -> None:
    """A PONG and a spack queued while a large spack is half encrypted go out after it.

    Encryption is first in, first out, so nonce order stays wire order; rekeys every
    three Noise messages land inside the large spack and both sides stay in step.
    """
    config = SessionConfig(rekey_after_messages=3, max_message_size=8 << 20)
    pair = connected_pair(client_config=config, server_config=config)
    big = bytes(range(256)) * (12 << 10)  # 3 MiB
    pair.client.send(Spack("big", big))
    # data_to_send() directly: what it leaves unencrypted is the point of this test.
    first = pair.client.data_to_send()  # about 2 MiB leaves; the rest is not encrypted yet
    assert len(first) <= (2 << 20) + (64 << 10)
    assert pair.client.has_output
    pair.server.ping(b"mid")
    pair.client.receive_data(take_all(pair.server))
    assert drain(pair.client) == []  # the PONG is queued behind the rest of the spack
    pair.client.send(Spack("after"))
    pair.server.receive_data(first)
    wire = take_all(pair.client)
    for offset in range(0, len(wire), 100_000):
        pair.server.receive_data(wire[offset : offset + 100_000])
    events = drain(pair.server)
    assert [type(event) for event in events] == [MessageReceived, PongReceived, MessageReceived]
    assert list(events[0].spack) == ["big", big]  # type: ignore[union-attr]
    assert events[1].payload == b"mid"  # type: ignore[union-attr]
    assert list(events[2].spack) == ["after"]  # type: ignore[union-attr]


def test_delivered_data_is_not_kept() -> None:
    """Once everything received is delivered, no received chunk stays referenced."""
    pair = connected_pair()
    for size in (10, 70_000, 300_000):
        pair.client.send(Spack(b"d" * size))
        pair.server.receive_data(take_all(pair.client))
        assert messages(drain(pair.server)) == [Spack(b"d" * size)]
        assert len(pair.server._reader._in) == 0
        assert not pair.server._reader._more


# -- rekey, ping, close -------------------------------------------------------------------


def test_rekey_by_message_count_keeps_both_sides_in_step() -> None:
    config = SessionConfig(rekey_after_messages=3)
    pair = connected_pair(client_config=config)
    sent = [Spack(i, b"y" * 100) for i in range(20)]
    keys = []
    for spack in sent:
        pair.client.send(spack)
        keys.append(pair.client._sealer.cipher._key)  # type: ignore[union-attr]
        pair.pump()
    assert messages(pair.server_events) == sent
    assert len(set(keys)) >= 6  # the sending key really changed, several times


def test_rekey_by_bytes_and_on_request() -> None:
    config = SessionConfig(rekey_after_bytes=100_000)
    pair = connected_pair(client_config=config, server_config=config)
    pair.client.send(Spack(b"z" * 1_000_000))
    pair.server.request_rekey()
    pair.server.send(Spack("after"))
    pair.server.send(Spack("again"))
    pair.pump()
    assert messages(pair.server_events) == [Spack(b"z" * 1_000_000)]
    assert messages(pair.client_events) == [Spack("after"), Spack("again")]


@pytest.mark.parametrize("how", ["requested", "by count"])
def test_close_on_a_rekey_boundary_stays_the_last_record(how: str) -> None:
    config = SessionConfig(rekey_after_messages=1 if how == "by count" else 1000)
    pair = connected_pair(client_config=config, server_config=config)
    if how == "requested":
        pair.client.request_rekey()
    pair.client.queue(Spack("x"))
    pair.client.close(CloseCode.NORMAL, "bye")
    pair.pump()
    assert pair.server_events == [MessageReceived(Spack("x")), CloseReceived(0, "bye")]


def test_refusal_close_on_a_rekey_boundary_is_still_a_refusal() -> None:
    pair = make_pair(authorize=False, server_config=SessionConfig(rekey_after_messages=1))
    with pytest.raises(PeerRefused):
        pair.pump()


def test_ping_is_answered_with_the_same_payload() -> None:
    pair = connected_pair()
    pair.client.ping(b"nonce")
    pair.pump()
    assert pair.client_events == [PongReceived(b"nonce")]
    with pytest.raises(ValueError, match="ping payload"):
        pair.client.ping(b"x" * 2000)


def test_answering_a_ping_does_not_flush_queued_spacks() -> None:
    pair = connected_pair()
    pair.server.queue(Spack("queued, not flushed"))
    pair.client.ping(b"p")
    pair.server.receive_data(take_all(pair.client))
    assert drain(pair.server) == []
    pong_only = take_all(pair.server)
    pair.client.receive_data(pong_only)
    assert drain(pair.client) == [PongReceived(b"p")]
    pair.server.flush()
    pair.pump()
    assert messages(pair.client_events) == [Spack("queued, not flushed")]


def test_close_is_authenticated_and_half_closes() -> None:
    pair = connected_pair()
    pair.client.queue(Spack("last"))
    pair.client.close(CloseCode.NORMAL, "done")
    pair.pump()
    assert pair.server_events == [MessageReceived(Spack("last")), CloseReceived(0, "done")]
    assert pair.server.next_event() == CloseReceived(0, "done")  # idempotent
    with pytest.raises(ConnectionClosed):
        pair.client.send(Spack("too late"))
    pair.client.close()  # idempotent
    pair.server.send(Spack("reply"))  # the other direction is still open
    pair.pump()
    assert messages(pair.client_events) == [Spack("reply")]


def test_eof_without_close_is_truncation() -> None:
    pair = connected_pair()
    pair.client.send(Spack(1))
    pair.server.receive_data(take_all(pair.client))
    pair.server.receive_data(b"")
    assert messages(drain_until_error(pair.server)) == [Spack(1)]
    with pytest.raises(ConnectionLost):
        pair.server.next_event()


def drain_until_error(session: Session) -> list[Event]:
    """:func:`helpers.drain`, keeping the events that came before an error."""
    events: list[Event] = []
    with contextlib.suppress(Exception):  # the caller checks the error next
        drain(session, events)
    return events


def test_eof_mid_frame_is_truncation_and_delivers_nothing_partial() -> None:
    pair = connected_pair()
    pair.client.send(Spack(b"q" * 100_000))
    wire = take_all(pair.client)
    pair.server.receive_data(wire[:-1])
    pair.server.receive_data(b"")
    with pytest.raises(ConnectionLost, match="middle of a frame"):
        drain(pair.server)


def test_eof_after_close_is_clean() -> None:
    pair = connected_pair()
    pair.client.close()
    pair.server.receive_data(take_all(pair.client))
    pair.server.receive_data(b"")
    assert drain(pair.server) == [CloseReceived(0, "")]
    assert pair.server.next_event() == CloseReceived(0, "")


@pytest.mark.parametrize("split", [False, True], ids=["same-segment", "later"])
def test_bytes_after_close_are_never_read(split: bool) -> None:
    """SPEC "Close": whatever follows CLOSE is discarded, however TCP segments it."""
    pair = connected_pair()
    pair.client.close()
    wire = take_all(pair.client)
    if split:
        pair.server.receive_data(wire)
        assert drain(pair.server) == [CloseReceived(0, "")]
        pair.server.receive_data(b"\xff" * 300)
    else:
        pair.server.receive_data(wire + b"\xff" * 300)
        assert drain(pair.server) == [CloseReceived(0, "")]
    assert pair.server.next_event() == CloseReceived(0, "")
    pair.server.receive_data(b"")
    assert pair.server.next_event() == CloseReceived(0, "")


# -- tampering --------------------------------------------------------------------------


def test_flipped_bit_fails_authentication_and_notifies_peer() -> None:
    pair = connected_pair()
    pair.client.send(Spack("secret"))
    wire = bytearray(take_all(pair.client))
    wire[5] ^= 0x01
    pair.server.receive_data(bytes(wire))
    with pytest.raises(DecryptionFailed):
        pair.server.next_event()
    assert pair.server.state is SessionState.FAILED
    pair.client.receive_data(take_all(pair.server))
    (close,) = drain(pair.client)
    assert isinstance(close, CloseReceived)
    assert close.code == CloseCode.PROTOCOL_ERROR


def _forge(pair_sender: Session, plaintext: bytes) -> bytes:
    """Encrypt a crafted plaintext with the sender's real cipher (a buggy peer)."""
    send = pair_sender._sealer.cipher
    assert send is not None
    return encode_frame(send.encrypt(plaintext))


def test_an_error_close_may_cut_a_spack_which_is_dropped() -> None:
    """SPEC "Messages": a CLOSE with an error code may come mid-spack; NORMAL may not."""
    pair = connected_pair()
    error_close = b"\x03\x00\x09\x00\x07gave up"  # CLOSE INTERNAL_ERROR "gave up"
    pair.server.receive_data(_forge(pair.client, b"\x02\x00\x01\x91" + error_close))
    assert drain(pair.server) == [CloseReceived(CloseCode.INTERNAL_ERROR, "gave up")]


@pytest.mark.parametrize(
    ("plaintext", "match"),
    [
        (b"", "no records"),
        (b"\x09\x00\x00", "unknown record kind"),
        (b"\x01\x01\x01\x90", "channel 1"),
        (b"\x01\x00\x05\x90", "claims 5 bytes"),
        (b"\x01\x00\x81\x00\x90", "non-minimal"),
        (b"\x01\x00\x81\x81\x81\x01", "longer than 3"),
        (b"\x01\x00\x80", "truncated varint"),
        (b"\x06\x00\x00\x01\x00\x01\x90", "after REKEY"),
        (b"\x03\x00\x02\x00\x00\x01\x00\x01\x90", "after CLOSE"),
        (b"\x07\x00\x00", "unexpected READY"),
        (b"\x06\x00\x01\x00", "empty body"),
        (b"\x02\x00\x00", "empty FRAGMENT"),
        (b"\x03\x00\x01\x00", "shorter than its code"),
        (b"\x03\x00\x03\x00\x00\xff", "not valid UTF-8"),
        (b"\x01\x00\x01\xc1", None),
        (b"\x01\x00\x02\x90\x90", None),
        (b"\x02\x00\x01\x91\x03\x00\x02\x00\x00", "middle of a fragmented"),
    ],
)
def test_malformed_records_are_fatal_and_deliver_nothing(
    plaintext: bytes, match: str | None
) -> None:
    pair = connected_pair()
    good = Spack("before")
    pair.client.send(good)
    pair.server.receive_data(take_all(pair.client))
    # A well-formed message in the same Noise message as the bad record must not leak out.
    forged = _forge(pair.client, b"\x01\x00\x02\x91\x07" + plaintext if plaintext else b"")
    pair.server.receive_data(forged)
    assert pair.server.next_event() == MessageReceived(good)
    with pytest.raises(ProtocolError, match=match):
        pair.server.next_event()
    with pytest.raises(ProtocolError):
        pair.server.next_event()


def test_record_kind_numbers_are_stable() -> None:
    assert [(k.name, int(k)) for k in RecordKind] == [
        ("MESSAGE", 1),
        ("FRAGMENT", 2),
        ("CLOSE", 3),
        ("PING", 4),
        ("PONG", 5),
        ("REKEY", 6),
        ("READY", 7),
        ("RESET", 8),
        ("WINDOW", 9),
        ("CONNECTION_WINDOW", 10),
    ]


def test_ping_in_a_rejected_message_is_not_answered() -> None:
    pair = connected_pair()
    pair.server.receive_data(_forge(pair.client, b"\x04\x00\x02hi" + b"\x01\x00\x01\xc1"))
    with pytest.raises(ProtocolError):
        drain(pair.server)
    pair.client.receive_data(take_all(pair.server))
    events = drain(pair.client)
    assert not any(isinstance(e, PongReceived) for e in events)
    assert isinstance(events[-1], CloseReceived)


def test_eof_inside_the_ready_frame_is_a_failed_handshake() -> None:
    server_id = Identity.generate()
    client = Session(Role.INITIATOR, Identity.generate(), peer=server_id.public)
    server = Session(Role.RESPONDER, server_id)
    server.receive_data(take_all(client))
    server.next_event()
    server.accept()
    client.receive_data(take_all(server))
    drain(client)
    server.receive_data(take_all(client)[:5])
    server.receive_data(b"")
    with pytest.raises(HandshakeFailed):
        server.next_event()


@pytest.mark.parametrize("item", ["hello", b"ab", {"a": 1}, 5, None, [1, 2]])
def test_only_spacks_can_be_sent(item: object) -> None:
    pair = connected_pair()
    with pytest.raises(InvalidSpackValue, match="take a Spack"):
        pair.client.send(item)  # type: ignore[arg-type]
    assert take_all(pair.client) == b""


def _outcome(
    plaintexts: Sequence[bytes], padded: bool, max_message_size: int = 4096
) -> tuple[list[object], str | None]:
    """What a receiver makes of ``plaintexts`` (each one Noise message): events, error."""
    pair = connected_pair(server_config=SessionConfig(max_message_size=max_message_size))
    pong = b"\x05\x00\x00"  # unsolicited: discarded, but the plaintext is no longer lone
    events: list[object] = []
    try:
        for plaintext in plaintexts:
            pair.server.receive_data(_forge(pair.client, plaintext + pong * padded))
            events += drain(pair.server)
    except (ProtocolError, MessageLimitExceeded) as exc:
        return events, f"{type(exc).__name__}: {exc}"
    return events, None


_spack_values: st.SearchStrategy[list[SpackValue]] = st.lists(
    st.binary(max_size=3000)
    | st.text(max_size=5)
    | st.lists(st.integers(-(2**63), 2**63 - 1), max_size=300),
    max_size=3,
)
_spack_encodings = _spack_values.map(lambda values: Spack(*values).encode())
#: Spacks whose pieces can fill their plaintexts (held as views while joined).
_large_spack_encodings = st.tuples(
    st.integers(0, 300), st.binary(min_size=4_000, max_size=12_000) | st.text(min_size=4_000)
).map(lambda values: Spack(*values).encode())


def _pieces(data: bytes, cuts: list[int], last: RecordKind) -> list[bytes]:
    """``data`` cut at ``cuts`` into FRAGMENT records, the last one of kind ``last``."""
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
    return [
        bytes((last if index == len(pieces) - 1 else RecordKind.FRAGMENT, 0))
        + encode_uvarint(len(body))
        + body
        for index, body in enumerate(pieces)
    ]


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.tuples(
            _spack_encodings | st.binary(max_size=40),
            st.lists(st.integers(0, 5000), max_size=3),
            st.sampled_from([RecordKind.MESSAGE, RecordKind.FRAGMENT]),
        ),
        max_size=4,
    )
)
def test_a_lone_piece_is_received_as_the_record_loop_receives_it(
    messages: list[tuple[bytes, list[int], RecordKind]],
) -> None:
    """Differential: a plaintext holding one MESSAGE or FRAGMENT takes a shorter path than
    the record loop; padded with a record that changes nothing, it takes the loop. Each
    message (a spack encoding or any bytes) is cut into pieces, the last one of ``last``."""
    plaintexts = []
    for data, cuts, last in messages:
        plaintexts += _pieces(data, cuts, last)
    assert _outcome(plaintexts, padded=False) == _outcome(plaintexts, padded=True)


def _joined_outcome(plaintexts: Sequence[bytes], join: int) -> tuple[list[object], bool]:
    """What a receiver joining pieces up to ``join`` bytes makes of ``plaintexts``: the
    events, and whether it failed (a never-valid spack may be refused with another code
    at its end than at its first piece)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reassembly, "JOIN_LIMIT", join)
        events, error = _outcome(plaintexts, padded=False, max_message_size=16_384)
    return events, error is not None


@pytest.mark.parametrize("cuts", [[6000], [6000, 6400], [6000, 12_000], [6000, 6400, 12_000]])
@pytest.mark.parametrize("together", [False, True])
def test_a_first_piece_that_fills_its_plaintext_is_joined_without_a_copy(
    cuts: list[int], together: bool
) -> None:
    """Differential: a first piece that fills its plaintext is held as it came (a view),
    then joined with what follows, or weighed with it when the spack outgrows joining;
    either way the receiver delivers what it delivers when it weighs pieces as they come."""
    spack = Spack(7, b"\xaa" * 14_000)
    records = _pieces(spack.encode(), cuts, RecordKind.MESSAGE)
    plaintexts = [b"".join(records)] if together else records
    weighed = _joined_outcome(plaintexts, 0)
    assert weighed == (
        [MessageReceived(spack)],
        False,
    )
    assert _joined_outcome(plaintexts, 9000) == weighed
    assert _joined_outcome(plaintexts, reassembly.JOIN_LIMIT) == weighed


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.tuples(
            _spack_encodings | st.binary(max_size=40) | _large_spack_encodings,
            st.lists(st.integers(0, 12_000), max_size=3),
            st.booleans(),
        ),
        max_size=4,
    ),
    join=st.sampled_from([1, 100, 3000, 9000]),
)
def test_joined_pieces_are_received_as_pieces_weighed_as_they_arrive(
    messages: list[tuple[bytes, list[int], bool]], join: int
) -> None:
    """Differential: the pieces of a small spack are joined and decoded at its end as one
    record; weighed as they arrive instead, the receiver delivers exactly the same spacks.
    Each message (a spack encoding or any bytes) is cut into pieces, in one Noise message
    or one per piece."""
    plaintexts = []
    for data, cuts, together in messages:
        records = _pieces(data, cuts, RecordKind.MESSAGE)
        plaintexts += [b"".join(records)] if together else records
    assert _joined_outcome(plaintexts, 0) == _joined_outcome(plaintexts, join)
    assert _joined_outcome(plaintexts, 0) == _joined_outcome(plaintexts, reassembly.JOIN_LIMIT)


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.tuples(
            _spack_encodings | st.binary(max_size=40),
            st.lists(st.integers(0, 3000), max_size=4),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_a_run_of_fragments_in_one_message_is_received_as_one_per_message(
    messages: list[tuple[bytes, list[int]]],
) -> None:
    """Differential: a run of FRAGMENT records in one Noise message is joined before it is
    decoded (the receiver's coalescing); sent one record per Noise message instead, the
    pieces give the same events, and the same verdict on a never-valid spack."""
    together: list[bytes] = []
    apart: list[bytes] = []
    for data, cuts in messages:
        records = _pieces(data, cuts, RecordKind.MESSAGE)
        together.append(b"".join(records))
        apart += records
    for join in (0, reassembly.JOIN_LIMIT):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(reassembly, "JOIN_LIMIT", join)
            events_together, error_together = _outcome(together, padded=False)
            events_apart, error_apart = _outcome(apart, padded=False)
        assert events_together == events_apart
        assert (error_together is None) == (error_apart is None)


def test_receiving_never_encrypts() -> None:
    """A PING received while a large spack waits to be encrypted queues its PONG and
    encrypts nothing: encryption happens only as data_to_send() hands output out."""
    config = SessionConfig(max_message_size=16 << 20)
    pair = connected_pair(client_config=config, server_config=config)
    pair.server.send(Spack(bytes(8 << 20)))
    first = pair.server.data_to_send()
    cipher = pair.server._sealer.cipher
    assert cipher is not None
    nonce = cipher._n  # one nonce per Noise message encrypted
    pair.client.ping(b"now")
    pair.server.receive_data(take_all(pair.client))
    assert drain(pair.server) == []
    assert cipher._n == nonce
    assert pair.server.has_output
    wire = first + take_all(pair.server)
    assert cipher._n > nonce + 50  # the rest of the spack, then the PONG, as output is taken
    pair.client.receive_data(wire)
    events = drain(pair.client)
    assert [type(event) for event in events] == [MessageReceived, PongReceived]


def test_the_events_made_per_spack_are_immutable_values_like_the_others() -> None:
    """MessageReceived sets its field through its slot, and ChannelMessageReceived is a
    named tuple the receiver builds with tuple.__new__ (both cheaper than a frozen
    dataclass's __init__): they still compare, print and refuse changes as every other
    event does."""
    event, other = MessageReceived(Spack(1)), MessageReceived(Spack(2))
    same = dataclasses.replace(event)
    assert same == event
    assert same != other
    assert dataclasses.astuple(event)[0] == Spack(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.spack = Spack(2)  # type: ignore[misc]
    on_channel = ChannelMessageReceived(Spack(1), 3, 4)
    assert tuple.__new__(ChannelMessageReceived, (Spack(1), 3, 4)) == on_channel
    assert on_channel != ChannelMessageReceived(Spack(1), 3, 5)
    assert on_channel._replace(size=5) == ChannelMessageReceived(Spack(1), 3, 5)
    with pytest.raises(AttributeError):
        on_channel.spack = Spack(2)  # type: ignore[misc]
    assert repr(on_channel) == "ChannelMessageReceived(spack=Spack(1), channel=3, size=4)"


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 200_000), min_size=1, max_size=6),
    chunk=st.integers(1, 70_000),
)
def test_input_waiting_false_means_next_event_needs_data(sizes: list[int], chunk: int) -> None:
    """``input_waiting`` lets a driver skip ``next_event`` when it would need data: checked
    at every step of spacks (large ones over several steps) arriving in chunks."""
    pair = connected_pair()
    for i, size in enumerate(sizes):
        pair.client.send(Spack(i, bytes(size)))
    wire = take_all(pair.client)
    server, received = pair.server, []
    for start in range(0, len(wire), chunk):
        server.receive_data(wire[start : start + chunk])
        while True:
            waiting = server.input_waiting
            event = server.next_event()
            if event is NEED_DATA:
                break
            assert waiting, event
            if isinstance(event, MessageReceived):
                received.append(event.spack)
    assert not server.input_waiting
    assert received == [Spack(i, bytes(size)) for i, size in enumerate(sizes)]
