"""Shared test helpers: shuttle bytes between two sans-IO sessions."""

from __future__ import annotations

from dataclasses import dataclass, field

from stalk.events import NEED_DATA, PAUSED, CloseReceived, Event, PeerIdentified
from stalk.identity import Identity
from stalk.session import Role, Session, SessionConfig


def drain(session: Session) -> list[Event]:
    """Every event the session can produce now (a CloseReceived ends the list).

    PAUSED after a step of work is resumed at once; PAUSED with output owed ends the list
    (the caller moves that output, then drains again).
    """
    events: list[Event] = []
    while (event := session.next_event()) is not NEED_DATA:
        if event is PAUSED:
            if session.has_output:
                break
            continue
        events.append(event)
        if isinstance(event, CloseReceived):
            break
    return events


@dataclass
class Pair:
    """An initiator and a responder wired back to back, with everything each saw."""

    client: Session
    server: Session
    client_events: list[Event] = field(default_factory=list)
    server_events: list[Event] = field(default_factory=list)
    authorize: bool = True

    def pump(self, *, chunk: int | None = None) -> None:
        """Move bytes both ways until neither side has anything to send.

        :param chunk: deliver at most this many bytes per ``receive_data`` call.
        """
        moved = True
        while moved:
            moved = False
            for src, dst, seen, src_seen in (
                (self.client, self.server, self.server_events, self.client_events),
                (self.server, self.client, self.client_events, self.server_events),
            ):
                data = src.data_to_send()
                if not data:
                    continue
                moved = True
                step = chunk or len(data)
                for i in range(0, len(data), step):
                    dst.receive_data(data[i : i + step])
                    self._collect(dst, seen)
                if src.state.value not in ("handshaking", "authorizing", "failed"):
                    self._collect(src, src_seen)  # it may have paused until its output went

    def _collect(self, session: Session, seen: list[Event]) -> None:
        pending = drain(session)
        while pending:
            event = pending.pop(0)
            seen.append(event)
            if isinstance(event, PeerIdentified):
                if self.authorize:
                    session.accept()
                    pending.extend(drain(session))
                else:
                    session.refuse("you are not on the list")


def make_pair(
    *,
    ik: bool = False,
    client_config: SessionConfig | None = None,
    server_config: SessionConfig | None = None,
    client_identity: Identity | None = None,
    server_identity: Identity | None = None,
    authorize: bool = True,
) -> Pair:
    """A client/server pair; ``ik`` pins the server's real key (IK), else XX."""
    server_identity = server_identity or Identity.generate()
    client = Session(
        Role.INITIATOR,
        client_identity or Identity.generate(),
        peer=server_identity.public if ik else None,
        config=client_config,
    )
    server = Session(Role.RESPONDER, server_identity, config=server_config)
    return Pair(client, server, authorize=authorize)


def connected_pair(**kwargs: object) -> Pair:
    """A pair that finished its handshake; the event lists are cleared."""
    pair = make_pair(**kwargs)  # type: ignore[arg-type]
    pair.pump()
    assert pair.client.peer is not None
    assert pair.server.peer is not None
    pair.client_events.clear()
    pair.server_events.clear()
    return pair
