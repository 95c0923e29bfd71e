"""A session's handshake phase: the Noise messages, the responder's verdict, a failure's CLOSE.

:mod:`stalk.handshake` runs the Noise patterns; an :class:`Opening` drives one for its
:class:`~stalk.session.Session`: it reads the handshake messages from the session's frame
reader, hands the messages to send to the session's sealer (in cleartext: the handshake
is not sealed again), and tells the session what happened, which changes the session's
state. When the responder refuses, or when XX message 3 fails after it was read, the
answer it queues is the one SPEC "Verdict and refusals" gives: a cleartext refusal
before there are keys, an authenticated CLOSE after.
"""

from __future__ import annotations

from stalk.certificates import CertificatePolicy
from stalk.errors import HandshakeFailed, LocalProtocolError, reason_for_peer
from stalk.events import PeerIdentified
from stalk.framing import FrameReader, encode_refusal
from stalk.handshake import (
    ChannelParams,
    HandshakeResult,
    InitiatorHandshake,
    ResponderHandshake,
)
from stalk.identity import Identity, PublicIdentity
from stalk.sender import Sender
from stalk.states import Directions, Input
from stalk.wire import CloseCode, Pattern

__all__ = ["Opening"]


class Opening:
    """The handshake of one session, until it produced the transport ciphers or failed.

    :param initiator: whether we dial (else we accept).
    :param peer: initiator only: the responder's expected key (IK), or ``None`` (XX).
    :param certificate: our certificate's encoding, sent in our last handshake message.
    :param ephemeral: a fixed ephemeral private key, for reproducible transcripts only.
    """

    __slots__ = ("_sender", "_states", "hs", "pattern")

    def __init__(
        self,
        identity: Identity,
        sender: Sender,
        states: Directions,
        *,
        initiator: bool,
        peer: PublicIdentity | None,
        max_message_size: int,
        channels: ChannelParams | None,
        certificate: bytes | None,
        policy: CertificatePolicy | None,
        ephemeral: bytes | None,
    ) -> None:
        self._sender = sender
        self._states = states
        #: The handshake, until it produced the transport ciphers (or was refused).
        self.hs: InitiatorHandshake | ResponderHandshake | None
        if initiator:
            self.hs = InitiatorHandshake(
                identity,
                peer,
                max_message_size,
                channels=channels,
                certificate=certificate,
                policy=policy,
                ephemeral=ephemeral,
            )
        else:
            self.hs = ResponderHandshake(
                identity,
                max_message_size,
                channels=channels,
                certificate=certificate,
                policy=policy,
                ephemeral=ephemeral,
            )
        #: ``"XX"`` or ``"IK"`` (a responder knows it once the preamble arrived).
        self.pattern: Pattern | None = self.hs.pattern
        self._take_output()

    def _take_output(self) -> None:
        hs = self.hs
        if hs is not None and hs.out:
            for data in hs.out:
                self._sender.sealer.add_cleartext(data)
            hs.out.clear()

    def step(self, reader: FrameReader) -> HandshakeResult | PeerIdentified | None:
        """Read what ``reader`` holds of the handshake.

        :returns: the initiator's result once it has the transport ciphers; the
            responder's :class:`~stalk.events.PeerIdentified` once the peer's key is
            known and awaits :meth:`accept` or :meth:`refuse`; else ``None`` (more input).
        :raises ~stalk.HandshakeFailed: the handshake failed (the CLOSE that says why, if
            one can be authenticated, is queued).
        """
        hs = self.hs
        if hs is None:  # pragma: no cover - the session steps only while it runs
            return None
        try:
            done = hs.step(reader)
        except HandshakeFailed as exc:
            if isinstance(hs, ResponderHandshake) and hs.failure_close is not None:
                # XX message 3 was read: the verdict is given, but an authenticated CLOSE
                # can still say why instead of READY (SPEC "Verdict and refusals").
                code, cipher = hs.failure_close
                self._sender.sealer.start(cipher)
                self._sender.final_close(code, reason_for_peer(exc))
            raise
        finally:
            self._take_output()
        self.pattern = hs.pattern
        if isinstance(hs, ResponderHandshake):
            if hs.awaiting_authorization and hs.peer is not None and hs.pattern is not None:
                return PeerIdentified(hs.peer, hs.pattern)
            return None
        if done and hs.result is not None:
            self.hs = None
            return hs.result
        return None

    def accept(self) -> HandshakeResult:
        """Responder: admit the identified peer; the result has the transport ciphers."""
        hs = self._authorizing(Input.ACCEPT)
        hs.accept()
        self._take_output()
        if hs.result is None:  # pragma: no cover - accept() always sets it
            raise LocalProtocolError("handshake produced no result")
        self.hs = None
        return hs.result

    def refuse(self, reason: str) -> HandshakeResult | None:
        """Responder: refuse the identified peer, and queue the verdict that says so.

        IK: a cleartext refusal instead of message 2, so no DH is spent on an answer. XX
        (message 3 read, so there are keys): an authenticated CLOSE(NOT_AUTHORIZED).

        :returns: the handshake's result when there are keys (XX), else ``None``.
        """
        hs = self._authorizing(Input.REFUSE)
        hs.refuse()
        self.hs = None
        if hs.result is None:
            self._sender.sealer.add_cleartext(encode_refusal(CloseCode.NOT_AUTHORIZED, reason))
            return None
        self._sender.sealer.start(hs.result.send_cipher)
        self._sender.final_close(CloseCode.NOT_AUTHORIZED, reason)
        return hs.result

    def _authorizing(self, what: Input) -> ResponderHandshake:
        if not self._states.allows(what) or not isinstance(self.hs, ResponderHandshake):
            raise LocalProtocolError("accept()/refuse() are only valid after PeerIdentified")
        return self.hs
