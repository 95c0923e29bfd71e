"""``python -m stalk.bench.hostile``: what hostile traffic costs a stalk receiver.

For each record mix and each dense spack shape a peer can send, one sans-IO receiving
session processes Noise messages full of it, and this prints, per wire byte:

- the receiver's CPU time (``receive_data`` and every ``next_event()`` until NEED_DATA,
  with the PONGs it owes taken as a driver would);
- what producing the same bytes costs a sender written with stalk's own record writer
  (records queued one by one, packed and sealed): the "sender" of the issue's bound;
- what it costs a crafted sender that only seals a prebuilt plaintext again and again
  (the cheapest possible attacker: no per-record work at all);
- the longest single ``next_event()`` call: how long the receiver holds its event loop.

No network, no event loop: the figures are the core's own. ``--messages N`` sets how many
64 KiB Noise messages each mix sends (default 32).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from stalk import events
from stalk.errors import StalkError
from stalk.events import NEED_DATA
from stalk.framing import encode_frame
from stalk.identity import Identity
from stalk.records import RecordWriter, encode_uvarint
from stalk.session import Role, Session
from stalk.spack import encode_spack
from stalk.wire import RECORD_CAPACITY, RecordKind

#: Older stalks (to measure "before") have no PAUSED.
PAUSED = getattr(events, "PAUSED", None)


def record(kind: RecordKind, body: bytes) -> bytes:
    return bytes((kind, 0)) + encode_uvarint(len(body)) + body


def take_all(session: Session) -> bytes:
    """Everything the session has to send now: data_to_send() until it returns b"".

    tests/helpers.take_all, which this file cannot import.
    """
    pieces: list[bytes | bytearray] = []
    while data := session.data_to_send():
        pieces.append(data)
    return b"".join(pieces)


def pair() -> tuple[Session, Session]:
    """An initiator and a responder, handshake done, output drained."""
    server_id = Identity.generate()
    client = Session(Role.INITIATOR, Identity.generate(), peer=server_id.public)
    server = Session(Role.RESPONDER, server_id)
    for _ in range(3):
        if data := take_all(client):
            server.receive_data(data)
        while (event := server.next_event()) is not NEED_DATA:
            if type(event).__name__ == "PeerIdentified":
                server.accept()
        if data := take_all(server):
            client.receive_data(data)
        while client.next_event() is not NEED_DATA:
            pass
    assert client.peer is not None
    assert server.peer is not None
    return client, server


@dataclass
class Mix:
    """A record mix: its Noise messages, and how a stalk sender writes one of them."""

    name: str
    #: The plaintext of the ``i``-th Noise message.
    plaintext: Callable[[int], bytes]
    #: Queue one message's worth of these records into a writer (the sender's work);
    #: ``None`` for a dense spack, whose sender's work is encoding it.
    write: Callable[[RecordWriter], None] | None
    #: Every message ends with REKEY: both sides derive a new key after it.
    rekey: bool = False
    #: Noise messages sent per "message" of ``--messages`` (small messages send more).
    scale: int = 1


def record_mixes() -> list[Mix]:
    """Noise messages full of small records, each with how a stalk sender writes them."""
    spack64 = encode_spack([os.urandom(57)])
    empty = encode_spack([])
    small_records = [
        ("64 B spacks (ordinary traffic)", RecordKind.MESSAGE, spack64),
        ("empty spacks (4-byte records)", RecordKind.MESSAGE, empty),
        ("empty PINGs (3-byte records)", RecordKind.PING, b""),
        ("unsolicited PONGs (3-byte records)", RecordKind.PONG, b""),
        ("1 KiB PINGs", RecordKind.PING, bytes(1024)),
    ]
    mixes = []
    for name, kind, body in small_records:
        one = record(kind, body)
        count = RECORD_CAPACITY // len(one)

        def write(writer: RecordWriter, kind: RecordKind = kind, body: bytes = body) -> None:
            for _ in range(RECORD_CAPACITY // len(record(kind, body))):
                if kind is RecordKind.MESSAGE:
                    writer.add_message(body)
                else:
                    writer.add(kind, body)

        mixes.append(Mix(name, _same(one * count), write))
    header = b"\x91\xc6" + (8 * 1024 * 1024).to_bytes(4, "big")
    zeros = record(RecordKind.FRAGMENT, b"\x00") * (RECORD_CAPACITY // 4)
    first = b"".join(record(RecordKind.FRAGMENT, header[i : i + 1]) for i in range(6))
    first += zeros[len(first) :]

    def write_fragments(writer: RecordWriter) -> None:
        for _ in range(RECORD_CAPACITY // 4):
            writer.add(RecordKind.FRAGMENT, b"\x00")

    mixes.append(Mix("1-byte FRAGMENTs of a bin", lambda i: zeros if i else first, write_fragments))

    def write_rekey(writer: RecordWriter) -> None:
        writer.add(RecordKind.REKEY, b"")

    rekey = record(RecordKind.REKEY, b"")
    mixes.append(Mix("a REKEY alone in every message", _same(rekey), write_rekey, True, 1000))
    return mixes


def _same(plaintext: bytes) -> Callable[[int], bytes]:
    """Every Noise message alike."""
    return lambda _: plaintext


def _dense(shape: bytes) -> Mix:
    """Fragments of one 8 MiB spack made of ``shape`` repeated (until the budget refuses)."""
    count = (8 * 1024 * 1024) // len(shape)
    encoding = b"\xdd" + count.to_bytes(4, "big") + shape * count
    size = RECORD_CAPACITY - 5

    def plaintext(index: int) -> bytes:
        return record(RecordKind.FRAGMENT, encoding[index * size : (index + 1) * size])

    return Mix(f"dense spack of {shape.hex()}", plaintext, None)


def measure(mix: Mix, messages: int) -> dict[str, float]:
    client, server = pair()
    send = client._sealer.cipher
    assert send is not None
    messages *= mix.scale
    plaintexts = [mix.plaintext(index) for index in range(messages)]
    frames = []
    started = time.process_time()
    for plaintext in plaintexts:
        frames.append(encode_frame(send.encrypt(plaintext)))
        if mix.rekey:
            send.rekey()
    crafted = time.process_time() - started
    wire = sum(map(len, frames))
    written = float("nan")
    if mix.write is not None:
        writer = RecordWriter()
        started = time.process_time()
        for _ in range(messages):
            mix.write(writer)
            for packed in writer.pack():
                encode_frame(send.encrypt(bytes(packed)))
                if mix.rekey:
                    send.rekey()
        written = time.process_time() - started
    worst = 0.0
    started = time.process_time()
    error = ""
    try:
        for frame in frames:
            server.receive_data(frame)
            while True:
                step = time.perf_counter()
                event = server.next_event()
                worst = max(worst, time.perf_counter() - step)
                if event is NEED_DATA:
                    break
                if event is PAUSED:
                    take_all(server)
    except StalkError as exc:  # a refusal ends the mix: report it
        error = type(exc).__name__
    received = time.process_time() - started
    return {
        "receiver": received / wire * 1e9,
        "writer": written / wire * 1e9,
        "crafted": crafted / wire * 1e9,
        "worst step": worst * 1e3,
        "refused": error,  # type: ignore[dict-item]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=32)
    args = parser.parse_args(argv)
    print(
        "| traffic | receiver ns/B | stalk-writer sender ns/B | ratio | crafted sender ns/B "
        "| ratio | worst step ms | ended |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    cases = [*record_mixes(), _dense(b"\x90"), _dense(b"\x81\xa0\x90"), _dense(b"\x92\x01\x02")]
    for mix in cases:
        r = measure(mix, args.messages)
        writer = "n/a" if math.isnan(r["writer"]) else f"{r['writer']:.0f}"
        ratio = "n/a" if math.isnan(r["writer"]) else f"{r['receiver'] / r['writer']:.1f}"
        print(
            f"| {mix.name} | {r['receiver']:.0f} | {writer} | {ratio} | "
            f"{r['crafted']:.1f} | {r['receiver'] / r['crafted']:.0f} | {r['worst step']:.1f} | "
            f"{r['refused'] or 'accepted'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
