"""The sans-IO stalk session: handshake, records and spacks; bytes in, events and bytes out.

Theory of operation
-------------------
A :class:`Session` is one side of one connection. Its driver (the anyio layer, a test, or
anything else) does three things in a loop, h11-style::

    session.receive_data(chunk)            # b"" means the transport reached EOF
    while (event := session.next_event()) not in (NEED_DATA, PAUSED):
        handle(event)
    while data := session.data_to_send():
        transport.write(data)
    # after PAUSED: write the output, let other tasks run, then call next_event() again

plus the API calls: :meth:`Session.accept`/:meth:`Session.refuse` (responder, after
:class:`~stalk.events.PeerIdentified`), :meth:`Session.queue`/:meth:`Session.flush`/
:meth:`Session.send`, :meth:`Session.ping`, :meth:`Session.close`. After *every* call, the
driver writes out :meth:`Session.data_to_send` until it is empty (a responder answers as a
side effect of receiving, and PINGs are answered automatically). A driver that writes each
spack at once may call :meth:`Session.send_now` instead of :meth:`Session.send` (and
:meth:`Session.flush_now` instead of :meth:`Session.flush`): it hands back the frame
directly when what was flushed is one Noise message and nothing else waits to be sent.

The session orchestrates; each job has its own module:

- :mod:`stalk.states`: the two directions' state machine, the one source of truth for what
  is allowed when (:attr:`Session.state` summarizes it);
- :mod:`stalk.framing`: the frame reader both phases read from;
- :mod:`stalk.handshake` and :mod:`stalk.opening`: the Noise handshake objects and the
  handshake phase that drives them, then SPEC "Confirmation": the party that read the last
  handshake message sends READY as its first record, and its peer reports nothing (and
  sends no spack) until READY arrives. For the IK responder this is the replay defence: a
  recorded message 1 replayed by an attacker never produces a valid READY. For the XX
  initiator it carries the responder's authorization verdict;
- :mod:`stalk.receiver`, :mod:`stalk.record_loop` and :mod:`stalk.reassembly`: the
  transport phase's receive loop, bounded per call (SPEC "Resource model"), each
  message's records, and spacks rebuilt from their pieces;
- :mod:`stalk.sender` and :mod:`stalk.records`: the send side, records queued in call
  order and packed into plaintexts;
- :mod:`stalk.sealer`: the only place anything is encrypted, with the rekey policy;
- :mod:`stalk.channel_ops`, :mod:`stalk.mux` and :mod:`stalk.demux`: with channels, the
  channel operations, and each direction's channels.

Invariants:

- Nothing is delivered from a Noise message until all of its records have been parsed,
  checked and decoded; a spack is delivered whole or not at all.
- Any receive-side error is terminal. When the transport is up, an error CLOSE is queued
  for the peer (best effort) before the error is raised.
- The send side encrypts in call order, so nonce order is wire order; the driver must write
  :meth:`Session.data_to_send` in the order it was returned.
- EOF without a CLOSE is a truncation (:class:`~stalk.ConnectionLost`), never a clean end.
- One :meth:`Session.next_event` call does a bounded amount of work: past its step, or while the
  answers it owes the peer (PONGs) fill a Noise message that the driver has not taken, it
  returns ``PAUSED`` and reads nothing more until called again.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from stalk.certificates import Certificate, CertificatePolicy, CertifiedIdentity
from stalk.channel_ops import ChannelOps
from stalk.channels import ChannelState, ChannelTable
from stalk.errors import (
    ConnectionLost,
    HandshakeFailed,
    LocalProtocolError,
    ProtocolError,
    StalkError,
)
from stalk.events import (
    NEED_DATA,
    PAUSED,
    CloseReceived,
    Event,
    HandshakeComplete,
    NeedData,
    Paused,
    PeerIdentified,
)
from stalk.framing import FrameReader
from stalk.handshake import ChannelParams, HandshakeResult
from stalk.identity import Identity, PublicIdentity
from stalk.mux import Mux
from stalk.opening import Opening
from stalk.receiver import Receiver
from stalk.records import RecordWriter, check_close
from stalk.sealer import Sealer
from stalk.sender import Sender
from stalk.spack import Spack
from stalk.states import Directions, DirectionState, Input, SessionState
from stalk.wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_REKEY_AFTER_BYTES,
    DEFAULT_REKEY_AFTER_MESSAGES,
    MAX_MESSAGE_SIZE_LIMIT,
    MAX_PING_PAYLOAD,
    MIN_MAX_MESSAGE_SIZE,
    CloseCode,
    Pattern,
    RecordKind,
)

__all__ = ["Role", "Session", "SessionConfig", "SessionState"]

_HANDSHAKE = DirectionState.HANDSHAKE
_CONFIRMING = DirectionState.CONFIRMING
_OPEN = DirectionState.OPEN
_CLOSED = DirectionState.CLOSED
_UNAUTHENTICATED = frozenset(
    {SessionState.HANDSHAKING, SessionState.AUTHORIZING, SessionState.CONFIRMING}
)


class Role(enum.Enum):
    """Which end of the handshake this session plays."""

    INITIATOR = "initiator"
    RESPONDER = "responder"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Protocol limits and policy for one session.

    :param max_message_size: the largest encoded spack we accept (advertised to the peer).
    :param rekey_after_messages: send REKEY after this many Noise transport messages...
    :param rekey_after_bytes: ...or this many plaintext bytes, whichever comes first.
    :param channels: what we offer for channels (SPEC "Channels"); ``None`` offers none,
        and the session speaks version 1 only.
    """

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    rekey_after_messages: int = DEFAULT_REKEY_AFTER_MESSAGES
    rekey_after_bytes: int = DEFAULT_REKEY_AFTER_BYTES
    channels: ChannelParams | None = None

    def __post_init__(self) -> None:
        if not MIN_MAX_MESSAGE_SIZE <= self.max_message_size <= MAX_MESSAGE_SIZE_LIMIT:
            raise ValueError(
                f"max_message_size must be {MIN_MAX_MESSAGE_SIZE}..{MAX_MESSAGE_SIZE_LIMIT}"
            )
        if self.rekey_after_messages < 1 or self.rekey_after_bytes < 1:
            raise ValueError("rekey intervals must be positive")


def _release_nothing(channel: int, size: int) -> bool:
    """:attr:`Session.release` without channels: there is no credit to give back."""
    return False


def _complete(result: HandshakeResult) -> HandshakeComplete:
    """The event that reports a confirmed handshake."""
    return HandshakeComplete(
        peer=result.peer,
        pattern=result.pattern,
        handshake_hash=result.handshake_hash,
        peer_max_message_size=result.peer_params.max_message_size,
    )


class Session:
    """One side of a stalk connection, without I/O.

    :param role: initiator (dials) or responder (accepts).
    :param identity: our static key pair.
    :param peer: initiator only: the responder's expected static key. Given, the session
        runs IK and fails with :class:`~stalk.PeerIdentityMismatch` for any other key;
        omitted, it runs XX and learns the key.
    :param config: limits and rekey policy.
    :param certificate: our certificate (SPEC "Certificates"), sent in our last handshake
        message; its subject must be ``identity``'s key. Bytes are sent as they are,
        unchecked (for tests and other implementations' certificates).
    :param certificate_policy: require a certificate of the peer, checked this way: the
        peer is refused (responder) or left (initiator) before the connection is
        established when it presents none or one the policy refuses, with a
        :class:`~stalk.CertificateError`. ``None``: a certificate the peer sends is
        ignored.
    :param ephemeral_for_testing_only: a fixed ephemeral private key, for reproducible
        transcripts (``vectors/``). Never use it on a real connection.
    :raises ValueError: ``peer`` given to a responder, or ``certificate`` for another key.
    """

    # Slots: a session is held per connection, and an instance dict costs more.
    __slots__ = (
        "_channels",
        "_error",
        "_events",
        "_opening",
        "_ops",
        "_reader",
        "_receiver",
        "_result",
        "_sealer",
        "_sender",
        "_states",
        "bytes_received",
        "config",
        "identity",
        "release",
        "role",
    )

    def __init__(
        self,
        role: Role,
        identity: Identity,
        *,
        peer: PublicIdentity | None = None,
        config: SessionConfig | None = None,
        certificate: Certificate | bytes | None = None,
        certificate_policy: CertificatePolicy | None = None,
        ephemeral_for_testing_only: bytes | None = None,
    ) -> None:
        if role is Role.RESPONDER and peer is not None:
            raise ValueError("only an initiator can expect a peer key")
        if isinstance(certificate, Certificate):
            if certificate.subject != identity.public:
                raise ValueError(
                    f"the certificate is for {certificate.subject.fingerprint}, not for this "
                    f"identity ({identity.public.fingerprint})"
                )
            certificate = certificate.encoded
        self.role = role
        self.identity = identity
        #: Bytes given to :meth:`receive_data`: what came from the transport, the
        #: handshake's included.
        self.bytes_received = 0
        config = self.config = config or SessionConfig()
        self._states = Directions()
        self._reader = FrameReader()
        self._sealer = Sealer(config.rekey_after_messages, config.rekey_after_bytes)
        self._events: deque[Event] = deque()
        self._error: StalkError | None = None
        self._sender = Sender(self._sealer, RecordWriter(), self._states)
        self._ops = ChannelOps(self._sender)
        #: ``release(channel, size)``: the application has the spack of a
        #: :class:`~stalk.events.ChannelMessageReceived`. With channels, hands its ``size``
        #: back as credit (WINDOW records go out a quarter window at a time); call it for
        #: every such event, in the order they came on each channel, also for a spack
        #: dropped because its channel was reset. Once :meth:`close` was called it grants
        #: nothing, as received messages then grant nothing (SPEC "Channels": nothing more
        #: is owed). Without channels it does nothing. It returns whether it queued a grant
        #: (the driver then has output to write), so that the common release, which
        #: grants nothing, costs the driver no further look.
        #:
        #: An attribute, not a method: with channels it is the demux's own
        #: (``Demux.release``), so a driver's call per spack goes straight there.
        self.release: Callable[[int, int], bool] = _release_nothing
        self._result: HandshakeResult | None = None
        self._receiver: Receiver | None = None
        self._channels: ChannelTable | None = None  # once both offered channels
        self._opening = Opening(
            identity,
            self._sender,
            self._states,
            initiator=role is Role.INITIATOR,
            peer=peer,
            max_message_size=config.max_message_size,
            channels=config.channels,
            certificate=certificate,
            policy=certificate_policy,
            ephemeral=ephemeral_for_testing_only,
        )

    # -- introspection -------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """The current phase: a summary of the two directions (:mod:`stalk.states`)."""
        return self._states.session_state

    @property
    def directions(self) -> tuple[DirectionState, DirectionState]:
        """The state of our direction and of the peer's: ``(send, receive)``."""
        return self._states.send, self._states.receive

    @property
    def pattern(self) -> Pattern | None:
        """``"XX"`` or ``"IK"`` (a responder knows it once the preamble arrived)."""
        return self._opening.pattern

    @property
    def peer(self) -> PublicIdentity | None:
        """The peer's static key, once the peer is authenticated (confirmed or later)."""
        if self._result is None or self.state in _UNAUTHENTICATED:
            return None
        return self._result.peer

    @property
    def peer_certificate(self) -> Certificate | None:
        """The peer's verified certificate, once the peer is authenticated (else ``None``).

        Only with a ``certificate_policy``: without one, nothing the peer sends is believed.
        """
        peer = self.peer
        return peer.certificate if isinstance(peer, CertifiedIdentity) else None

    @property
    def handshake_hash(self) -> bytes | None:
        """Noise ``h`` (channel binding), once the peer is authenticated."""
        return self._result.handshake_hash if self.peer is not None and self._result else None

    @property
    def peer_max_message_size(self) -> int | None:
        """The largest encoded spack the peer accepts, once the handshake finished."""
        return self._result.peer_params.max_message_size if self._result else None

    @property
    def peer_channels(self) -> ChannelParams | None:
        """What the peer offered for channels, once the handshake finished (else ``None``)."""
        return self._result.peer_params.channels if self._result else None

    @property
    def channels(self) -> bool:
        """Whether this connection has channels: both parties offered them (SPEC "Channels")."""
        return self._channels is not None

    @property
    def bytes_sent(self) -> int:
        """Bytes handed out by :meth:`data_to_send` and :meth:`send_now`.

        What went to the transport, the handshake's included.
        """
        return self._sender.bytes_sent

    @property
    def close_sent(self) -> bool:
        """Whether we sent CLOSE (ours, or an error CLOSE): our direction is finished."""
        return self._states.send is _CLOSED or self._sealer.closed

    @property
    def close_received(self) -> CloseReceived | None:
        """The peer's CLOSE, once received."""
        return self._receiver.close_received if self._receiver is not None else None

    @property
    def rekeys_sent(self) -> int:
        """How many times our sending cipher was rekeyed (SPEC "Rekey")."""
        return self._sealer.rekeys

    @property
    def rekeys_received(self) -> int:
        """How many of the peer's REKEYs took effect on our receiving cipher."""
        return self._receiver.rekeys if self._receiver is not None else 0

    @property
    def queued_bytes(self) -> int:
        """Bytes of records queued by :meth:`queue` and not yet flushed by :meth:`flush`.

        With channels: data bytes queued and not yet sent (flushed or not, waiting for
        their turn or for credit).
        """
        return self._sender.queued_bytes

    def queued_bytes_on(self, channel: int) -> int:
        """With channels: data bytes queued on ``channel`` and not yet sent (0 without)."""
        return self._ops.queued_on(channel)

    @property
    def unsent(self) -> bool:
        """With channels: whether spacks queued (flushed or not) are still to be sent.

        A CLOSE of the connection waits for them (:meth:`close`), some perhaps for credit.
        """
        return self._sender.unsent

    def channel_state(self, channel: int) -> ChannelState | None:
        """The state of ``channel`` (not 0); ``None`` when it is not open (ended, or never)."""
        return self._ops.state(channel)

    @property
    def can_open_channel(self) -> bool:
        """Whether :meth:`open_channel` would open one now (within the peer's limit)."""
        return self._ops.can_open

    @property
    def has_output(self) -> bool:
        """Whether :meth:`data_to_send` has anything (answers owed to the peer included)."""
        return self._sender.has_output

    @property
    def input_waiting(self) -> bool:
        """Whether :meth:`next_event` may give an event without more input.

        ``False`` means it returns ``NEED_DATA`` (or what it returned last: the peer's
        CLOSE, the session's error): a driver that only wants events already read skips
        the call.
        """
        receiver = self._receiver
        return (
            bool(self._events) or self._reader.buffered or (receiver is not None and receiver.busy)
        )

    # -- bytes in, events out ---------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the transport; ``b""`` means EOF.

        :raises ~stalk.LocalProtocolError: data after EOF.
        """
        reader = self._reader
        if data and reader.eof:
            raise LocalProtocolError("receive_data() after EOF")
        self.bytes_received += len(data)
        if data and self._states.receive is _CLOSED:
            return  # the peer's direction is finished: nothing after its CLOSE is read
        reader.feed(data)

    def next_event(self) -> Event | NeedData | Paused:
        """The next event, :data:`~stalk.events.NEED_DATA` or :data:`~stalk.events.PAUSED`.

        ``NEED_DATA``: feed more bytes with :meth:`receive_data`. ``PAUSED``: the session
        stopped reading on its own, either because one call did enough work (let other
        tasks run, then call again) or because the peer made us owe it more answers than
        we hold (write out :meth:`data_to_send` first); do not feed more bytes before
        calling again. After a :class:`~stalk.events.CloseReceived`, returns the same event
        again.

        :raises ~stalk.HandshakeFailed: the handshake failed (refused, wrong key, malformed,
            or the peer left during it).
        :raises ~stalk.ProtocolError: the peer broke the protocol after the handshake.
        :raises ~stalk.ConnectionLost: EOF without CLOSE.
        """
        if self._error is not None:
            raise self._error
        events = self._events
        if not events:
            try:
                self._progress()
            except StalkError as exc:
                self._fail(exc)
                raise
        if events:
            return events.popleft()
        receiver = self._receiver
        if receiver is not None:
            if receiver.close_received is not None:
                return receiver.close_received
            if receiver.paused:
                return PAUSED
        return NEED_DATA

    def data_to_send(self) -> bytes | bytearray:
        """The next buffer for the transport, ``b""`` when there is nothing to send.

        Call it until it returns ``b""`` and write every buffer, in order. Each call hands
        out what is encrypted already or encrypts about 2 MiB more of what was flushed (see
        :mod:`stalk.sealer`), so a large spack is never held as ciphertext all at once.
        """
        return self._sender.take()

    def _progress(self) -> None:
        states = self._states
        if states.receive is _HANDSHAKE:
            self._progress_handshake()
        receiver = self._receiver
        if receiver is None:
            return
        receive = states.receive
        if receive is _OPEN:
            receiver.progress()
        elif receive is _CONFIRMING:
            try:
                receiver.progress()
            except ProtocolError as exc:
                # Before READY the peer is not authenticated: report a failed handshake.
                raise HandshakeFailed(f"handshake confirmation failed: {exc}") from exc
        elif receive is _CLOSED:
            self._reader.discard()  # bytes after the peer's CLOSE are never read
        table = self._channels
        if table is not None and table.peer_resets:
            self._ops.drop_peer_resets()
        if self._reader.eof and not self._events and not receiver.busy:
            self._end_of_input()

    def _end_of_input(self) -> None:
        left = self._reader.unconsumed
        if left and self._states.receive is _OPEN:
            raise ConnectionLost(f"connection cut in the middle of a frame ({left} bytes)")
        self._states.process(Input.EOF)

    def _fail(self, exc: StalkError) -> None:
        self._error = exc
        self._states.process(Input.FAIL)
        self._events.clear()
        if self._receiver is not None:
            self._receiver.reset()
        self._sender.fail(exc)

    # -- the handshake --------------------------------------------------------------------

    def _progress_handshake(self) -> None:
        outcome = self._opening.step(self._reader)
        if isinstance(outcome, PeerIdentified):
            self._states.process(Input.PEER_IDENTIFIED)
            self._events.append(outcome)
        elif outcome is not None:
            self._start_transport(outcome)
            self._states.process(Input.KEYS)
            if outcome.pattern == "IK":
                self._send_ready()

    def _start_transport(self, result: HandshakeResult) -> None:
        """The handshake produced the transport ciphers: start both directions."""
        self._result = result
        self._sealer.start(result.send_cipher)
        ours, theirs = self.config.channels, result.peer_params.channels
        if ours is not None and theirs is not None:
            self._channels = ChannelTable(
                initiator=self.role is Role.INITIATOR, ours=ours, theirs=theirs
            )
        receiver = self._receiver = Receiver(
            self._reader,
            result.recv_cipher,
            states=self._states,
            events=self._events,
            control=self._sender.control,
            limit=self.config.max_message_size,
            confirmed=_complete(result),
            channels=self._channels,
        )
        limit, table = result.peer_params.max_message_size, self._channels
        if table is None:
            self._sender.start(limit, None)
        else:  # with channels, the application's spacks go to the multiplexer
            mux = Mux(table)
            self._sender.start(limit, (table, mux))
            self._ops.start(table, mux, receiver)
            assert receiver.demux is not None  # (the receiver has one with channels)
            self.release = receiver.demux.release

    def _send_ready(self) -> None:
        """Confirm the handshake we read the last message of (SPEC "Confirmation")."""
        control = self._sender.control
        control.add(RecordKind.READY)
        self._sealer.push(control.pack())
        self._states.process(Input.READY_SENT)
        if self._result is not None:
            self._events.append(_complete(self._result))
        if self._receiver is not None:
            self._receiver.confirmed = None  # the event it would have sent went out here

    def accept(self) -> None:
        """Responder: admit the peer named by :class:`~stalk.events.PeerIdentified`.

        :raises ~stalk.LocalProtocolError: not awaiting authorization.
        """
        result = self._opening.accept()
        self._start_transport(result)
        self._states.process(Input.ACCEPT)
        if result.pattern == "XX":
            self._send_ready()

    def refuse(self, reason: str = "not authorized") -> None:
        """Responder: refuse the peer named by :class:`~stalk.events.PeerIdentified`.

        IK: an (unauthenticated) refusal verdict is queued instead of message 2, so no DH
        is spent on an answer. XX: an authenticated CLOSE(NOT_AUTHORIZED) is queued. Either
        way the session is CLOSED: write out :meth:`data_to_send`, then close the transport.

        :raises ~stalk.LocalProtocolError: not awaiting authorization.
        """
        self._result = self._opening.refuse(reason)
        self._states.process(Input.REFUSE)

    # -- sending (the work is the sender's: :mod:`stalk.sender`) ----------------------------

    def queue(self, spack: Spack, channel: int = 0) -> None:
        """Encode ``spack`` and queue it; :meth:`flush` sends everything queued.

        :param channel: with channels, the channel to send it on (0: the connection's own).
        :raises ~stalk.InvalidSpackValue: a value cannot be encoded (nothing is queued).
        :raises ~stalk.MessageTooLarge: larger than the peer accepts (nothing is queued).
        :raises ~stalk.ConnectionClosed: we already sent CLOSE or the session failed.
        :raises ~stalk.LocalProtocolError: the session is not open yet, or the channel is
            not open for sending.
        """
        self._sender.queue(spack, channel)

    def flush(self) -> None:
        """Send everything queued, in as few Noise messages as possible.

        The records are packed into plaintexts now and encrypted, in order, as
        :meth:`data_to_send` hands them out.

        :raises ~stalk.ConnectionClosed: we already sent CLOSE or the session failed.
        """
        self._sender.flush()

    def send(self, spack: Spack) -> None:
        """:meth:`queue` then :meth:`flush`."""
        sender = self._sender
        sender.queue(spack)
        sender.flush()

    def send_now(self, spack: Spack) -> bytearray | None:
        """:meth:`send`, and when nothing waits to be encrypted, the spack's frame at once.

        :meth:`queue` then :meth:`flush_now`.

        :raises: as :meth:`queue`.
        """
        return self._sender.send_now(spack)

    def flush_now(self) -> bytearray | None:
        """:meth:`flush`, and when that makes one Noise message, its frame at once.

        For a driver that writes all output at once (a connection without a writer task,
        a reply). The frame returned, everything flushed in one Noise message, is all
        there is to send now: :meth:`data_to_send` has nothing more. ``None``: output
        waited, or answers are owed, or what was flushed takes more than one Noise
        message (or, with channels, waits for credit); it was flushed behind the rest, and
        :meth:`data_to_send` hands everything out as usual. The bytes on the wire are
        those of :meth:`flush` either way (``tests/test_session_send_now.py``).

        :raises ~stalk.ConnectionClosed: we already sent CLOSE or the session failed.
        """
        return self._sender.flush_now()

    def ping(self, payload: bytes = b"") -> None:
        """Send a PING; the peer's PONG arrives as :class:`~stalk.events.PongReceived`.

        :raises ValueError: the payload is longer than 1024 bytes.
        """
        if len(payload) > MAX_PING_PAYLOAD:
            raise ValueError(f"ping payload longer than {MAX_PING_PAYLOAD} bytes")
        self._sender.ping(payload)
        if self._receiver is not None:
            self._receiver.pings_sent += 1

    def request_rekey(self) -> None:
        """Rekey our sending cipher with the next Noise message (policy does it anyway)."""
        self._sealer.request_rekey()

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send CLOSE after everything queued; our direction is then finished.

        Receiving goes on until the peer's CLOSE or EOF. Idempotent. Before the handshake
        produced keys there is nothing to authenticate a CLOSE with: the session just
        becomes CLOSED and the driver closes the transport.

        :raises ValueError: the code is not a u16 or the reason is longer than 1024 bytes.
        """
        check_close(code, reason)
        if self.close_sent or self._states.send is DirectionState.BROKEN:
            return
        if self._sealer.cipher is None:
            self._states.process(Input.ABANDON)
            return
        self._states.process(Input.CLOSE_SENT)
        self._sender.close(code, reason)

    # -- channels (the work is :mod:`stalk.channel_ops`') ------------------------------------

    def open_channel(self) -> int:
        """Open a channel of ours; its id. Its first record (spack or CLOSE) opens it.

        :raises ~stalk.LocalProtocolError: no channels on this connection, or the peer's
            limit of open channels is reached.
        """
        return self._ops.open()

    def close_channel(self, channel: int) -> None:
        """Send the CLOSE of our direction of ``channel``, after what it has queued.

        :raises ~stalk.LocalProtocolError: the channel is not open for sending.
        """
        self._ops.close(channel)

    def reset_channel(self, channel: int, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Reset ``channel``: both directions end; what it had not sent is dropped.

        :raises ValueError: the code is not a u16 or the reason is too long.
        :raises ~stalk.LocalProtocolError: the channel is not open (or already reset).
        """
        self._ops.reset(channel, code, reason)

    def release_channel(self, channel: int) -> None:
        """The application let go of a channel the peer reset: our answering RESET goes.

        :raises ~stalk.LocalProtocolError: the channel is not one the peer reset.
        """
        self._ops.release_channel(channel, self._states.can_send_data)
