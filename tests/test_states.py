"""The connection state machine: every (state, input) pair, and real sessions following it."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from helpers import connected_pair, drain, make_pair
from stalk.errors import (
    ConnectionClosed,
    ConnectionLost,
    HandshakeFailed,
    LocalProtocolError,
    PeerRefused,
    ProtocolError,
    StalkError,
)
from stalk.events import CloseReceived
from stalk.session import Session
from stalk.spack import Spack
from stalk.states import (
    JOINT_INPUTS,
    RECEIVE,
    SEND,
    SESSION_STATE,
    Directions,
    DirectionState,
    Input,
    SessionState,
)

S = DirectionState
_SEND_ONLY = {Input.DATA_SENT, Input.CLOSE_SENT}
_RECEIVE_ONLY = {Input.DATA_RECEIVED, Input.CLOSE_RECEIVED, Input.EOF}
_LOCAL = {Input.ACCEPT, Input.REFUSE, Input.ABANDON, Input.DATA_SENT, Input.CLOSE_SENT}


def _expected(send: S, receive: S, what: Input) -> tuple[S, S] | None:
    """What the tables say ``what`` does to ``(send, receive)``; ``None``: not allowed."""
    new_send, new_receive = send, receive
    if what not in _RECEIVE_ONLY:
        if (send, what) not in SEND:
            return None
        new_send = SEND[send, what]
    if what not in _SEND_ONLY:
        if (receive, what) not in RECEIVE:
            return None
        new_receive = RECEIVE[receive, what]
    return new_send, new_receive


def _reachable() -> set[tuple[S, S]]:
    seen = {(S.HANDSHAKE, S.HANDSHAKE)}
    todo = list(seen)
    while todo:
        send, receive = todo.pop()
        for what in Input:
            new = _expected(send, receive, what)
            if new is not None and new not in seen:
                seen.add(new)
                todo.append(new)
    return seen


def test_the_inputs_partition_into_joint_send_and_receive() -> None:
    assert set(Input) == JOINT_INPUTS | _SEND_ONLY | _RECEIVE_ONLY
    assert not JOINT_INPUTS & (_SEND_ONLY | _RECEIVE_ONLY)
    assert {what for _, what in SEND} <= JOINT_INPUTS | _SEND_ONLY
    assert {what for _, what in RECEIVE} <= JOINT_INPUTS | _RECEIVE_ONLY


def test_every_reachable_pair_of_states_has_a_summary_and_no_other_does() -> None:
    assert _reachable() == set(SESSION_STATE)
    assert set(SESSION_STATE.values()) == set(SessionState)


def test_data_flows_only_while_open() -> None:
    assert {state for state, what in SEND if what is Input.DATA_SENT} == {S.OPEN}
    assert {state for state, what in RECEIVE if what is Input.DATA_RECEIVED} == {S.OPEN}
    for table, data in ((SEND, Input.DATA_SENT), (RECEIVE, Input.DATA_RECEIVED)):
        assert all(table[state, what] is state for state, what in table if what is data)


def test_failing_is_allowed_everywhere_and_broken_is_terminal() -> None:
    for send, receive in SESSION_STATE:
        assert _expected(send, receive, Input.FAIL) == (S.BROKEN, S.BROKEN)
    assert {what for state, what in SEND if state is S.BROKEN} == {Input.FAIL}
    assert {what for state, what in RECEIVE if state is S.BROKEN} == {Input.FAIL}


@pytest.mark.parametrize(
    ("send", "receive", "what"),
    [(s, r, what) for (s, r), what in itertools.product(sorted(SESSION_STATE, key=str), Input)],
)
def test_every_state_and_input(send: S, receive: S, what: Input) -> None:
    """Each reachable pair of states, each input: the table's move, or the right error."""
    directions = Directions(send, receive)
    expected = _expected(send, receive, what)
    assert directions.allows(what) is (expected is not None)
    if expected is not None:
        directions.process(what)
        assert (directions.send, directions.receive) == expected
        assert directions.session_state is SESSION_STATE[expected]
        assert directions.can_send_data is (expected[0] is S.OPEN)
        assert directions.can_receive_data is (expected[1] is S.OPEN)
        return
    with pytest.raises(StalkError) as caught:
        directions.process(what)
    assert (directions.send, directions.receive) == (send, receive)  # nothing changed
    error = caught.value
    if what in _LOCAL:
        # The send direction is checked first; its state decides the error.
        refused_by = send if what not in _RECEIVE_ONLY and (send, what) not in SEND else receive
        closed = refused_by in (S.CLOSED, S.BROKEN)
        assert isinstance(error, ConnectionClosed if closed else LocalProtocolError), error
    elif what is Input.EOF:
        handshaking = receive in (S.HANDSHAKE, S.AUTHORIZING, S.CONFIRMING)
        assert isinstance(error, HandshakeFailed if handshaking else ConnectionLost)
    else:
        assert isinstance(error, (ProtocolError, HandshakeFailed))


# -- real sessions follow the table ------------------------------------------------------


def _states(session: Session) -> tuple[S, S]:
    return session.directions


def _summary(session: Session) -> SessionState:
    return session.state


@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
def test_a_handshake_moves_both_sides_through_the_table(ik: bool) -> None:
    pair = make_pair(ik=ik)
    assert _summary(pair.client) is _summary(pair.server) is SessionState.HANDSHAKING
    pair.pump()
    assert _states(pair.client) == _states(pair.server) == (S.OPEN, S.OPEN)
    assert _summary(pair.client) is _summary(pair.server) is SessionState.OPEN


def test_a_clean_close_both_ways_then_eof_is_closed() -> None:
    pair = connected_pair()
    pair.client.close()
    assert _summary(pair.client) is SessionState.HALF_CLOSED_LOCAL
    pair.pump()
    assert _summary(pair.server) is SessionState.HALF_CLOSED_REMOTE
    pair.server.send(Spack("still talking"))
    pair.server.close()
    pair.pump()
    assert _summary(pair.client) is _summary(pair.server) is SessionState.CLOSED
    for session in (pair.client, pair.server):
        session.receive_data(b"")
        assert isinstance(session.next_event(), CloseReceived)
        assert _summary(session) is SessionState.CLOSED
    with pytest.raises(ConnectionClosed):
        pair.client.send(Spack("too late"))


def test_eof_without_close_breaks_the_session() -> None:
    pair = connected_pair()
    pair.server.receive_data(b"")
    with pytest.raises(ConnectionLost):
        drain(pair.server)
    assert _states(pair.server) == (S.BROKEN, S.BROKEN)
    assert _summary(pair.server) is SessionState.FAILED


def test_a_refusal_closes_both_directions() -> None:
    pair = make_pair(authorize=False)
    with pytest.raises(PeerRefused):
        pair.pump()  # the client reads the refusal
    assert _states(pair.client) == (S.BROKEN, S.BROKEN)
    assert _states(pair.server) == (S.CLOSED, S.CLOSED)
    assert _summary(pair.server) is SessionState.CLOSED


def test_closing_before_keys_abandons_the_session() -> None:
    pair = make_pair()
    pair.client.close()
    assert _states(pair.client) == (S.CLOSED, S.CLOSED)
    with pytest.raises(ConnectionClosed):
        pair.client.ping()


def test_sending_before_the_handshake_is_a_local_error() -> None:
    pair = make_pair()
    with pytest.raises(LocalProtocolError):
        pair.client.send(Spack(1))
    assert _summary(pair.client) is SessionState.HANDSHAKING


def _spec_tables() -> tuple[dict[tuple[S, Input], S], dict[tuple[S, Input], S]]:
    """SEND and RECEIVE as SPEC.md's "Connection states" writes them."""
    spec = (Path(__file__).parents[1] / "SPEC.md").read_text(encoding="utf-8")
    section = spec[spec.index("### Connection states") :]
    section = section[: section.index("\n## ")]
    by_name = {str(what): what for what in Input}
    states = {str(state): state for state in S}

    def parse_states(cell: str) -> list[S]:
        return list(S) if cell == "any" else [states[name.strip()] for name in cell.split(",")]

    send: dict[tuple[S, Input], S] = {}
    receive: dict[tuple[S, Input], S] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("input", "direction") or cells[0].startswith("---"):
            continue
        if cells[0] in ("send", "receive"):
            tables = [send if cells[0] == "send" else receive]
            name, sources, target = cells[1], cells[2], cells[3]
        else:
            tables = [send, receive]
            name, sources, target = cells[0], cells[2], cells[3]
        what = by_name[name.split(" (")[0]]
        for table in tables:
            for source in parse_states(sources):
                table[source, what] = states[target]
    return send, receive


def test_spec_writes_the_same_tables() -> None:
    """SPEC.md's connection-state tables are exactly the code's."""
    send, receive = _spec_tables()
    assert send == SEND
    assert receive == RECEIVE
