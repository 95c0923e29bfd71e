"""Receiving on a connection with channels (stalk.demux through the session).

The peer here is a forger: it encrypts hand-built plaintexts with the client session's real
sending cipher, so every record rule of SPEC "Channels" can be tried, valid or not.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stalk.receiver as receiver_module
import stalk.record_loop as record_loop
from helpers import Pair, connected_pair, drain, take_all
from stalk.errors import ChannelLimitExceeded, FlowControlError, ProtocolError
from stalk.events import (
    PAUSED,
    ChannelCloseReceived,
    ChannelMessageReceived,
    ChannelOpened,
    ChannelResetReceived,
    CloseReceived,
    Event,
)
from stalk.framing import encode_frame
from stalk.handshake import ChannelParams
from stalk.record_loop import RECORD_COST
from stalk.records import Record, encode_close, encode_uvarint, read_channel_records
from stalk.session import Session, SessionConfig
from stalk.spack import Spack, encode_spack
from stalk.wire import CloseCode, RecordKind

SERVER = ChannelParams(max_channels=2, channel_window=4096, connection_window=65_516)
CLIENT = ChannelParams(max_channels=4, channel_window=8192, connection_window=1 << 20)


def _pair() -> Pair:
    return connected_pair(
        client_config=SessionConfig(channels=CLIENT),
        server_config=SessionConfig(channels=SERVER),
    )


def _record(kind: int, channel: int, body: bytes) -> bytes:
    return bytes((kind,)) + encode_uvarint(channel) + encode_uvarint(len(body)) + body


def _message(channel: int, spack: Spack) -> bytes:
    return _record(RecordKind.MESSAGE, channel, encode_spack(spack))


def _forge(sender: Session, *records: bytes) -> bytes:
    """One transport message of ``records``, encrypted with the sender's real cipher."""
    cipher = sender._sealer.cipher
    assert cipher is not None
    return encode_frame(cipher.encrypt(b"".join(records)))


def _deliver(pair: Pair, *records: bytes) -> list[Event]:
    pair.server.receive_data(_forge(pair.client, *records))
    return drain(pair.server)


def _fails(pair: Pair, error: type[Exception], match: str, *records: bytes) -> None:
    pair.server.receive_data(_forge(pair.client, *records))
    with pytest.raises(error, match=match):
        drain(pair.server)
    # The peer is told why, with the error's code, as for any protocol error.
    pair.client.receive_data(take_all(pair.server))
    close = drain(pair.client)[-1]
    assert isinstance(close, CloseReceived)
    assert close.code == getattr(error, "close_code", CloseCode.PROTOCOL_ERROR)


def test_the_peer_opens_channels_by_sending_on_them() -> None:
    pair = _pair()
    events = _deliver(
        pair,
        _message(1, Spack("one")),
        _message(0, Spack("zero")),
        _message(3, Spack("three")),
        _message(1, Spack("one again")),
    )
    one, zero, three, again = (
        len(encode_spack(Spack(text))) for text in ("one", "zero", "three", "one again")
    )
    assert events == [
        ChannelOpened(1),
        ChannelOpened(3),
        ChannelMessageReceived(Spack("one"), 1, one),
        ChannelMessageReceived(Spack("zero"), 0, zero),
        ChannelMessageReceived(Spack("three"), 3, three),
        ChannelMessageReceived(Spack("one again"), 1, again),
    ]


def test_spacks_in_pieces_are_rebuilt_per_channel() -> None:
    pair = _pair()
    a, b = encode_spack(Spack("a" * 40)), encode_spack(Spack("b" * 30))
    events = _deliver(
        pair,
        _record(RecordKind.FRAGMENT, 1, a[:10]),
        _record(RecordKind.FRAGMENT, 3, b[:5]),
        _record(RecordKind.FRAGMENT, 1, a[10:20]),
    )
    assert events == [ChannelOpened(1), ChannelOpened(3)]
    events = _deliver(
        pair, _record(RecordKind.MESSAGE, 3, b[5:]), _record(RecordKind.MESSAGE, 1, a[20:])
    )
    assert events == [
        ChannelMessageReceived(Spack("b" * 30), 3, len(b)),
        ChannelMessageReceived(Spack("a" * 40), 1, len(a)),
    ]


def test_a_channel_closes_one_way_and_the_other_goes_on() -> None:
    pair = _pair()
    events = _deliver(pair, _message(1, Spack(1)), _record(RecordKind.CLOSE, 1, b"\x00\x00"))
    assert events[-1] == ChannelCloseReceived(1)
    _fails(pair, ProtocolError, "data received on channel 1", _message(1, Spack(2)))


def test_a_close_in_the_middle_of_a_channels_spack_is_an_error() -> None:
    pair = _pair()
    _deliver(pair, _record(RecordKind.FRAGMENT, 1, b"\x92"))
    _fails(pair, ProtocolError, "middle", _record(RecordKind.CLOSE, 1, b"\x00\x00"))


def test_the_connection_cannot_close_normally_with_a_channel_mid_spack() -> None:
    pair = _pair()
    _deliver(pair, _record(RecordKind.FRAGMENT, 1, b"\x92"))
    _fails(pair, ProtocolError, "middle", _record(RecordKind.CLOSE, 0, encode_close(0, "")))


def test_an_error_close_may_cut_a_channels_spack_which_is_dropped() -> None:
    """SPEC "Messages": a failing peer's CLOSE with an error code may come mid-spack (it may
    have been waiting for credit); the incomplete spack is dropped, the error reported."""
    pair = _pair()
    assert _deliver(pair, _record(RecordKind.FRAGMENT, 1, b"\x92")) == [ChannelOpened(1)]
    events = _deliver(
        pair,
        _message(3, Spack("whole")),
        _record(RecordKind.FRAGMENT, 0, b"\x91"),
        _record(RecordKind.CLOSE, 0, encode_close(CloseCode.INTERNAL_ERROR, "gave up")),
    )
    whole = len(encode_spack(Spack("whole")))
    assert events == [
        ChannelOpened(3),
        ChannelMessageReceived(Spack("whole"), 3, whole),
        CloseReceived(CloseCode.INTERNAL_ERROR, "gave up"),
    ]


def test_a_reset_is_reported_and_answered_once_released() -> None:
    pair = _pair()
    events = _deliver(
        pair,
        _record(RecordKind.FRAGMENT, 1, b"\x92"),
        _record(RecordKind.RESET, 1, encode_close(0x1234, "stop")),
    )
    assert events == [ChannelOpened(1), ChannelResetReceived(1, 0x1234, "stop")]
    assert not pair.server.has_output  # the answer waits for the application
    _fails_later = _forge(pair.client, _message(1, Spack(1)))
    pair.server.release_channel(1)
    pair.client.receive_data(take_all(pair.server))
    # The client has no channel 1 of its own in its table (it forged it), so its RESET
    # answer is checked by the client's parser: a RESET for a channel it never opened.
    with pytest.raises(ProtocolError, match="never opened"):
        drain(pair.client)
    pair.server.receive_data(_fails_later)
    with pytest.raises(ProtocolError, match="ended"):
        drain(pair.server)


def test_data_beyond_the_channel_window_is_a_flow_control_error() -> None:
    pair = _pair()
    body = encode_spack(Spack(b"x" * 5000))  # more than the 4096 granted per channel
    _fails(pair, FlowControlError, "exceed", _record(RecordKind.MESSAGE, 1, body))


def test_a_run_of_spacks_beyond_channel_0s_window_names_the_spack_that_crossed_it() -> None:
    """Whole spacks on channel 0 in a row are counted together; beyond the window, the
    error is the one counting them one by one gives: the spack that crossed it."""
    body = encode_spack(Spack(b"z" * 1500))  # three of them: more than the 4096 granted
    run = [_record(RecordKind.MESSAGE, 0, body)] * 3
    assert len(body) == 1504
    _fails(_pair(), FlowControlError, "^1504 data bytes on channel 0 exceed the 1088", *run)
    _deliver(pair := _pair(), *run[:2], _record(RecordKind.PING, 0, b""))
    _fails(pair, FlowControlError, "^1504 data bytes on channel 0 exceed the 1088", run[0])


def _pieces(channel: int, size: int, cuts: int) -> list[bytes]:
    """A spack of ``size`` bytes of text on ``channel``, in ``cuts`` FRAGMENTs and a MESSAGE."""
    body = encode_spack(Spack("q" * size))
    step = max(1, len(body) // (cuts + 1))
    parts = [body[i * step : (i + 1) * step] for i in range(cuts)] + [body[cuts * step :]]
    kinds = [RecordKind.FRAGMENT] * cuts + [RecordKind.MESSAGE]
    return [_record(kind, channel, part) for kind, part in zip(kinds, parts, strict=True)]


def _as_routed_one_by_one(view: memoryview, pos: int, stop: int) -> tuple[list[Record], int, int]:
    """The channel parser without its count of a run: the demux routes record by record."""
    records, pos, _ = read_channel_records(view, pos, stop)
    return records, pos, -1


_SPACKS = st.lists(
    st.tuples(st.sampled_from([0, 0, 0, 1]), st.integers(0, 1500), st.integers(0, 2)),
    min_size=1,
    max_size=12,
)


def _split(messages: list[tuple[list[bytes], bool]], moves: list[int]) -> None:
    """Move the last ``moves[i]`` records of message ``i`` to the start of the next one
    (each message keeps one), so that spacks' pieces straddle Noise messages."""
    for i, move in enumerate(moves[: len(messages) - 1]):
        records, _ = messages[i]
        take = min(move, len(records) - 1)
        if take:
            messages[i + 1][0][:0] = records[-take:]
            del records[-take:]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(_SPACKS, st.booleans()), min_size=1, max_size=4),
    st.lists(st.integers(0, 3), max_size=3),
    st.sampled_from([1, 2, 64]),
)
def test_a_batch_the_parser_counted_is_routed_as_record_by_record(
    spacks_by_message: list[tuple[list[tuple[int, int, int]], bool]],
    moves: list[int],
    batch: int,
) -> None:
    """Differential: a batch of channel 0's data (whole spacks, perhaps the end of one and
    the start of another) is counted against credit at once, from the parser's count; the
    general way counts each record in turn. Both must deliver the same events, hold the
    same credit and spack in progress, give the assembly slot to the same channel, and
    refuse the same spack with the same error (the windows are 4,096 bytes: batches cross
    them)."""
    messages = [
        ([record for spec in spacks for record in _pieces(*spec)], release)
        for spacks, release in spacks_by_message
    ]
    _split(messages, moves)
    pairs = [_pair(), _pair()]
    outcomes: list[list[object]] = [[], []]
    for index, pair in enumerate(pairs):
        with contextlib.ExitStack() as stack:
            if index:
                stack.enter_context(
                    mock.patch.object(record_loop, "read_channel_records", _as_routed_one_by_one)
                )
            stack.enter_context(mock.patch.object(receiver_module, "STEP", batch * RECORD_COST))
            stack.enter_context(mock.patch.object(record_loop, "STEP", batch * RECORD_COST))
            for records, release in messages:
                pair.server.receive_data(_forge(pair.client, *records))
                try:
                    events = drain(pair.server)
                except ProtocolError as exc:
                    outcomes[index].append((type(exc), str(exc)))
                    break
                outcomes[index].append(events)
                if release:
                    for event in events:
                        if isinstance(event, ChannelMessageReceived):
                            pair.server.release(event.channel, event.size)
                table, demux = pair.server._channels, pair.server._ops.demux
                assert table is not None
                assert demux is not None
                outcomes[index].append(
                    [
                        (credit.receive, credit.held, credit.released)
                        for credit in (table.channel0, table.connection)
                    ]
                )
                outcomes[index].append((dict(demux._partial), demux.slot))
                outcomes[index].append(take_all(pair.server) != b"")
    assert outcomes[0] == outcomes[1]


def test_data_beyond_the_connection_window_is_a_flow_control_error() -> None:
    pair = connected_pair(
        client_config=SessionConfig(channels=CLIENT),
        server_config=SessionConfig(
            channels=ChannelParams(max_channels=50, channel_window=65_516, connection_window=65_516)
        ),
    )
    spack = encode_spack(Spack(b"y" * 30_000))
    records = [_record(RecordKind.MESSAGE, channel, spack) for channel in (1, 3)]
    _deliver(pair, *records)  # 60,000 bytes of 65,516
    _fails(pair, FlowControlError, "the connection", _record(RecordKind.MESSAGE, 5, spack))


def test_opening_more_channels_than_allowed_is_an_error() -> None:
    pair = _pair()
    _deliver(pair, _message(1, Spack()), _message(3, Spack()))
    _fails(pair, ChannelLimitExceeded, "limit of 2", _message(5, Spack()))


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (_message(2, Spack()), "never opened"),  # the responder's parity
        (_record(RecordKind.WINDOW, 1, b"\x01"), "never opened"),
        (_record(RecordKind.RESET, 1, b"\x00\x00"), "never opened"),
    ],
)
def test_records_the_peer_may_not_send(record: bytes, match: str) -> None:
    _fails(_pair(), ProtocolError, match, record)


def test_credit_granted_past_the_maximum_is_a_flow_control_error() -> None:
    record = _record(RecordKind.WINDOW, 0, encode_uvarint(2**31 - 1))
    _fails(_pair(), FlowControlError, "past", record)


def test_credit_goes_back_as_the_application_releases_spacks() -> None:
    """A WINDOW once a quarter of the window is released; the peer's credit grows by it."""
    pair = _pair()
    spack = Spack(b"z" * 500)
    size = len(encode_spack(spack))
    table = pair.client._channels
    assert table is not None
    events = _deliver(pair, *[_message(0, spack)] * 3)
    assert [event.size for event in events if isinstance(event, ChannelMessageReceived)] == [
        size
    ] * 3
    pair.server.release(0, size)
    pair.server.release(0, size)
    assert not pair.server.has_output  # 1,006 bytes: under a quarter of the 4,096 granted
    pair.server.release(0, size)
    assert pair.server.has_output
    before = table.channel0.send
    pair.client.receive_data(take_all(pair.server))
    assert drain(pair.client) == []
    assert table.channel0.send == before + 3 * size
    assert table.connection.send == SERVER.connection_window  # 1,509 < a quarter of it


def test_a_spack_larger_than_the_window_arrives_through_the_assembly_slot() -> None:
    """Out of credit inside a spack: its pieces are granted back as they arrive."""
    pair = _pair()
    body = encode_spack(Spack(b"s" * 20_000))  # five times the channel window
    table = pair.client._channels
    assert table is not None
    pieces = [body[at : at + 4096] for at in range(0, len(body), 4096)]
    events: list[Event] = []
    for index, piece in enumerate(pieces):
        kind = RecordKind.MESSAGE if index == len(pieces) - 1 else RecordKind.FRAGMENT
        events += _deliver(pair, _record(kind, 0, piece))
        # What the server granted back reaches the client before it sends more.
        pair.client.receive_data(take_all(pair.server))
        drain(pair.client)
        assert table.channel0.send >= 0
    assert events == [ChannelMessageReceived(Spack(b"s" * 20_000), 0, len(body))]
    assert pair.server._receiver is not None
    demux = pair.server._receiver.demux
    assert demux is not None
    assert demux.slot == 0
    pair.server.release(0, len(body))
    assert demux.slot is None


def test_the_slot_is_freed_by_the_release_of_its_own_spack_not_of_those_before_it() -> None:
    """Spacks of the slot's channel that came before the slot's spack are released first
    (in order), and each grants its own bytes back; only the release of the slot's spack
    frees the slot, which then goes to the channel stuck without credit. No byte is
    granted back twice."""
    pair = _pair()
    small = [Spack(f"small {n}") for n in range(2)]
    events = _deliver(pair, *(_message(1, spack) for spack in small))
    large = Spack(b"s" * 9000)  # past what channel 1 has left: it takes the slot
    body = encode_spack(large)
    left = SERVER.channel_window - sum(len(encode_spack(spack)) for spack in small)
    pieces = [body[:left]] + [body[at : at + 2000] for at in range(left, len(body), 2000)]
    for index, piece in enumerate(pieces):
        kind = RecordKind.MESSAGE if index == len(pieces) - 1 else RecordKind.FRAGMENT
        events += _deliver(pair, _record(kind, 1, piece))
    server = pair.server
    assert server._receiver is not None
    assert server._channels is not None
    demux, table = server._receiver.demux, server._channels
    assert demux is not None
    assert demux.slot == 1
    # Channel 3 runs out of its credit inside a spack: it waits for the slot.
    _deliver(pair, _record(RecordKind.FRAGMENT, 3, b"\x91" + b"\xc4" * 4095))
    delivered = [event for event in events if isinstance(event, ChannelMessageReceived)]
    assert [event.spack for event in delivered] == [*small, large]
    for event in delivered[:2]:
        server.release(1, event.size)
        assert demux.slot == 1
    server.release(1, delivered[2].size)
    assert demux.slot == 3
    credit = table.channels[1].credit
    assert credit.held == 0
    assert credit.receive + credit.released == SERVER.channel_window


def test_a_messages_grants_go_in_record_order_then_its_pongs() -> None:
    """What one message makes us owe: its grants in record order, then its PONGs, together.

    4,000 records take more than one parsing batch, so the PING's message is routed and
    answered in several steps; the grant its last record calls for still goes first, in
    the same plaintext (SPEC "Channels", "How stalk sends and grants").
    """
    pair = _pair()
    body = encode_spack(Spack(b"s" * 20_000))
    pong = _record(RecordKind.PONG, 0, b"")  # unsolicited: discarded
    ping = _record(RecordKind.PING, 0, b"ping")
    fragment = _record(RecordKind.FRAGMENT, 0, body[:4096])  # the window, all of it
    assert _deliver(pair, ping, *[pong] * 4000, fragment) == []
    data = take_all(pair.server)
    assert data[:2] == (len(data) - 2).to_bytes(2, "big")  # one transport message
    assert pair.client._receiver is not None
    plaintext = pair.client._receiver._cipher.decrypt(data[2:])
    assert plaintext == (
        _record(RecordKind.WINDOW, 0, encode_uvarint(4096))
        + _record(RecordKind.CONNECTION_WINDOW, 0, encode_uvarint(4096))
        + _record(RecordKind.PONG, 0, b"ping")
    )


def test_a_rapid_open_reset_flood_holds_at_most_max_channels() -> None:
    """CVE-2023-44487's shape: channels opened and reset in one flight, over and over.

    Until the application lets go of a reset channel it keeps its slot, so the peer gets
    at most ``max_channels`` in hand (then CHANNEL_LIMIT); a server that lets go at once
    holds none, and each cycle costs the same small work (the table never grows).
    """
    pair = _pair()
    flood = [
        record
        for channel in (1, 3, 5)
        for record in (_message(channel, Spack()), _record(RecordKind.RESET, channel, b"\x00\x00"))
    ]
    pair.server.receive_data(_forge(pair.client, *flood))
    with pytest.raises(ChannelLimitExceeded):
        drain(pair.server)  # channel 5 would be a third one in hand: the limit is 2

    pair = _pair()
    table = pair.server._channels
    assert table is not None
    for cycle in range(200):
        channel = 2 * cycle + 1
        events = _deliver(
            pair, _message(channel, Spack()), _record(RecordKind.RESET, channel, b"\x00\x00")
        )
        assert events[-1] == ChannelResetReceived(channel, 0, "")
        pair.server.release_channel(channel)
        assert len(table.channels) == 0
        take_all(pair.server)  # the answers go out; nothing accumulates
        assert not pair.server.has_output


def test_a_window_flood_costs_no_memory() -> None:
    """WINDOW records owe nothing back; credit is capped, not accumulated without bound."""
    pair = _pair()
    for _ in range(100):
        _deliver(pair, *[_record(RecordKind.WINDOW, 0, encode_uvarint(1000))] * 100)
    assert not pair.server.has_output
    table = pair.server._channels
    assert table is not None
    assert table.channel0.send == CLIENT.channel_window + 100 * 100 * 1000
    _fails(pair, FlowControlError, "past", _record(RecordKind.WINDOW, 0, encode_uvarint(2**31 - 1)))


# -- the one-record shortcut against the record loop ----------------------------------------

_Rec = tuple[int, int, bytes]

# One plaintext the forger sends: a list of (kind, channel, body) records. Mostly one
# MESSAGE alone (the shortcut's case: valid spacks, bytes that do not decode, empty
# bodies, spacks past the windows, ids of either parity and beyond the limit), some in
# pieces or beside other records (the record loop's), and resets.
_CHANNELS = st.sampled_from([0, 0, 1, 3, 5, 7, 2, 200])
_SPACK_BODY = st.one_of(
    st.binary(max_size=40).map(lambda data: encode_spack(Spack(data))),
    st.integers(100, 9000).map(lambda size: encode_spack(Spack(b"v" * size))),
    st.binary(max_size=6),  # mostly not a spack: refused, whichever path reads it
)
_LONE = st.tuples(st.just(RecordKind.MESSAGE), _CHANNELS, _SPACK_BODY).map(lambda r: [[r]])


def _in_pieces(
    channel: int, body: bytes, size: int, together: bool, empty_end: bool
) -> list[list[_Rec]]:
    """``body`` as FRAGMENTs of ``size`` and a final MESSAGE (perhaps an empty one after
    them all): one plaintext, or one each."""
    cuts = [body[at : at + size] for at in range(0, len(body), size)] or [b""]
    if empty_end:
        cuts.append(b"")
    records: list[_Rec] = [(RecordKind.FRAGMENT, channel, cut) for cut in cuts[:-1] if cut]
    records.append((RecordKind.MESSAGE, channel, cuts[-1]))
    return [records] if together else [[record] for record in records]


_LARGE_BODY = st.integers(3000, 12_000).map(lambda size: encode_spack(Spack(b"w" * size)))
# Past what the reassembler joins: its later pieces go to a decoder as they arrive.
_HUGE_BODY = st.integers(66_000, 80_000).map(lambda size: encode_spack(Spack(b"h" * size)))
_PIECES = st.builds(
    _in_pieces,
    st.sampled_from([0, 1, 3]),
    st.one_of(_SPACK_BODY, _LARGE_BODY, _LARGE_BODY),
    st.sampled_from([512, 1024, 2048, 4096, 700]),
    st.booleans(),
    st.booleans(),
)
_HUGE_PIECES = st.builds(
    _in_pieces,
    st.sampled_from([0, 1]),
    _HUGE_BODY,
    st.sampled_from([1024, 4096]),
    st.just(False),  # one plaintext each: together they would not fit one
    st.booleans(),
)
_RESET = st.tuples(st.just(RecordKind.RESET), st.sampled_from([1, 3]), st.just(b"\x00\x09")).map(
    lambda r: [[r]]
)


def _then_reset(plaintexts: list[list[_Rec]]) -> list[list[_Rec]]:
    """The channel reset in the same plaintext as its spack's last piece."""
    *before, last = plaintexts
    return [*before, [*last, (RecordKind.RESET, last[-1][1], b"\x00\x09")]]


_PIECES_THEN_RESET = st.builds(
    _in_pieces,
    st.sampled_from([1, 3]),
    st.one_of(_LARGE_BODY, _HUGE_BODY),
    st.sampled_from([1024, 4096]),
    st.just(False),
    st.booleans(),
).map(_then_reset)
_PLAINTEXTS = st.one_of(_LONE, _LONE, _LONE, _PIECES, _HUGE_PIECES, _RESET, _PIECES_THEN_RESET)


def _replay(plaintexts: list[list[_Rec]], releases: list[bool]) -> list[object]:
    """What the server does with ``plaintexts``: its events, errors, and both sides' credit."""
    pair = _pair()
    seen: list[object] = []
    held: list[ChannelMessageReceived] = []
    client_ok = True
    table, ours = pair.client._channels, pair.server._channels
    assert table is not None
    assert ours is not None
    for plaintext, release in zip(plaintexts, releases, strict=False):
        records = [_record(kind, channel, body) for kind, channel, body in plaintext]
        pair.server.receive_data(_forge(pair.client, *records))
        try:
            events = drain(pair.server)
        except ProtocolError as exc:
            seen.append((type(exc), str(exc)))
            break
        seen.append(events)
        held += [event for event in events if isinstance(event, ChannelMessageReceived)]
        for event in events:
            if isinstance(event, ChannelResetReceived):
                pair.server.release_channel(event.channel)
        if release:
            for event in held:
                pair.server.release(event.channel, event.size)
            held.clear()
        if (answers := take_all(pair.server)) and client_ok:
            # The forger's session tracks none of the channels it forged: it may refuse
            # what the server answers on them, the same way on both paths.
            pair.client.receive_data(answers)
            try:
                seen.append(drain(pair.client))
            except ProtocolError as exc:
                seen.append(("client", type(exc), str(exc)))
                client_ok = False
        seen.append(
            (
                table.connection.send,
                table.channel0.send,
                sorted(
                    (channel.id, channel.credit.send, channel.state)
                    for channel in table.channels.values()
                ),
            )
        )
        # The server's own count of what it granted and holds.
        seen.append(
            [
                (credit.receive, credit.released, credit.held)
                for credit in (
                    ours.connection,
                    ours.channel0,
                    *(ours.channels[key].credit for key in sorted(ours.channels)),
                )
            ]
        )
    return seen


@settings(max_examples=150, deadline=None)
@given(
    groups=st.lists(_PLAINTEXTS, min_size=1, max_size=20),
    releases=st.lists(st.booleans(), min_size=200, max_size=200),
)
def test_the_one_record_shortcut_does_what_the_record_loop_does(
    groups: list[list[list[_Rec]]], releases: list[bool]
) -> None:
    """A plaintext of one MESSAGE skips the record loop (``Receiver._lone_on_channel``):
    the same input through the record loop alone gives the same events, the same errors,
    and the same credit back, on both sides."""
    plaintexts = [plaintext for group in groups for plaintext in group]
    fast = _replay(plaintexts, releases)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(receiver_module, "lone_channel_piece", lambda view: None)
        general = _replay(plaintexts, releases)
    assert fast == general


# -- a spack's last piece and the end of its channel in one batch ---------------------------

_WIDE = ChannelParams(max_channels=4, channel_window=(1 << 31) - 1, connection_window=(1 << 31) - 1)


def _wide_pair() -> Pair:
    config = SessionConfig(channels=_WIDE, max_message_size=1 << 20)
    return connected_pair(client_config=config, server_config=config)


@pytest.mark.parametrize("size", [100, 70_000], ids=["joined", "weighed"])
def test_a_reset_right_behind_a_spacks_last_piece_leaves_the_spack_whole(size: int) -> None:
    """The peer ends a spack it began in an earlier message, then resets the channel, in
    one message (SPEC allows it: the spack was complete before the RESET). Routing reads
    the RESET before the spack's last piece is decoded: the pieces held so far must still
    be there for it, whole, and the RESET reported after it."""
    pair = _wide_pair()
    spack = Spack("x" * size, 7)
    body = encode_spack(spack)
    cut = min(len(body) // 2, 60_000)
    assert _deliver(pair, _record(RecordKind.FRAGMENT, 1, body[:cut])) == [ChannelOpened(1)]
    events = _deliver(
        pair,
        _record(RecordKind.MESSAGE, 1, body[cut:]),
        _record(RecordKind.RESET, 1, encode_close(0x77, "gone")),
    )
    assert events == [
        ChannelMessageReceived(spack, 1, len(body)),
        ChannelResetReceived(1, 0x77, "gone"),
    ]


def test_resetting_a_channel_while_its_spack_is_being_decoded_keeps_the_pieces_it_needs() -> None:
    """Our application resets a channel between two steps of one transport message, while
    a spack of the channel whose last piece is in that message is decoded piecewise. The
    records routed before the reset still decode from the pieces they belong to (never
    from a fresh start in the middle of a spack), and the connection goes on."""
    pair = _wide_pair()
    # Many small maps: weighed one by one, more than one step's work in all.
    spack = Spack([{"k": i} for i in range(9000)], [{"k": i} for i in range(9000)])
    body = encode_spack(spack)
    first, second = 60_000, 90_000
    assert _deliver(pair, _record(RecordKind.FRAGMENT, 1, body[:first])) == [ChannelOpened(1)]
    server = pair.server
    server.receive_data(
        _forge(
            pair.client,
            _record(RecordKind.FRAGMENT, 1, body[first:second]),
            _record(RecordKind.MESSAGE, 1, body[second:]),
        )
    )
    assert server.next_event() is PAUSED  # the weighing ran out of its step's budget
    server.reset_channel(1, 0x10, "enough")
    assert take_all(server)  # the RESET
    events = drain(server)
    assert events == [ChannelMessageReceived(spack, 1, len(body))]
    # The channel's pieces are gone once the message is done, and later input is read.
    pair.server.receive_data(_forge(pair.client, _message(0, Spack("after"))))
    after = Spack("after")
    assert drain(server) == [ChannelMessageReceived(after, 0, len(encode_spack(after)))]
