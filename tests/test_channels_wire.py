"""Channels on the wire (SPEC "Channels"): the negotiated parameters and the record rules.

A connection has channels only when both parties sent the three channel parameters; a
version-1 peer sends none, and then nothing of the channel layer may appear on the wire.
"""

from __future__ import annotations

import msgpack
import pytest

from helpers import connected_pair
from stalk.errors import HandshakeFailed, ProtocolError
from stalk.handshake import ChannelParams, Params, decode_params, encode_params
from stalk.records import decode_window, encode_close, encode_uvarint, read_records
from stalk.session import SessionConfig
from stalk.wire import (
    MAX_CHANNEL_ID,
    MAX_CHANNELS_LIMIT,
    MAX_WINDOW,
    MIN_CHANNEL_WINDOW,
    MIN_CONNECTION_WINDOW,
    RecordKind,
)

OFFER = ChannelParams(max_channels=10, channel_window=65_536, connection_window=1 << 20)


def _payload(**fields: object) -> bytes:
    base: dict[str, object] = {"version": 1, "max_message_size": 1 << 20}
    base.update(fields)
    return msgpack.packb(base)


# -- parameters --------------------------------------------------------------------------


def test_channel_parameters_round_trip() -> None:
    assert decode_params(encode_params(1 << 20, OFFER)) == Params(1, 1 << 20, OFFER)


def test_without_channel_parameters_the_peer_is_version_1() -> None:
    assert encode_params(1 << 20) == _payload()
    assert decode_params(encode_params(1 << 20)).channels is None


@pytest.mark.parametrize(
    "fields",
    [
        {"max_channels": 10},
        {"max_channels": 10, "channel_window": 65_536},
        {"channel_window": 65_536, "connection_window": 1 << 20},
    ],
)
def test_some_channel_parameters_without_the_others_are_refused(fields: dict[str, int]) -> None:
    with pytest.raises(HandshakeFailed, match="not"):
        decode_params(_payload(**fields))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_channels", -1),
        ("max_channels", MAX_CHANNELS_LIMIT + 1),
        ("max_channels", True),
        ("max_channels", 1.0),
        ("channel_window", MIN_CHANNEL_WINDOW - 1),
        ("channel_window", MAX_WINDOW + 1),
        ("channel_window", "65536"),
        ("connection_window", MIN_CONNECTION_WINDOW - 1),
        ("connection_window", MAX_WINDOW + 1),
    ],
)
def test_channel_parameters_are_typed_and_bounded(name: str, value: object) -> None:
    fields: dict[str, object] = {
        "max_channels": 10,
        "channel_window": 65_536,
        "connection_window": 1 << 20,
    }
    fields[name] = value
    with pytest.raises(HandshakeFailed, match=name):
        decode_params(_payload(**fields))
    with pytest.raises(ValueError, match=name):
        ChannelParams(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("client", "server", "expected"),
    [(OFFER, OFFER, True), (OFFER, None, False), (None, OFFER, False), (None, None, False)],
)
@pytest.mark.parametrize("pattern", ["XX", "IK"])
def test_channels_are_on_only_when_both_parties_offer_them(
    client: ChannelParams | None, server: ChannelParams | None, expected: bool, pattern: str
) -> None:
    pair = connected_pair(
        ik=pattern == "IK",
        client_config=SessionConfig(channels=client),
        server_config=SessionConfig(channels=server),
    )
    initiator, responder = pair.client, pair.server
    assert initiator.channels is responder.channels is expected
    assert initiator.peer_channels == server
    assert responder.peer_channels == client


# -- records -----------------------------------------------------------------------------


def _record(kind: int, channel: int, body: bytes) -> bytes:
    return bytes((kind,)) + encode_uvarint(channel) + encode_uvarint(len(body)) + body


def _parse(plaintext: bytes, *, channels: bool = True) -> list[tuple[int, int, bytes]]:
    records, end = read_records(memoryview(plaintext), 0, None, channels=channels)
    assert end == len(plaintext)
    return [(record.kind, record.channel, bytes(record.body)) for record in records]


def test_version_1_knows_no_channel_and_no_channel_kind() -> None:
    with pytest.raises(ProtocolError, match="channel 0 only"):
        _parse(_record(RecordKind.MESSAGE, 1, b"\x90"), channels=False)
    for kind in (RecordKind.RESET, RecordKind.WINDOW, RecordKind.CONNECTION_WINDOW):
        with pytest.raises(ProtocolError, match="unknown record kind"):
            _parse(_record(kind, 0, b"\x01"), channels=False)


def test_records_of_many_channels_in_one_message() -> None:
    plaintext = b"".join(
        [
            _record(RecordKind.MESSAGE, 1, b"\x90"),
            _record(RecordKind.FRAGMENT, 2, b"\x91"),
            _record(RecordKind.CLOSE, 3, b"\x00\x00"),  # a channel's CLOSE need not be last
            _record(RecordKind.RESET, 5, encode_close(7, "why")),
            _record(RecordKind.WINDOW, 4, encode_uvarint(1000)),
            _record(RecordKind.WINDOW, 0, encode_uvarint(MAX_WINDOW)),
            _record(RecordKind.CONNECTION_WINDOW, 0, encode_uvarint(1)),
            _record(RecordKind.MESSAGE, MAX_CHANNEL_ID, b"\x90"),
            _record(RecordKind.CLOSE, 0, encode_close(0, "")),
        ]
    )
    assert [(kind, channel) for kind, channel, _ in _parse(plaintext)] == [
        (RecordKind.MESSAGE, 1),
        (RecordKind.FRAGMENT, 2),
        (RecordKind.CLOSE, 3),
        (RecordKind.RESET, 5),
        (RecordKind.WINDOW, 4),
        (RecordKind.WINDOW, 0),
        (RecordKind.CONNECTION_WINDOW, 0),
        (RecordKind.MESSAGE, MAX_CHANNEL_ID),
        (RecordKind.CLOSE, 0),
    ]


@pytest.mark.parametrize(
    ("plaintext", "match"),
    [
        (_record(RecordKind.MESSAGE, MAX_CHANNEL_ID + 1, b"\x90"), "exceeds"),
        (_record(RecordKind.RESET, 0, encode_close(7, "")), "RESET record on channel 0"),
        (_record(RecordKind.CONNECTION_WINDOW, 2, b"\x01"), "only channel 0"),
        (_record(RecordKind.PING, 2, b""), "only channel 0"),
        (_record(RecordKind.PONG, 2, b""), "only channel 0"),
        (_record(RecordKind.REKEY, 2, b""), "only channel 0"),
        (_record(RecordKind.READY, 2, b""), "only channel 0"),
        (_record(RecordKind.CLOSE, 2, encode_close(5, "")), "NORMAL with no reason"),
        (_record(RecordKind.CLOSE, 2, encode_close(0, "x")), "NORMAL with no reason"),
        (_record(RecordKind.FRAGMENT, 2, b""), "empty FRAGMENT"),
        (_record(RecordKind.RESET, 2, b"\x00"), "RESET record shorter than its code"),
        (_record(RecordKind.WINDOW, 2, b"\x00"), "not 1.."),
        (_record(RecordKind.WINDOW, 2, b""), "truncated"),
        (_record(RecordKind.WINDOW, 2, b"\x80\x00"), "minimal"),
        (_record(RecordKind.WINDOW, 2, b"\x01\x01"), "bytes after"),
        (_record(RecordKind.WINDOW, 2, encode_uvarint(MAX_WINDOW + 1)), "not 1.."),
        (
            _record(RecordKind.CLOSE, 0, b"\x00\x00") + _record(RecordKind.MESSAGE, 1, b"\x90"),
            "after CLOSE",
        ),
    ],
)
def test_channel_record_rules(plaintext: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        _parse(plaintext)


def test_decode_window() -> None:
    assert decode_window(memoryview(encode_uvarint(300))) == 300
