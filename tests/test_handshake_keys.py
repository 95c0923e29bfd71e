"""Every public key on the wire must be a canonical, usable X25519 key (SPEC 7 and 20).

A non-canonical key (bit 255 set, or u >= 2^255 - 19) gives the same DH results as its
canonical twin, so a handshake that sends the bit-255 twin of a real key succeeds unless the
receiver refuses it: one private key would then be a second identity, and a deny-listed key
would get back in. These tests send such keys at every position (XX msg1/msg2/msg3, IK
msg1/msg2; ``e`` and ``s``), in both roles, over the sans-IO Session, and check the refusal
code or authenticated CLOSE the other side receives and the typed error on the reading side.
"""

from __future__ import annotations

from functools import partial

import anyio
import pytest

from adversarial.peers import (
    LOW_ORDER_POINTS,
    NON_CANONICAL_POINTS,
    Initiator,
    Refused,
    Responder,
    Wire,
    client_handshake,
    close,
)
from helpers import connected_pair, drain, take_all
from stalk.connection import Connection
from stalk.errors import HandshakeFailed, InvalidPeerKey, PeerRefused
from stalk.events import PeerIdentified
from stalk.framing import encode_frame
from stalk.identity import Identity, PublicIdentity
from stalk.listener import listen
from stalk.records import Record, decode_close
from stalk.session import Role, Session, SessionState
from stalk.wire import CloseCode, RecordKind

#: Bad keys that need no private key: low-order points and unreduced u >= p.
JUNK_KEYS = {
    "low_order_zero": LOW_ORDER_POINTS["zero"],
    "low_order_order8_a": LOW_ORDER_POINTS["order8_a"],
    "low_order_p_minus_1": LOW_ORDER_POINTS["p_minus_1"],
    **NON_CANONICAL_POINTS,
}


def refusal_code(data: bytes | bytearray) -> int:
    """The code of a refusal verdict, checking it is the whole output."""
    assert data, "nothing was sent"
    assert data[0] != 0, "the responder answered instead of refusing"
    assert len(data) == 2 + data[1], "bytes after the refusal"
    return data[0]


def frame_body(data: bytes | bytearray) -> bytes:
    """The body of the one frame ``data`` holds."""
    length = int.from_bytes(data[:2], "big")
    assert len(data) == 2 + length, "not exactly one frame"
    return bytes(data[2:])


def respond_to(init: Initiator, server_identity: Identity) -> tuple[Session, Exception]:
    """Feed a hostile initiator's opening to a stalk responder; return its error."""
    server = Session(Role.RESPONDER, server_identity)
    server.receive_data(init.opening())
    with pytest.raises(HandshakeFailed) as info:
        drain(server)
    return server, info.value


def xx_to_msg3(init: Initiator, server: Session) -> None:
    """Run XX message 1 and 2 between a hostile initiator and a stalk responder."""
    server.receive_data(init.opening())
    assert drain(server) == []
    answer = take_all(server)
    assert answer[:1] == b"\x00"
    init.read_msg2(frame_body(answer[1:]))


def hostile_answer(client: Session, resp: Responder) -> bytes:
    """A hostile responder's verdict and message 2 for ``client``'s opening."""
    opening = take_all(client)
    resp.start(bytes(opening[:8]))
    assert resp.noise is not None
    resp.noise.read_message(frame_body(opening[8:]))
    return b"\x00" + encode_frame(resp.msg2())


def only_close(records: list[Record]) -> int:
    """The code of the one CLOSE record the responder sent instead of READY."""
    assert [r.kind for r in records] == [RecordKind.CLOSE]
    code, _reason = decode_close(records[0].body)
    return code


# -- the responder reads a bad key in message 1: refused with INVALID_KEY -----------------------


@pytest.mark.parametrize("pattern", ["XX", "IK"])
def test_responder_refuses_bit_255_twin_of_a_real_ephemeral(pattern: str) -> None:
    server_identity = Identity.generate()
    ik = pattern == "IK"
    init = Initiator(server=server_identity.public if ik else None, twin_e=True)
    server, error = respond_to(init, server_identity)
    assert type(error) is InvalidPeerKey
    assert "ephemeral key" in str(error)
    assert "bit 255" in str(error)
    assert refusal_code(take_all(server)) == CloseCode.INVALID_KEY
    assert server.state is SessionState.FAILED


@pytest.mark.parametrize("name", JUNK_KEYS)
@pytest.mark.parametrize("pattern", ["XX", "IK"])
def test_responder_refuses_a_bad_ephemeral(pattern: str, name: str) -> None:
    server_identity = Identity.generate()
    ik = pattern == "IK"
    init = Initiator(server=server_identity.public if ik else None, low_e=JUNK_KEYS[name])
    server, error = respond_to(init, server_identity)
    assert type(error) is InvalidPeerKey
    assert refusal_code(take_all(server)) == CloseCode.INVALID_KEY


@pytest.mark.parametrize("name", ["twin", *JUNK_KEYS])
def test_ik_responder_refuses_a_bad_static_before_authorization(name: str) -> None:
    server_identity = Identity.generate()
    if name == "twin":
        init = Initiator(server=server_identity.public, twin_s=True)
    else:
        init = Initiator(server=server_identity.public, low_s=JUNK_KEYS[name])
    server = Session(Role.RESPONDER, server_identity)
    server.receive_data(init.opening())
    events: list[object] = []
    with pytest.raises(InvalidPeerKey, match="static key in IK message 1"):
        events.extend(drain(server))
    assert not any(isinstance(e, PeerIdentified) for e in events)
    assert refusal_code(take_all(server)) == CloseCode.INVALID_KEY


def test_ik_initiator_sees_the_refusal_as_peer_refused() -> None:
    # The stalk side of the refusal: a responder that says INVALID_KEY.
    server_identity = Identity.generate()
    client = Session(Role.INITIATOR, Identity.generate(), peer=server_identity.public)
    take_all(client)
    client.receive_data(bytes([CloseCode.INVALID_KEY, 3]) + b"bad")
    with pytest.raises(PeerRefused, match="INVALID_KEY") as info:
        drain(client)
    assert info.value.code == CloseCode.INVALID_KEY


# -- XX message 3: the verdict is given, so an authenticated CLOSE replaces READY -------------


def test_xx_responder_closes_with_invalid_key_for_a_twin_static() -> None:
    server_identity = Identity.generate()
    server = Session(Role.RESPONDER, server_identity)
    init = Initiator(twin_s=True)
    xx_to_msg3(init, server)
    server.receive_data(encode_frame(init.msg3()))
    events: list[object] = []
    with pytest.raises(InvalidPeerKey, match="static key in XX message 3"):
        events.extend(drain(server))
    assert not any(isinstance(e, PeerIdentified) for e in events)
    assert server.peer is None
    transport = init.transport()
    assert only_close(transport.open(frame_body(take_all(server)))) == CloseCode.INVALID_KEY
    assert server.close_sent
    # The error stays the one reported, and nothing more is sent.
    with pytest.raises(InvalidPeerKey):
        server.next_event()
    assert take_all(server) == b""


@pytest.mark.parametrize("name", ["zero", "zero_bit255", "order8_b"])
def test_xx_responder_just_closes_for_a_low_order_static(name: str) -> None:
    # The DH right after a low-order s fails inside Noise: no transport keys exist, so
    # nothing can be authenticated and nothing is sent; the error still names the key.
    server = Session(Role.RESPONDER, Identity.generate())
    init = Initiator(low_s=LOW_ORDER_POINTS[name])
    xx_to_msg3(init, server)
    server.receive_data(encode_frame(init.msg3()))
    with pytest.raises(InvalidPeerKey, match="static key in XX message 3"):
        drain(server)
    assert take_all(server) == b""


def test_xx_initiator_sees_the_close_as_peer_refused() -> None:
    # The stalk side of that CLOSE: a responder that answers message 3 with
    # CLOSE(INVALID_KEY) instead of READY.
    resp = Responder()
    client = Session(Role.INITIATOR, Identity.generate())
    client.receive_data(hostile_answer(client, resp))
    assert drain(client) == []
    assert resp.noise is not None
    resp.noise.read_message(frame_body(take_all(client)))
    client.receive_data(resp.transport().seal(close(CloseCode.INVALID_KEY, b"bad key")))
    with pytest.raises(PeerRefused, match="INVALID_KEY") as info:
        drain(client)
    assert info.value.code == CloseCode.INVALID_KEY


# -- the initiator reads a bad key in message 2: InvalidPeerKey, nothing more sent -------------


@pytest.mark.parametrize(
    ("pattern", "knob", "where"),
    [
        ("XX", {"twin_e": True}, "ephemeral key in XX message 2"),
        ("XX", {"twin_s": True}, "static key in XX message 2"),
        ("XX", {"low_e": NON_CANONICAL_POINTS["p_plus_9"]}, "ephemeral key in XX message 2"),
        ("XX", {"low_s": LOW_ORDER_POINTS["one"]}, "static key in XX message 2"),
        ("IK", {"twin_e": True}, "ephemeral key in IK message 2"),
        ("IK", {"low_e": LOW_ORDER_POINTS["order8_a"]}, "ephemeral key in IK message 2"),
    ],
)
def test_initiator_fails_with_invalid_peer_key(
    pattern: str, knob: dict[str, object], where: str
) -> None:
    server_identity = Identity.generate()
    resp = Responder(identity=server_identity, **knob)  # type: ignore[arg-type]
    peer = server_identity.public if pattern == "IK" else None
    client = Session(Role.INITIATOR, Identity.generate(), peer=peer)
    client.receive_data(hostile_answer(client, resp))
    with pytest.raises(InvalidPeerKey, match=where):
        drain(client)
    assert client.state is SessionState.FAILED
    assert take_all(client) == b""  # no message 3, no READY
    assert client.peer is None


@pytest.mark.parametrize("ik", [False, True])
def test_honest_handshakes_are_unaffected(ik: bool) -> None:
    pair = connected_pair(ik=ik)
    assert pair.client.peer == pair.server.identity.public
    assert pair.server.peer == pair.client.identity.public


# -- the finding: a deny-listed key must not get back in as its bit-255 twin ------------------


@pytest.mark.parametrize("pattern", ["XX", "IK"])
async def test_deny_listed_key_cannot_return_as_its_bit_255_twin(
    anyio_backend: str, pattern: str
) -> None:
    server = Identity.generate()
    denied = Identity.generate()
    asked: list[PublicIdentity] = []
    admitted: list[PublicIdentity] = []

    def authorize(peer: PublicIdentity) -> bool:
        asked.append(peer)
        return peer != denied.public

    async def handler(conn: Connection) -> None:
        admitted.append(conn.peer)

    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(listen, "127.0.0.1", 0, handler, identity=server, authorize=authorize)
        )
        pin = server.public if pattern == "IK" else None
        outcomes: dict[bool, int | None] = {}
        for twin in (False, True):
            wire = await Wire.connect(host, port)
            init = Initiator(server=pin, identity=denied, twin_s=twin)
            with anyio.fail_after(5):
                with pytest.raises(Refused) as info:
                    await client_handshake(wire, init)
                outcomes[twin] = info.value.code
            await wire.aclose()
        tg.cancel_scope.cancel()
    # The real key reaches authorize and is denied; its twin never reaches it: refused
    # before the verdict (IK) or by an authenticated CLOSE instead of READY (XX).
    assert outcomes == {False: CloseCode.NOT_AUTHORIZED, True: CloseCode.INVALID_KEY}
    assert asked == [denied.public]
    assert admitted == []
