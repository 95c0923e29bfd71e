"""The receive side of channels: each record of a connection with channels, routed.

Theory of operation
-------------------
On a connection with channels (SPEC "Channels") the :class:`~stalk.receiver.Receiver`
hands every batch of parsed records to a :class:`Demux` before decoding any of them.
:meth:`Demux.route` does, in wire order, everything that does not need decoding:

- it counts data bytes (MESSAGE and FRAGMENT bodies) against the credit we granted, on the
  channel and on the connection, and refuses data beyond it (FLOW_CONTROL_ERROR);
- it opens the channels the peer opens (within our limit), moves each channel through its
  states (:mod:`stalk.channels`), and drops what the peer sent before it saw our RESET;
- it applies the credit the peer grants us (WINDOW, CONNECTION_WINDOW), and ignores a
  WINDOW or RESET on a channel that already ended (it crossed the channel's end);
- it counts the whole spacks each channel holds: the driver hands each spack's data
  bytes (its encoded length, in its event) back with :meth:`Demux.release` once the
  application has it, in order, and that is when credit goes back to the peer (a quarter
  window at a time), so what the peer makes us hold is bounded by what we granted. Most
  releases grant nothing and take a short way (``tests/test_channels_session.py``
  compares it with the general one). Channel 0's data is counted against credit a
  batch at once when the batch holds nothing else (whole spacks, perhaps the end of one
  and the start of another, as a stream of large spacks has), from the count the parser
  made as it parsed it (:func:`~stalk.records.read_channel_records`); so is a run of
  whole spacks on channel 0 inside any other batch, as routing meets it
  (``tests/test_channels_receive.py`` compares both with the count record by record);
- it gives the **assembly slot** (SPEC "Channels", flow control) to the first channel that
  runs out of credit, its own or the connection's, in the middle of a spack: from then on
  that spack's pieces are granted back as they arrive (a quarter window at a time, or
  the slot's last grant if less), so a spack larger than the window still arrives, and
  only one such spack is held at a time.

The records it keeps are decoded by the receiver as on channel 0, each channel with its
own :class:`~stalk.reassembly.Reassembler`; a CLOSE or RESET it keeps becomes its event
there, in order after the channel's spacks.
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence
from typing import Final

from stalk.channels import Channel, ChannelInput, ChannelTable, Credit
from stalk.errors import ProtocolError
from stalk.events import ChannelOpened, Event
from stalk.reassembly import Reassembler
from stalk.records import Record, RecordWriter, decode_close, decode_window, encode_uvarint
from stalk.states import Directions
from stalk.wire import RecordKind

__all__ = ["Demux"]

_MESSAGE: Final = RecordKind.MESSAGE
_FRAGMENT: Final = RecordKind.FRAGMENT
_CLOSE: Final = RecordKind.CLOSE
_WINDOW: Final = RecordKind.WINDOW
_CONNECTION_WINDOW: Final = RecordKind.CONNECTION_WINDOW
_DATA_RECEIVED: Final = ChannelInput.DATA_RECEIVED


class Demux:
    """Routes a connection's records to its channels; see the module's theory of operation.

    :param table: the connection's channels.
    :param limit: the largest encoded spack we accept.
    :param channel0: channel 0's reassembler (the receiver's own).
    :param control: where the grants of :meth:`release` go (the session's control records).
    :param states: the session's directions: once ours may send no more data, a release
        grants nothing.
    """

    __slots__ = (
        "_control",
        "_partial",
        "_reassemblers",
        "_slot_ahead",
        "_slot_complete",
        "_slot_granted",
        "_slot_owed",
        "_slot_quarter",
        "_slot_step",
        "_states",
        "channel0",
        "limit",
        "short",
        "slot",
        "table",
    )

    def __init__(
        self,
        table: ChannelTable,
        limit: int,
        channel0: Reassembler,
        *,
        control: RecordWriter,
        states: Directions,
    ) -> None:
        self.table = table
        self._control = control
        self._states = states
        self.limit = limit
        self.channel0 = channel0
        # Data bytes of the spack in progress, per channel (0 included).
        self._partial: dict[int, int] = {}
        # Channels other than 0 that received a piece, until their CLOSE or RESET is
        # processed (a channel may leave the table before the receiver reaches its records).
        self._reassemblers: dict[int, Reassembler] = {}
        #: The channel holding the assembly slot, if any: for one spack, the one it was
        #: inside when it took the slot, until the application has it.
        self.slot: int | None = None
        self._slot_granted = 0  # bytes of the slot's spack granted back on arrival
        self._slot_owed = 0  # bytes of it arrived and not granted back yet
        self._slot_quarter = 1  # a quarter of the slot channel's window
        self._slot_step = 1  # owed bytes are granted once this many: see _data
        self._slot_complete = False  # the slot's spack arrived whole (not yet released)
        # Once it did: the spacks of its channel to be released before it.
        self._slot_ahead = 0
        #: :meth:`release` takes its short way when it grants nothing; ``False`` only to
        #: compare with the general way (``tests/test_channels_session.py``).
        self.short = True

    # -- routing -----------------------------------------------------------------------

    def route(
        self,
        records: list[Record],
        events: MutableSequence[Event],
        grants: RecordWriter,
        data: int = -1,
    ) -> list[Record]:
        """Do the bookkeeping of ``records`` in order; the records left to decode.

        :param events: where :class:`~stalk.events.ChannelOpened` goes (before the
            channel's first spack).
        :param grants: where the WINDOW and RESET records we owe go (sent once the
            message passed, like PONGs).
        :param data: the bytes of the records' bodies if every one is a MESSAGE on channel
            0 but the last, which may be a FRAGMENT on channel 0
            (:func:`~stalk.records.read_channel_records` says), else -1.
        :raises ~stalk.errors.ProtocolError: a record breaks SPEC "Channels" (its subclasses
            say which: too many channels, data beyond credit).
        """
        if data >= 0 and self._channel0_data(records, data, grants):
            return records
        partial = self._partial
        kept: list[Record] = []
        table = self.table
        run = count = 0  # a run of whole spacks on channel 0 not counted yet: bytes, spacks
        for record in records:
            kind, channel_id, body = record
            if kind is _MESSAGE and not channel_id and 0 not in partial:
                # A whole spack on channel 0, the most common record: counted with the
                # rest of its run, before any other record (_count_run).
                run += len(body)
                count += 1
                kept.append(record)
                continue
            if count:
                self._count_run(kept, run, count)
                run = count = 0
            if kind is _MESSAGE or kind is _FRAGMENT:
                if self._data(channel_id, len(body), kind is _FRAGMENT, events, grants):
                    kept.append(record)
            elif not channel_id:
                if kind is _WINDOW:
                    table.channel0.granted(decode_window(body), "channel 0")
                elif kind is _CONNECTION_WINDOW:
                    table.connection.granted(decode_window(body), "connection")
                else:
                    kept.append(record)  # channel 0's own records: the receiver acts on them
            elif kind is _WINDOW:
                channel = self._existing(channel_id)
                if channel is not None:
                    channel.credit.granted(decode_window(body), channel_id)
            elif kind is _CLOSE:
                found = self._lookup(channel_id, events)
                reset_by_us = found.state.reset_by_us
                table.process(found, ChannelInput.CLOSE_RECEIVED)
                if not reset_by_us:
                    kept.append(record)
            else:  # RESET
                decode_close(body, "RESET")
                channel = self._existing(channel_id)
                if channel is None:  # its CLOSE, then RESET, crossed our CLOSE: it ended
                    continue
                if channel.state.reset_by_us:
                    table.process(channel, ChannelInput.RESET_RECEIVED)  # the answer to ours
                    continue
                table.process(channel, ChannelInput.RESET_RECEIVED)
                self.forget(channel_id, grants)
                kept.append(record)
        if count:
            self._count_run(kept, run, count)
        return kept

    def count_lone(self, size: int) -> bool:
        """Count a whole spack of ``size`` data bytes on channel 0, alone in its message.

        What :meth:`route` would do with it, in short: the receiver's way for the most
        common plaintext (``tests/test_channels_receive.py`` compares both).

        :returns: ``False`` when :meth:`route` is to count it instead, nothing counted:
            channel 0 has a spack in progress, or the spack is beyond credit (route's
            error says so).
        """
        connection, channel0 = self.table.connection, self.table.channel0
        if size > connection.receive or size > channel0.receive or 0 in self._partial:
            return False
        connection.receive -= size
        channel0.receive -= size
        channel0.held += 1
        return True

    def _count_run(self, kept: Sequence[Record], size: int, count: int) -> None:
        """Count ``kept``'s last ``count`` records against credit, all at once.

        They are whole spacks on channel 0, of ``size`` data bytes together: what
        :meth:`_data` would count one by one.

        :raises ~stalk.errors.FlowControlError: beyond credit (the first record beyond it
            says so, as counted one by one).
        """
        table = self.table
        connection, channel0 = table.connection, table.channel0
        if size <= connection.receive and size <= channel0.receive:
            connection.receive -= size  # (Credit.received, its check made for both)
            channel0.receive -= size
        else:
            for _, _, body in kept[-count:]:
                connection.received(len(body), "the connection")
                channel0.received(len(body), "channel 0")
        channel0.held += count

    def _channel0_data(self, records: list[Record], data: int, grants: RecordWriter) -> bool:
        """Count a batch of channel 0's data at once: what :meth:`_data` would, one by one.

        The records are MESSAGEs on channel 0 but the last, which may be a FRAGMENT (their
        ``data`` bytes, as the parser counted them); the first may end a spack in progress.

        :returns: ``False`` when the general way is to count them instead: beyond credit
            (its error names the record that crossed it), or while a channel holds the
            assembly slot with a spack in progress. Nothing is counted then.
        """
        if 0 not in self._partial and records[-1].kind is _MESSAGE:
            # Whole spacks only: the most common batch. (None can be the slot's: a
            # channel takes the slot inside a spack.)
            self._count_run(records, data, len(records))
            return True
        if self.slot is not None:
            return False
        table = self.table
        connection, channel0 = table.connection, table.channel0
        if data > connection.receive or data > channel0.receive:
            return False
        connection.receive -= data
        channel0.receive -= data
        last = records[-1]
        if last.kind is _MESSAGE:
            channel0.held += len(records)
            del self._partial[0]  # the first record ended the spack in progress
            return True
        ends = len(records) - 1  # the MESSAGEs: each ends a spack
        channel0.held += ends
        so_far = len(last.body) + (self._partial.get(0, 0) if not ends else 0)
        if not channel0.receive or not connection.receive:
            # Out of credit inside a spack: it takes the slot (as in _data).
            self._take_slot(0, so_far, channel0, grants)
        self._partial[0] = so_far
        return True

    def _lookup(self, channel_id: int, events: MutableSequence[Event]) -> Channel:
        """The channel a data or CLOSE record is for, opening it if the peer opens it."""
        channel, opened = self.table.for_peer_record(channel_id)
        if opened:
            events.extend(ChannelOpened(each) for each in opened)
        return channel

    def _existing(self, channel_id: int) -> Channel | None:
        """An open channel; ``None`` for one that ended (a WINDOW or RESET may cross its end).

        :raises ~stalk.errors.ProtocolError: a channel that was never opened.
        """
        channel = self.table.channels.get(channel_id)
        if channel is None and not self.table.opened_before(channel_id):
            raise ProtocolError(f"record on channel {channel_id}, which was never opened")
        return channel

    def _data(
        self,
        channel_id: int,
        size: int,
        more: bool,
        events: MutableSequence[Event],
        grants: RecordWriter,
    ) -> bool:
        """Count a data record; whether to decode it (else it is dropped)."""
        table = self.table
        if channel_id:  # checked in SPEC's order: id, connection credit, state, credit
            channel = self._lookup(channel_id, events)
            table.connection.received(size, "the connection")
            table.process(channel, _DATA_RECEIVED)
            channel.credit.received(size, channel_id)
            if channel.state.reset_by_us:
                # Sent before the peer saw our RESET: dropped, its connection credit back.
                self._release_connection(size, grants)
                return False
            credit = channel.credit
        else:
            table.connection.received(size, "the connection")
            credit = table.channel0
            credit.received(size, "channel 0")
        if not more and channel_id not in self._partial:
            # A whole spack in one record: the common case, in short. (It cannot be the
            # slot's: a channel takes the slot inside a spack.)
            credit.held += 1
            return True
        partial = self._partial.get(channel_id, 0) + size
        in_slot = self.slot == channel_id and not self._slot_complete
        if in_slot:
            # A piece of the slot's spack: granted back once the bytes owed reach a quarter
            # window or the slot's last grant, if less (the peer can always send that
            # much), and at the spack's end.
            owed = self._slot_owed + size
            if more and owed < self._slot_step:
                self._slot_owed = owed
            else:
                self._grant(channel_id, owed, grants)
                self._slot_granted += owed
                self._slot_owed = 0
                self._slot_step = min(self._slot_quarter, owed)
        elif more and self.slot is None and (not credit.receive or not table.connection.receive):
            # Out of credit inside a spack: it takes the slot, and what it holds goes back.
            self._take_slot(channel_id, partial, credit, grants)
            in_slot = True
        if more:
            self._partial[channel_id] = partial
        else:
            self._partial.pop(channel_id, None)
            if in_slot:
                self._slot_complete = True  # later spacks of the channel take credit again
                self._slot_ahead = credit.held
            credit.held += 1
        return True

    # -- credit back -------------------------------------------------------------------

    def release(self, channel_id: int, size: int) -> bool:
        """The application has a spack of ``size`` data bytes from ``channel_id``.

        Spacks of one channel are released in the order they were delivered. This is
        :attr:`stalk.session.Session.release` on a connection with channels.

        :returns: whether it added grants to the session's control records (or freed the
            assembly slot, which may have).
        """
        table = self.table
        if not channel_id:
            credit: Credit | None = table.channel0
        elif (channel := table.channels.get(channel_id)) is not None:
            credit = channel.credit
        else:
            credit = None  # the channel ended: only the connection's credit goes back
        if credit is not None and channel_id != self.slot and self.short:
            # Most releases grant nothing: each credit only adds the bytes it will grant
            # once they reach its threshold (Credit.release), here for both at once.
            connection = table.connection
            if (released := credit.released + size) < credit.threshold and (
                total := connection.released + size
            ) < connection.threshold:
                credit.held -= 1
                credit.released = released
                connection.released = total
                return False
        if self._states.can_send_data:
            return self._release(channel_id, size, credit, self._control)
        # Once we sent CLOSE, nothing is owed (SPEC "Channels"): the counts alone move.
        self._release(channel_id, size, credit, RecordWriter())
        return False

    def _release(
        self, channel_id: int, size: int, credit: Credit | None, grants: RecordWriter
    ) -> bool:
        """:meth:`release`, every case (``credit``: the channel's, if it is open)."""
        handover = False
        if channel_id == self.slot and self._slot_complete:
            if self._slot_ahead:
                self._slot_ahead -= 1
            else:  # the slot's spack: its bytes went back as they arrived
                handover = True
                size = 0
                self._free_slot()
        table = self.table
        increment = 0
        if credit is not None:
            credit.held -= 1
            increment = credit.release(size)
        if increment:
            grants.add(_WINDOW, encode_uvarint(increment), channel_id)
        connection = table.connection.release(size)
        if connection:
            grants.add(_CONNECTION_WINDOW, encode_uvarint(connection))
        if handover:
            self._offer_slot(grants)
            return True
        return bool(increment or connection)

    def _offer_slot(self, grants: RecordWriter) -> None:
        """The slot is free: the first channel stuck inside a spack without credit takes it."""
        table = self.table
        for channel_id, partial in self._partial.items():
            credit = table.channel0 if not channel_id else table.channels[channel_id].credit
            if not credit.receive or not table.connection.receive:
                self._take_slot(channel_id, partial, credit, grants)
                return

    def _take_slot(
        self, channel_id: int, partial: int, credit: Credit, grants: RecordWriter
    ) -> None:
        """``channel_id`` takes the slot inside a spack: the ``partial`` bytes so far go back."""
        self.slot = channel_id
        self._grant(channel_id, partial, grants)
        self._slot_granted = partial
        self._slot_owed = 0
        self._slot_quarter = max(1, credit.window // 4)
        self._slot_step = min(self._slot_quarter, partial)

    def _free_slot(self) -> None:
        self.slot = None
        self._slot_granted = 0
        self._slot_owed = 0
        self._slot_complete = False
        self._slot_ahead = 0

    def _release_connection(self, size: int, grants: RecordWriter) -> None:
        increment = self.table.connection.release(size)
        if increment:
            grants.add(_CONNECTION_WINDOW, encode_uvarint(increment))

    def _grant(self, channel_id: int, size: int, grants: RecordWriter) -> None:
        """Grant ``size`` bytes back at once, to the channel and the connection."""
        if not size:
            return
        self.table.credit(channel_id).receive += size
        grants.add(_WINDOW, encode_uvarint(size), channel_id)
        self.table.connection.receive += size
        grants.add(_CONNECTION_WINDOW, encode_uvarint(size))

    def forget(self, channel_id: int, grants: RecordWriter) -> None:
        """A reset channel's spack in progress is dropped, with its slot.

        Its bytes go back to the connection's credit (the part not granted back already);
        its whole spacks, delivered or about to be, are the driver's to release. Its
        reassembler stays: records routed before the reset may still be decoded from the
        pieces it holds (the receiver lets it go with :meth:`ended`).
        """
        partial = self._partial.pop(channel_id, 0)
        # The slot's spack in progress is dropped with its slot; a whole one is still
        # the driver's to release, and keeps the slot until then.
        handover = self.slot == channel_id and not self._slot_complete
        if handover:
            partial -= self._slot_granted
            self._free_slot()
        self._release_connection(partial, grants)
        if handover:
            self._offer_slot(grants)

    @property
    def busy(self) -> bool:
        """Whether a channel other than 0 is in the middle of a spack, as routed so far.

        Routing runs ahead of decoding, and a reset channel's pieces are no spack in
        progress any more: the count routing keeps says it, not the reassemblers.
        """
        return any(channel_id for channel_id in self._partial)

    def reassembler(self, channel_id: int) -> Reassembler:
        """The reassembler of ``channel_id`` (created for a channel's first record)."""
        if not channel_id:
            return self.channel0
        reassembler = self._reassemblers.get(channel_id)
        if reassembler is None:
            reassembler = self._reassemblers[channel_id] = Reassembler(self.limit)
        return reassembler

    def ended(self, channel_id: int) -> None:
        """The channel's pieces are of no more use: its reassembler goes.

        The receiver calls it once it processed the channel's CLOSE or RESET, or once no
        record routed before our reset of the channel is left to decode.
        """
        self._reassemblers.pop(channel_id, None)
