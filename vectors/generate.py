"""Generate stalk's own test vectors: byte-exact transcripts of whole sessions.

Run it with stalk importable (the project's virtualenv)::

    python vectors/generate.py            # (re)write the files of FILES here
    python vectors/generate.py --check    # compare them with what stalk produces now
    python vectors/generate.py --outline  # print each transcript's steps

``--check`` exits with status 1 when a file differs or is missing. ``vectors/README.md``
documents the JSON format and how another implementation replays a transcript.

How a transcript is made
------------------------
An initiator and a responder :class:`~stalk.session.Session` are wired back to back, with
fixed static and ephemeral keys (:func:`fixed_key`). A fixed script of API calls is run
(:func:`basic_script` for XX and IK, :func:`channel_script` with channels,
:func:`certificate_script` with certificates). After each
call, everything the acting side's ``data_to_send()`` hands out (called until it returns
nothing) is one *step*; it is fed whole to the other side, whose events are drained
(``next_event()`` until ``NEED_DATA``), and whatever that side then writes is the next
step, and so on until nobody has anything to write. A ``PeerIdentified`` event is answered
with ``accept()``, itself a step. A call that may write nothing (:data:`SILENT_CALLS`) is a
step even when it does not, so that a replay checks that it did not.

Every recorded step is then decoded a second, independent way (:class:`Observer`): an
observer holding all four private keys re-runs both ends of the Noise handshake over the
recorded bytes (checking that it reproduces them exactly), decrypts every transport
message, parses its records and matches every spack piece against the recorded spack
encodings. The per-frame annotations (``parts``) and the step notes come from there, not
from the sessions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias

import msgpack

from stalk._noise import NoiseHandshake, TransportCipher
from stalk.certificates import Authorities, Authority, Certificate, CertificatePolicy
from stalk.events import (
    NEED_DATA,
    PAUSED,
    ChannelCloseReceived,
    ChannelMessageReceived,
    ChannelOpened,
    ChannelResetReceived,
    CloseReceived,
    Event,
    HandshakeComplete,
    MessageReceived,
    PeerIdentified,
    PongReceived,
)
from stalk.handshake import ChannelParams
from stalk.identity import Identity, PublicIdentity
from stalk.session import Role, Session, SessionConfig
from stalk.spack import Float32, Spack, SpackValue
from stalk.wire import PROTOCOL_NAMES, PROTOCOL_VERSION, Pattern, RecordKind

__all__ = [
    "FILES",
    "FORMAT",
    "build_transcript",
    "fixed_key",
    "main",
    "render",
    "value_from_json",
    "value_to_json",
]

Json: TypeAlias = Any
"""A JSON-compatible value (dicts, lists, str, int, bool, None)."""

#: The ``format`` field of every transcript: bump it when the JSON layout changes.
FORMAT: Final = "stalk-transcript/1"
#: Where the script lives; the transcripts are written beside it.
HERE: Final = Path(__file__).resolve().parent
#: Each transcript's name (a key of :data:`SETUPS`) and file.
FILES: Final[dict[str, str]] = {
    "XX": "stalk-xx.json",
    "IK": "stalk-ik.json",
    "channels": "stalk-channels.json",
    "certificates-xx": "stalk-certificates-xx.json",
    "certificates-ik": "stalk-certificates-ik.json",
}

INITIATOR: Final = "initiator"
RESPONDER: Final = "responder"

#: Element types of typed arrays: JSON name -> (Python typecode, element size).
ARRAY_ELEMENTS: Final[dict[str, tuple[str, int]]] = {
    "int8": ("b", 1),
    "uint8": ("B", 1),
    "int16": ("h", 2),
    "uint16": ("H", 2),
    "int32": ("i", 4),
    "uint32": ("I", 4),
    "int64": ("q", 8),
    "uint64": ("Q", 8),
    "float32": ("f", 4),
    "float64": ("d", 8),
}
_ELEMENT_BY_TYPECODE: Final = {code: name for name, (code, _) in ARRAY_ELEMENTS.items()}
_BIG_ENDIAN_HOST: Final = sys.byteorder == "big"
#: The exact Python types a spack value can have.
_VALUE_TYPES: Final[frozenset[type]] = frozenset(
    {type(None), bool, int, float, Float32, str, bytes, bytearray, memoryview}
    | {list, tuple, dict, array}
)

#: The Noise tokens of each handshake message, for the notes.
_TOKENS: Final[dict[Pattern, dict[str, str]]] = {
    "XX": {"msg1": "-> e", "msg2": "<- e, ee, s, es", "msg3": "-> s, se"},
    "IK": {"msg1": "-> e, es, s, ss", "msg2": "<- e, ee, se"},
}
#: Which handshake messages each side sends, in order.
_HANDSHAKE_MESSAGES: Final[dict[Pattern, dict[str, list[str]]]] = {
    "XX": {INITIATOR: ["msg1", "msg3"], RESPONDER: ["msg2"]},
    "IK": {INITIATOR: ["msg1"], RESPONDER: ["msg2"]},
}


def fixed_key(label: str) -> bytes:
    """A fixed 32-byte private key: ``SHA-256("stalk test vectors: " + label)``."""
    return hashlib.sha256(b"stalk test vectors: " + label.encode("ascii")).digest()


def _other(side: str) -> str:
    return RESPONDER if side == INITIATOR else INITIATOR


# --------------------------------------------------------------------------- spack values


def value_to_json(value: SpackValue) -> Json:
    """The typed JSON form of one spack value (vectors/README.md, "Spack values")."""
    if type(value) not in _VALUE_TYPES:
        raise TypeError(f"no JSON form for {type(value).__qualname__}")
    # The types are exact from here on, so isinstance() tests are exact type tests.
    if value is None:
        return {"type": "nil"}
    if isinstance(value, bool):
        return {"type": "bool", "value": value}
    if isinstance(value, int):
        return {"type": "int", "value": str(value)}
    if isinstance(value, Float32):
        return {"type": "float32", "hex": struct.pack(">f", value).hex(), "repr": str(value)}
    if isinstance(value, float):
        return {"type": "float64", "hex": struct.pack(">d", value).hex(), "repr": repr(value)}
    if isinstance(value, str):
        return {"type": "str", "value": value}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"type": "bytes", "hex": bytes(value).hex()}
    if isinstance(value, (list, tuple)):
        items = [value_to_json(item) for item in value]
        return {"type": type(value).__name__, "items": items}
    if isinstance(value, dict):
        entries = [
            {"key": value_to_json(key), "value": value_to_json(item)} for key, item in value.items()
        ]
        return {"type": "map", "entries": entries}
    element = _ELEMENT_BY_TYPECODE[value.typecode]
    raw = array(value.typecode, value)
    if _BIG_ENDIAN_HOST:
        raw.byteswap()
    return {
        "type": "array",
        "element": element,
        "typecode": value.typecode,
        "hex": raw.tobytes().hex(),
    }


def value_from_json(node: Json) -> SpackValue:
    """The Python value of a typed JSON form (the inverse of :func:`value_to_json`)."""
    kind = node["type"]
    if kind == "nil":
        return None
    if kind in ("bool", "str"):
        return node["value"]  # type: ignore[no-any-return]
    if kind == "int":
        return int(node["value"])
    if kind == "float64":
        return float(struct.unpack(">d", bytes.fromhex(node["hex"]))[0])
    if kind == "float32":
        return Float32(struct.unpack(">f", bytes.fromhex(node["hex"]))[0])
    if kind == "bytes":
        return bytes.fromhex(node["hex"])
    if kind == "list":
        return [value_from_json(item) for item in node["items"]]
    if kind == "tuple":
        return tuple(value_from_json(item) for item in node["items"])
    if kind == "map":
        result: dict[str | bytes, SpackValue] = {}
        for entry in node["entries"]:
            key = value_from_json(entry["key"])
            if type(key) not in (str, bytes):
                raise ValueError("map keys are str or bytes")
            result[key] = value_from_json(entry["value"])  # type: ignore[index]
        return result
    if kind == "array":
        typecode, _ = ARRAY_ELEMENTS[node["element"]]
        values = array(typecode, bytes.fromhex(node["hex"]))
        if _BIG_ENDIAN_HOST:
            values.byteswap()
        return values
    raise ValueError(f"unknown spack value type {kind!r}")


def _nested_lists(depth: int) -> list[SpackValue]:
    """``depth`` lists nested in each other, the innermost holding one string."""
    value: list[SpackValue] = [f"depth {depth}"]
    for _ in range(depth - 1):
        value = [value]
    return value


def every_type() -> list[SpackValue]:
    """One spack's worth of every value type, at the msgpack format boundaries."""
    return [
        None,
        True,
        False,
        # Ints: each end of every msgpack int format (fixint, uint8..64, int8..64).
        [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1],
        [-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)],
        # float64, always 8 bytes on the wire; NaN is the canonical quiet NaN.
        [0.0, -0.0, 1.5, math.pi, 5e-324, 1.7976931348623157e308, math.inf, -math.inf, math.nan],
        # Float32 (ext 1): 4 big-endian bytes.
        [
            Float32(1.5),
            Float32(0.1),
            Float32(-0.0),
            Float32(3.4028234663852886e38),
            Float32(1e-45),
            Float32(-math.inf),
            Float32(math.nan),
        ],
        # Strings: empty, non-ASCII (2-, 3- and 4-byte UTF-8), fixstr/str8/str16 edges.
        "",
        "stalk",
        "h\u00e9llo w\u00f6rld",
        "\u65e5\u672c\u8a9e",
        "fox \U0001f98a astral",
        "a" * 31,
        "b" * 32,
        "c" * 255,
        "d" * 256,
        # Bytes: empty, every byte value (bin16), the bin8 maximum.
        b"",
        bytes(range(256)),
        b"\xff" * 255,
        # Lists and tuples (ext 2), empty and not.
        [],
        [1, "two", None, [3.0]],
        (),
        (1, "two"),
        ((), [()], (None,)),
        # Maps: empty, str keys, bytes keys, both kinds of key, a map16.
        {},
        {"a": 1, "b": [2, 3]},
        {b"\x00\xff": b"bytes key", b"k": "another"},
        {"str": "str key", b"bytes": "bytes key"},
        {f"k{i:02d}": i for i in range(16)},
        # Nested containers of every kind, and nesting at the depth limit (32).
        {"outer": [(1, {"inner": [Float32(2.5), array("d", [1.0])]}), {b"k": ()}]},
        _nested_lists(32),
        # Typed arrays (ext 16..25): every element type at its range edges, and an empty one.
        array("b", [-128, 0, 127]),
        array("B", [0, 255]),
        array("h", [-32768, 32767]),
        array("H", [0, 65535]),
        array("i", [-(2**31), 2**31 - 1]),
        array("I", [0, 2**32 - 1]),
        array("q", [-(2**63), 2**63 - 1]),
        array("Q", [0, 2**64 - 1]),
        array("f", [1.5, -math.inf]),
        array("d", [math.pi, -0.0]),
        array("d"),
    ]


def big_text(size: int) -> str:
    """``size`` characters of numbered ASCII lines (the fragmented spack's payload)."""
    chunks: list[str] = []
    total = 0
    while total < size:
        line = f"{len(chunks):06d} the quick brown fox jumps over the lazy dog\n"
        chunks.append(line)
        total += len(line)
    return "".join(chunks)[:size]


# --------------------------------------------------------------------------- the script


@dataclass(frozen=True)
class SpackDef:
    """A spack the script sends, with a description for the transcript.

    :ivar channel: the channel it goes on (a transcript with channels; else 0).
    """

    description: str
    values: list[SpackValue]
    channel: int = 0


@dataclass(frozen=True)
class Action:
    """One API call of the script (vectors/README.md lists the calls).

    :ivar call: ``send`` (one spack), ``queue`` (spacks, no flush), ``queue+flush``
        (several, one flush), ``ping``, ``close``; with channels also ``open_channel``,
        ``close_channel``, ``reset_channel``, ``release`` (the application received spack
        ``spack`` on ``channel``) and ``release_channel``.
    """

    side: str
    call: str
    label: str
    spacks: tuple[SpackDef, ...] = ()
    payload: bytes = b""
    code: int = 0
    reason: str = ""
    channel: int = 0
    #: ``release``: the index of the spack released, in the transcript's ``spacks``.
    spack: int = 0


#: The calls that may write nothing: a step that wrote nothing is recorded (bytes "").
SILENT_CALLS: Final = frozenset({"open_channel", "queue", "release"})


def basic_script() -> list[Action]:
    """Everything both sides do after the handshake, in order (the same for XX and IK)."""
    return [
        Action(
            INITIATOR,
            "send",
            "send one of every value type",
            (SpackDef("one of every value type", every_type()),),
        ),
        Action(
            RESPONDER,
            "send",
            "send a reply",
            (SpackDef("a reply from the responder", ["ack", 0, Float32(0.5)]),),
        ),
        Action(
            INITIATOR,
            "queue+flush",
            "queue() 4 small spacks, then flush(): one batch",
            (
                SpackDef("batch 1/4: the empty spack", []),
                SpackDef("batch 2/4", [1]),
                SpackDef("batch 3/4", ["two", 2.0]),
                SpackDef("batch 4/4", [b"\x03", [3], {"n": (3,)}]),
            ),
        ),
        Action(
            INITIATOR,
            "send",
            "send a 150 KB spack: fragmented over 3 transport messages",
            (SpackDef("fragmented: a 150000-character str", ["fragmented", big_text(150_000)]),),
        ),
        Action(
            RESPONDER,
            "send",
            "send a reply",
            (SpackDef("a reply from the responder", ["received", 150_000, True]),),
        ),
        Action(INITIATOR, "ping", "ping()", payload=b"\x00\x01\x02\x03 ping payload"),
        Action(INITIATOR, "close", "close(0, 'initiator done')", reason="initiator done"),
        Action(
            RESPONDER,
            "send",
            "send after the initiator's CLOSE (half-closed)",
            (SpackDef("sent by the responder after the initiator's CLOSE", ["still here", None]),),
        ),
        Action(RESPONDER, "close", "close(0, 'responder done')", reason="responder done"),
    ]


#: The large spack of the channel session: 10,000 encoded bytes, over two windows.
LARGE_ON_CHANNEL: Final = 10_000


def channel_script() -> list[Action]:
    """The channel session's calls after the handshake (vectors/README.md explains each).

    Spack indices (for ``release``) are positions in the transcript's ``spacks``: the
    order of the spacks below.
    """
    large: list[SpackValue] = [
        "large",
        big_text(LARGE_ON_CHANNEL - 10),
    ]  # 92 a5 "large" da <u16>: 10 bytes
    return [
        Action(
            INITIATOR,
            "send",
            "send on channel 0",
            (SpackDef("channel 0: the connection's own stream", ["hello", 0]),),
        ),
        Action(
            RESPONDER,
            "send",
            "reply on channel 0",
            (SpackDef("channel 0: a reply", ["hello yourself", 0]),),
        ),
        Action(INITIATOR, "open_channel", "open_channel(): 1", channel=1),
        Action(
            INITIATOR,
            "send",
            "send on channel 1: its first record opens it",
            (SpackDef("channel 1: a request", ["get", "alpha"], channel=1),),
        ),
        Action(RESPONDER, "open_channel", "open_channel(): 2", channel=2),
        Action(
            RESPONDER,
            "send",
            "send on channel 2: the responder opens one of its own",
            (SpackDef("channel 2: the responder's own", ["notify", 2], channel=2),),
        ),
        Action(INITIATOR, "open_channel", "open_channel(): 3", channel=3),
        Action(
            INITIATOR,
            "queue+flush",
            "queue() a 10000-byte spack on channel 3 and a small one on channel 1, then flush()",
            (
                SpackDef("channel 3: 10000 bytes, over two windows", large, channel=3),
                SpackDef("channel 1: a second request", ["get", "beta"], channel=1),
            ),
        ),
        Action(
            RESPONDER,
            "release",
            "release(3, spack 4): its bytes went back as they arrived",
            channel=3,
            spack=4,
        ),
        Action(
            RESPONDER,
            "send",
            "reply on channel 2",
            (SpackDef("channel 2: 1000 bytes", ["update", "x" * 989], channel=2),),
        ),
        Action(
            INITIATOR,
            "release",
            "release(2, spack 3): 9 bytes, under a quarter window",
            channel=2,
            spack=3,
        ),
        Action(
            INITIATOR,
            "release",
            "release(2, spack 6): past a quarter window",
            channel=2,
            spack=6,
        ),
        Action(INITIATOR, "close_channel", "close_channel(1)", channel=1),
        Action(
            RESPONDER,
            "queue",
            "queue() a reply on channel 1",
            (SpackDef("channel 1: the reply", ["alpha", "beta"], channel=1),),
        ),
        Action(RESPONDER, "close_channel", "close_channel(1)", channel=1),
        Action(
            INITIATOR,
            "reset_channel",
            "reset_channel(2, 4096, 'no longer wanted')",
            channel=2,
            code=4096,
            reason="no longer wanted",
        ),
        Action(RESPONDER, "release_channel", "release_channel(2): the answer", channel=2),
        Action(INITIATOR, "close", "close(0, 'initiator done')", reason="initiator done"),
        Action(
            RESPONDER,
            "send",
            "send on channel 3 after the initiator's CLOSE",
            (SpackDef("channel 3: after the initiator's CLOSE", ["still here", None], channel=3),),
        ),
        Action(RESPONDER, "close", "close(0, 'responder done')", reason="responder done"),
    ]


def certificate_script() -> list[Action]:
    """The certificate sessions' calls after the handshake: the handshake is the point."""
    return [
        Action(
            INITIATOR,
            "send",
            "send a request",
            (SpackDef("a request from the certified client", ["query", "db-1", 1]),),
        ),
        Action(
            RESPONDER,
            "send",
            "send a reply",
            (SpackDef("a reply from the certified server", ["rows", [1, 2, 3], True]),),
        ),
        Action(INITIATOR, "close", "close(0, 'initiator done')", reason="initiator done"),
        Action(RESPONDER, "close", "close(0, 'responder done')", reason="responder done"),
    ]


@dataclass(frozen=True)
class CertificateDef:
    """A certificate the fixed authority issues to one side, and what that side requires.

    :ivar requires_names: the names this side accepts in the peer's certificate
        (``None``: any).
    :ivar requires_groups: the groups one of which the peer's certificate must hold
        (``None``: any).
    """

    serial: int
    name: str
    groups: tuple[str, ...]
    requires_names: tuple[str, ...] | None = None
    requires_groups: tuple[str, ...] | None = None


#: The certificate sessions' authority: an Ed25519 key whose seed is ``fixed_key("authority")``.
AUTHORITY_LABEL: Final = "authority"
#: Both certificates' validity window (2025-06-15T15:06:40Z for one day) and the fixed time
#: at which both sides verify them (11 hours into it), in seconds since 1970 UTC.
NOT_BEFORE: Final = 1_750_000_000
NOT_AFTER: Final = 1_750_086_400
VERIFICATION_TIME: Final = 1_750_040_000
#: The clock skew both verifiers tolerate (stalk's default).
CLOCK_SKEW: Final = 300
#: Both certificate sessions: a client certified as ``client-1`` in ``clients``, which
#: requires the server to be named ``db-1``; a server certified as ``db-1`` in ``db`` and
#: ``ops``, which admits members of ``clients``.
CERTIFICATES: Final[dict[str, CertificateDef]] = {
    INITIATOR: CertificateDef(1, "client-1", ("clients",), requires_names=("db-1",)),
    RESPONDER: CertificateDef(2, "db-1", ("db", "ops"), requires_groups=("clients",)),
}


def authority() -> Authority:
    """The certificate sessions' fixed authority."""
    return Authority.from_private_bytes(fixed_key(AUTHORITY_LABEL))


def issue(side: str) -> Certificate:
    """``side``'s certificate, issued by :func:`authority` to its fixed static key."""
    spec = CERTIFICATES[side]
    subject = Identity.from_private_bytes(fixed_key(f"{side} static")).public
    return authority().sign(
        subject,
        spec.name,
        spec.groups,
        not_before=NOT_BEFORE,
        not_after=NOT_AFTER,
        serial=spec.serial,
    )


def policy(side: str) -> CertificatePolicy:
    """What ``side`` requires of its peer's certificate, at :data:`VERIFICATION_TIME`."""
    spec = CERTIFICATES[side]
    return CertificatePolicy(
        Authorities([authority().public]),
        lambda: float(VERIFICATION_TIME),
        clock_skew=CLOCK_SKEW,
        names=None if spec.requires_names is None else frozenset(spec.requires_names),
        groups=None if spec.requires_groups is None else frozenset(spec.requires_groups),
    )


@dataclass(frozen=True)
class Setup:
    """How one transcript's two sessions are configured, and what they do.

    :ivar certified: both sides present a certificate from :func:`authority` and require
        one of the other (:data:`CERTIFICATES`).
    """

    pattern: Pattern
    initiator: SessionConfig
    responder: SessionConfig
    script: Callable[[], list[Action]]
    description: str
    certified: bool = False


#: XX: the initiator rekeys after every 4 transport messages (its 4th one is the middle
#: fragment of the 150 KB spack). IK: the responder rekeys after every 2. Both responders
#: advertise a 1 MiB limit, both initiators the 16 MiB default. Channels: an XX session in
#: which both offer channels with small windows, the initiator rekeying after every 4.
#: Certificates: an XX and an IK session in which both present and require certificates,
#: with the default configuration.
SETUPS: Final[dict[str, Setup]] = {
    "XX": Setup(
        "XX",
        initiator=SessionConfig(rekey_after_messages=4),
        responder=SessionConfig(max_message_size=2**20),
        script=basic_script,
        description="A whole stalk session (XX)",
    ),
    "IK": Setup(
        "IK",
        initiator=SessionConfig(),
        responder=SessionConfig(max_message_size=2**20, rekey_after_messages=2),
        script=basic_script,
        description="A whole stalk session (IK)",
    ),
    "channels": Setup(
        "XX",
        initiator=SessionConfig(
            rekey_after_messages=4,
            channels=ChannelParams(max_channels=4, channel_window=2048, connection_window=65516),
        ),
        responder=SessionConfig(
            max_message_size=2**20,
            channels=ChannelParams(max_channels=4, channel_window=4096, connection_window=65516),
        ),
        script=channel_script,
        description="A whole stalk session (XX) with channels",
    ),
    "certificates-xx": Setup(
        "XX",
        initiator=SessionConfig(),
        responder=SessionConfig(),
        script=certificate_script,
        description="A whole stalk session (XX) in which both sides present certificates",
        certified=True,
    ),
    "certificates-ik": Setup(
        "IK",
        initiator=SessionConfig(),
        responder=SessionConfig(),
        script=certificate_script,
        description="A whole stalk session (IK) in which both sides present certificates",
        certified=True,
    ),
}


def _keys(name: str) -> dict[str, dict[str, bytes]]:
    """Transcript ``name``'s fixed keys: the static keys all share, ephemerals of its own."""
    return {
        side: {
            "static": fixed_key(f"{side} static"),
            "ephemeral": fixed_key(f"{name} {side} ephemeral"),
        }
        for side in (INITIATOR, RESPONDER)
    }


# --------------------------------------------------------------------------- recording


def _drain(session: Session) -> list[Event]:
    """Every event available now (a CloseReceived, which repeats, ends the list)."""
    events: list[Event] = []
    while (event := session.next_event()) is not NEED_DATA:
        if event is PAUSED:
            if session.has_output:
                break  # the recorder moves what it owes first
            continue
        events.append(event)
        if isinstance(event, CloseReceived):
            break
    return events


class Recorder:
    """Runs the two sessions and records every write as a step."""

    def __init__(self, sessions: dict[str, Session], *, channels: bool) -> None:
        """Record the writes of ``sessions`` (keyed ``initiator`` / ``responder``).

        :param channels: the sessions offer channels (spacks and events name theirs).
        """
        self.sessions = sessions
        self.channels = channels
        self.steps: list[dict[str, Json]] = []
        self.spacks: list[dict[str, Json]] = []
        #: The spack indices each side sent, in order.
        self.sent: dict[str, list[int]] = {INITIATOR: [], RESPONDER: []}
        #: The spack indices each side received, in order.
        self.delivered: dict[str, list[int]] = {INITIATOR: [], RESPONDER: []}
        self.handshake_hashes: list[bytes] = []

    def start(self) -> None:
        """Record the initiator's opening write (made when it was created)."""
        self._write(INITIATOR, {"call": "create"}, "")

    def run(self, action: Action) -> None:
        """Perform one scripted call and record everything it causes."""
        session = self.sessions[action.side]
        cause: dict[str, Json] = {"call": action.call}
        call = action.call
        if action.spacks:
            indices = [self._register(action.side, spack) for spack in action.spacks]
            cause["spacks"] = indices
            for spack in action.spacks:
                session.queue(Spack(*spack.values), spack.channel)
            if call in ("send", "queue+flush"):
                session.flush()
            elif call != "queue":
                raise ValueError(f"{call} takes no spacks")
        elif call == "ping":
            cause["payload_hex"] = action.payload.hex()
            session.ping(action.payload)
        elif call == "close":
            cause.update(code=action.code, reason=action.reason)
            session.close(action.code, action.reason)
        elif call == "open_channel":
            cause["channel"] = action.channel
            if session.open_channel() != action.channel:
                raise AssertionError(f"open_channel() did not open {action.channel}")
        elif call == "close_channel":
            cause["channel"] = action.channel
            session.close_channel(action.channel)
        elif call == "reset_channel":
            cause.update(channel=action.channel, code=action.code, reason=action.reason)
            session.reset_channel(action.channel, action.code, action.reason)
        elif call == "release":
            self._release(action, cause)
        elif call == "release_channel":
            cause["channel"] = action.channel
            session.release_channel(action.channel)
        else:
            raise ValueError(f"unknown call {call!r}")
        if not self._write(action.side, cause, action.label, silent=call in SILENT_CALLS):
            raise RuntimeError(f"{action.label} wrote nothing")

    def _release(self, action: Action, cause: dict[str, Json]) -> None:
        spack = self.spacks[action.spack]
        if action.spack not in self.delivered[action.side] or spack["channel"] != action.channel:
            raise AssertionError(f"spack {action.spack} did not arrive on {action.channel}")
        cause.update(channel=action.channel, spack=action.spack)
        self.sessions[action.side].release(action.channel, spack["encoded_length"])

    def _register(self, side: str, spack: SpackDef) -> int:
        encoded = Spack(*spack.values).encode()
        values = [value_to_json(value) for value in spack.values]
        if not _same([value_from_json(value) for value in values], spack.values):
            raise AssertionError(f"the JSON form of {spack.description!r} does not round-trip")
        if spack.channel and not self.channels:
            raise ValueError("a spack on a channel in a session without channels")
        index = len(self.spacks)
        entry: dict[str, Json] = {"index": index, "from": side}
        if self.channels:
            entry["channel"] = spack.channel
        entry.update(
            description=spack.description,
            values=values,
            encoded_length=len(encoded),
            encoded_hex=encoded.hex(),
        )
        self.spacks.append(entry)
        self.sent[side].append(index)
        return index

    def _write(
        self, side: str, cause: dict[str, Json], label: str, *, silent: bool = False
    ) -> bool:
        """Take everything ``side`` has to write as one step and deliver it.

        :param silent: record the step even if it wrote nothing (a call that may not).
        """
        session = self.sessions[side]
        data = b"".join(iter(session.data_to_send, b""))
        if not data and not silent:
            return False
        index = len(self.steps)
        step: dict[str, Json] = {
            "step": index,
            "from": side,
            "cause": cause,
            "note": label,
            "bytes": data.hex(),
        }
        self.steps.append(step)
        events: list[Json] = []
        if cause.get("call") == "accept":
            events += self._events(side, _drain(session))
        other = _other(side)
        received: list[Event] = []
        if data:
            receiver = self.sessions[other]
            receiver.receive_data(data)
            received = _drain(receiver)
            events += self._events(other, received)
        step["events"] = events
        if data:
            self._write(other, {"received": index}, "")
        if any(isinstance(event, PeerIdentified) for event in received):
            self._write_accept(other)
        return True

    def _write_accept(self, side: str) -> None:
        self.sessions[side].accept()
        if not self._write(side, {"call": "accept"}, "accept() the identified initiator"):
            raise RuntimeError("accept() wrote nothing")

    def _events(self, side: str, events: Sequence[Event]) -> list[Json]:
        return [{"side": side, **self._event(side, event)} for event in events]

    def _event(self, side: str, event: Event) -> dict[str, Json]:
        if isinstance(event, PeerIdentified):
            return {
                "event": "peer_identified",
                "pattern": event.pattern,
                "peer_static_public_hex": event.peer.raw.hex(),
            }
        if isinstance(event, HandshakeComplete):
            self.handshake_hashes.append(event.handshake_hash)
            return {
                "event": "handshake_complete",
                "pattern": event.pattern,
                "peer_static_public_hex": event.peer.raw.hex(),
                "handshake_hash_hex": event.handshake_hash.hex(),
                "peer_max_message_size": event.peer_max_message_size,
            }
        if isinstance(event, (MessageReceived, ChannelMessageReceived)):
            return self._message(side, event)
        if isinstance(event, PongReceived):
            return {"event": "pong", "payload_hex": event.payload.hex()}
        if isinstance(event, CloseReceived):
            return {"event": "close", "code": event.code, "reason": event.reason}
        if isinstance(event, ChannelOpened):
            return {"event": "channel_opened", "channel": event.channel}
        if isinstance(event, ChannelCloseReceived):
            return {"event": "channel_close", "channel": event.channel}
        if isinstance(event, ChannelResetReceived):
            return {
                "event": "channel_reset",
                "channel": event.channel,
                "code": event.code,
                "reason": event.reason,
            }
        raise TypeError(f"unexpected event {event!r}")  # pragma: no cover

    def _message(
        self, side: str, event: MessageReceived | ChannelMessageReceived
    ) -> dict[str, Json]:
        """A spack delivered: the next one the other side sent on that channel."""
        channel = event.channel if isinstance(event, ChannelMessageReceived) else 0
        if isinstance(event, ChannelMessageReceived) != self.channels:
            raise AssertionError(f"{event!r} on a session where channels={self.channels}")
        got = [i for i in self.delivered[side] if self.spacks[i].get("channel", 0) == channel]
        sent = [i for i in self.sent[_other(side)] if self.spacks[i].get("channel", 0) == channel]
        index = sent[len(got)]
        self.delivered[side].append(index)
        spack = self.spacks[index]
        if [value_to_json(value) for value in event.spack] != spack["values"]:
            raise AssertionError(f"spack {index} arrived changed")
        if event.spack.encode().hex() != spack["encoded_hex"]:
            raise AssertionError(f"spack {index} re-encodes differently")
        if isinstance(event, ChannelMessageReceived):
            if event.size != spack["encoded_length"]:
                raise AssertionError(f"spack {index} arrived with size {event.size}")
            return {"event": "message", "channel": channel, "spack": index}
        return {"event": "message", "spack": index}


def _same(a: object, b: object) -> bool:
    """Type-exact equality: floats by bits (NaN, -0.0), arrays by typecode and bytes."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, array) and isinstance(b, array):
        return a.typecode == b.typecode and a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return _same(list(a), list(b)) and _same(list(a.values()), list(b.values()))
    return a == b


# --------------------------------------------------------------------------- observing


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


class Observer:
    """Decodes recorded steps independently of the sessions (see the module docstring)."""

    def __init__(
        self,
        pattern: Pattern,
        keys: dict[str, dict[str, bytes]],
        responder_public: PublicIdentity,
        spacks: list[dict[str, Json]],
        sent: dict[str, list[int]],
        *,
        channels: bool,
    ) -> None:
        """Prepare to decode a session run with ``keys``; ``sent`` lists each side's spacks.

        :param channels: the session has channels (records name theirs).
        """
        self.pattern: Pattern = pattern
        self.channels = channels
        self._keys = keys
        self._responder_public = responder_public
        self._spacks = spacks
        #: Each side's spacks still to be carried, by channel, in order.
        self._queue: dict[tuple[str, int], list[int]] = {}
        for side, indices in sent.items():
            for index in indices:
                channel = spacks[index].get("channel", 0)
                self._queue.setdefault((side, channel), []).append(index)
        self._piece_offset: dict[tuple[str, int], int] = {}
        self._opened = {INITIATOR: False, RESPONDER: False}
        self._handshake = {
            side: list(messages) for side, messages in _HANDSHAKE_MESSAGES[pattern].items()
        }
        self._noise: dict[str, NoiseHandshake] = {}
        #: For each sender, the cipher that decrypts what it sends.
        self._ciphers: dict[str, TransportCipher] = {}
        self._epoch = {INITIATOR: 0, RESPONDER: 0}
        self.prologue = b""
        #: Each side's handshake payloads, in order.
        self.payloads: dict[str, list[bytes]] = {INITIATOR: [], RESPONDER: []}

    @property
    def handshake_hash(self) -> bytes:
        """Noise ``h``, the same for both ends."""
        hashes = {self._noise[side].handshake_hash for side in (INITIATOR, RESPONDER)}
        if len(hashes) != 1:
            raise AssertionError("the two ends' handshake hashes differ")
        return hashes.pop()

    def parts(self, side: str, data: bytes) -> list[dict[str, Json]]:
        """Split one step's bytes into annotated parts (preamble, verdict, frames)."""
        parts: list[dict[str, Json]] = []
        pos = 0
        if not self._opened[side]:
            self._opened[side] = True
            size = 8 if side == INITIATOR else 1
            head = data[:size]
            if side == INITIATOR:
                self.prologue = head
                self._start_noise()
            elif head != b"\x00":
                raise AssertionError("the responder's verdict is not 00")
            parts.append(
                {
                    "part": "preamble" if side == INITIATOR else "verdict",
                    "offset": 0,
                    "hex": head.hex(),
                }
            )
            pos = size
        while pos < len(data):
            (length,) = struct.unpack_from(">H", data, pos)
            body = data[pos + 2 : pos + 2 + length]
            if len(body) != length:
                raise AssertionError("a step ends inside a frame")
            handshake = bool(self._handshake[side])
            part: dict[str, Json] = {"part": "handshake" if handshake else "transport"}
            part.update(offset=pos, frame_length=length)
            if handshake:
                part.update(self._handshake_part(side, body))
            else:
                part.update(self._transport_part(side, body))
            parts.append(part)
            pos += 2 + length
        return parts

    def _start_noise(self) -> None:
        name = PROTOCOL_NAMES[self.pattern]
        for side in (INITIATOR, RESPONDER):
            pinned = (
                self._responder_public.raw if side == INITIATOR and self.pattern == "IK" else None
            )
            self._noise[side] = NoiseHandshake(
                name,
                initiator=side == INITIATOR,
                prologue=self.prologue,
                static_private=self._keys[side]["static"],
                remote_static_public=pinned,
                ephemeral_private=self._keys[side]["ephemeral"],
            )

    def _handshake_part(self, side: str, body: bytes) -> dict[str, Json]:
        message = self._handshake[side].pop(0)
        payload = self._noise[_other(side)].read_message(body)
        if self._noise[side].write_message(payload) != body:
            raise AssertionError(f"{message} is not reproducible from the recorded keys")
        self.payloads[side].append(payload)
        if self._noise[side].complete and self._noise[_other(side)].complete:
            for sender in (INITIATOR, RESPONDER):
                # What the sender sends is decrypted with the other end's receive cipher.
                self._ciphers[sender] = self._noise[_other(sender)].split()[1]
        return {
            "message": message,
            "tokens": _TOKENS[self.pattern][message],
            "payload_hex": payload.hex(),
            "payload": _payload_json(msgpack.unpackb(payload)),
        }

    def _transport_part(self, side: str, body: bytes) -> dict[str, Json]:
        cipher = self._ciphers[side]
        nonce = cipher.nonce
        epoch = self._epoch[side]
        plaintext = cipher.decrypt(body)
        records = self._records(side, plaintext)
        if records[-1]["kind"] == "REKEY":
            cipher.rekey()
            self._epoch[side] += 1
        return {
            "nonce": nonce,
            "key_epoch": epoch,
            "plaintext_length": len(plaintext),
            "records": records,
        }

    def _records(self, side: str, plaintext: bytes) -> list[dict[str, Json]]:
        records: list[dict[str, Json]] = []
        pos = 0
        while pos < len(plaintext):
            start = pos
            kind = RecordKind(plaintext[pos])
            channel, pos = _uvarint(plaintext, pos + 1)
            length, pos = _uvarint(plaintext, pos)
            body = plaintext[pos : pos + length]
            pos += length
            if (channel and not self.channels) or len(body) != length:
                raise AssertionError("malformed record")
            record: dict[str, Json] = {"kind": kind.name}
            if self.channels:
                record["channel"] = channel
            record.update(header_hex=plaintext[start : pos - length].hex(), length=length)
            if kind in (RecordKind.MESSAGE, RecordKind.FRAGMENT):
                record.update(self._piece(side, kind, channel, body))
            elif kind in (RecordKind.CLOSE, RecordKind.RESET):
                record["body_hex"] = body.hex()
                record["code"] = struct.unpack(">H", body[:2])[0]
                record["reason"] = body[2:].decode("utf-8")
            elif kind in (RecordKind.PING, RecordKind.PONG):
                record["body_hex"] = body.hex()
            elif kind in (RecordKind.WINDOW, RecordKind.CONNECTION_WINDOW):
                increment, end = _uvarint(body, 0)
                if end != len(body):
                    raise AssertionError("malformed window increment")
                record["increment"] = increment
            records.append(record)
        return records

    def _piece(self, side: str, kind: RecordKind, channel: int, body: bytes) -> dict[str, Json]:
        key = (side, channel)
        index = self._queue[key][0]
        offset = self._piece_offset.get(key, 0)
        encoded = bytes.fromhex(self._spacks[index]["encoded_hex"])
        if encoded[offset : offset + len(body)] != body:
            raise AssertionError(f"a record does not carry the next piece of spack {index}")
        if kind is RecordKind.MESSAGE:
            if offset + len(body) != len(encoded):
                raise AssertionError(f"spack {index} ends early")
            self._queue[key].pop(0)
            self._piece_offset[key] = 0
        else:
            self._piece_offset[key] = offset + len(body)
        return {"spack": index, "spack_offset": offset}

    def finish(self) -> None:
        """Check that every spack was carried whole."""
        if any(self._queue.values()):
            raise AssertionError(f"spacks never carried: {self._queue}")


def _payload_json(decoded: dict[str, Json]) -> dict[str, Json]:
    """A decoded handshake payload as JSON: a ``bin`` value as hex, its key + ``_hex``."""
    return {
        f"{key}_hex" if isinstance(value, bytes) else key: (
            value.hex() if isinstance(value, bytes) else value
        )
        for key, value in decoded.items()
    }


def _describe_record(record: dict[str, Json]) -> str:
    kind: str = record["kind"]
    channel = record.get("channel", 0)
    on = f" on channel {channel}" if channel else ""
    if kind == "MESSAGE" and record["spack_offset"] == 0:
        return f"MESSAGE(spack {record['spack']}{on})"
    if kind in ("MESSAGE", "FRAGMENT"):
        start = record["spack_offset"]
        piece = f"spack {record['spack']} bytes {start}..{start + record['length']}"
        return f"{kind}({piece}{on})"
    if kind == "CLOSE" and channel:
        return f"CLOSE(channel {channel})"
    if kind in ("CLOSE", "RESET"):
        where = f"channel {channel}, " if kind == "RESET" else ""
        return f"{kind}({where}{record['code']}, {record['reason']!r})"
    if kind == "WINDOW":
        return f"WINDOW(channel {channel}, +{record['increment']})"
    if kind == "CONNECTION_WINDOW":
        return f"CONNECTION_WINDOW(+{record['increment']})"
    if kind in ("PING", "PONG"):
        return f"{kind}({record['length']} bytes)"
    return kind


def _describe(parts: list[dict[str, Json]]) -> str:
    out: list[str] = []
    for part in parts:
        if part["part"] in ("preamble", "verdict"):
            out.append(f"{part['part']} {part['hex']}")
        elif part["part"] == "handshake":
            out.append(f"{part['message']} ({part['tokens']})")
        else:
            records = ", ".join(map(_describe_record, part["records"]))
            out.append(f"[n={part['nonce']}] {records}")
    return " + ".join(out)


# --------------------------------------------------------------------------- transcript


def _config_json(config: SessionConfig) -> dict[str, Json]:
    result: dict[str, Json] = {
        "max_message_size": config.max_message_size,
        "rekey_after_messages": config.rekey_after_messages,
        "rekey_after_bytes": config.rekey_after_bytes,
    }
    if config.channels is not None:
        result["channels"] = _channels_json(config.channels)
    return result


def _channels_json(channels: ChannelParams) -> dict[str, Json]:
    return {
        "max_channels": channels.max_channels,
        "channel_window": channels.channel_window,
        "connection_window": channels.connection_window,
    }


def _party(
    side: str,
    pattern: Pattern,
    keys: dict[str, bytes],
    config: SessionConfig,
    payloads: list[bytes],
    *,
    certificate: Certificate | None,
) -> dict[str, Json]:
    params = payloads[-1]  # a side's parameters travel in its last handshake message
    decoded = msgpack.unpackb(params)
    expected: dict[str, Json] = {
        "version": PROTOCOL_VERSION,
        "max_message_size": config.max_message_size,
    }
    if config.channels is not None:
        expected.update(_channels_json(config.channels))
    if certificate is not None:
        expected["certificate"] = certificate.encoded
    if decoded != expected or list(decoded) != list(expected):
        raise AssertionError(f"the {side} advertised {decoded!r}")
    party: dict[str, Json] = {
        "static_private_hex": keys["static"].hex(),
        "static_public_hex": Identity.from_private_bytes(keys["static"]).public.raw.hex(),
        "ephemeral_private_hex": keys["ephemeral"].hex(),
        "ephemeral_public_hex": Identity.from_private_bytes(keys["ephemeral"]).public.raw.hex(),
        "pins_responder_key": side == INITIATOR and pattern == "IK",
        "config": _config_json(config),
        "params_payload_hex": params.hex(),
        "advertised_params": _payload_json(decoded),
    }
    if certificate is not None:
        party["certificate"] = _certificate_json(side, certificate)
    return party


def _certificate_json(side: str, certificate: Certificate) -> dict[str, Json]:
    """A side's certificate and what that side requires of its peer's."""
    spec = CERTIFICATES[side]
    return {
        "serial": certificate.serial,
        "subject_hex": certificate.subject.raw.hex(),
        "name": certificate.name,
        "groups": list(certificate.groups),
        "not_before": certificate.not_before,
        "not_after": certificate.not_after,
        "issuer_hex": certificate.issuer.hex(),
        "extensions": [],
        "signature_hex": certificate.signature.hex(),
        "encoded_length": len(certificate.encoded),
        "encoded_hex": certificate.encoded.hex(),
        "printable": certificate.to_string(),
        "requires_names": None if spec.requires_names is None else list(spec.requires_names),
        "requires_groups": None if spec.requires_groups is None else list(spec.requires_groups),
    }


def _authority_json() -> dict[str, Json]:
    """The fixed authority, the verification time and the clock skew of both sides."""
    public = authority().public
    return {
        "authority_seed_hex": fixed_key(AUTHORITY_LABEL).hex(),
        "authority_public_hex": public.raw.hex(),
        "authority_printable": str(public),
        "issuer_hex": public.digest.hex(),
        "verification_time": VERIFICATION_TIME,
        "clock_skew": CLOCK_SKEW,
    }


def _sessions(setup: Setup, keys: dict[str, dict[str, bytes]]) -> dict[str, Session]:
    responder_identity = Identity.from_private_bytes(keys[RESPONDER]["static"])
    return {
        INITIATOR: Session(
            Role.INITIATOR,
            Identity.from_private_bytes(keys[INITIATOR]["static"]),
            peer=responder_identity.public if setup.pattern == "IK" else None,
            config=setup.initiator,
            ephemeral_for_testing_only=keys[INITIATOR]["ephemeral"],
            certificate=issue(INITIATOR) if setup.certified else None,
            certificate_policy=policy(INITIATOR) if setup.certified else None,
        ),
        RESPONDER: Session(
            Role.RESPONDER,
            responder_identity,
            config=setup.responder,
            ephemeral_for_testing_only=keys[RESPONDER]["ephemeral"],
            certificate=issue(RESPONDER) if setup.certified else None,
            certificate_policy=policy(RESPONDER) if setup.certified else None,
        ),
    }


def build_transcript(name: str) -> dict[str, Json]:
    """Run one whole session and return its transcript (the JSON document, as a dict).

    :param name: a key of :data:`FILES` (and :data:`SETUPS`).
    """
    setup = SETUPS[name]
    pattern = setup.pattern
    keys = _keys(name)
    sessions = _sessions(setup, keys)
    channels = setup.initiator.channels is not None and setup.responder.channels is not None
    recorder = Recorder(sessions, channels=channels)
    recorder.start()
    for action in setup.script():
        recorder.run(action)
    for side, session in sessions.items():
        if session.data_to_send() or session.close_received is None:
            raise AssertionError(f"the {side} did not end cleanly")
        if session.channels != channels:
            raise AssertionError(f"the {side} has channels={session.channels}")
        verified = session.peer_certificate
        peer = issue(_other(side)) if setup.certified else None
        if (verified is None) != (peer is None) or (verified and peer and verified != peer):
            raise AssertionError(f"the {side} did not verify its peer's certificate")

    observer = Observer(
        pattern,
        keys,
        sessions[RESPONDER].identity.public,
        recorder.spacks,
        recorder.sent,
        channels=channels,
    )
    for step in recorder.steps:
        step["parts"] = observer.parts(step["from"], bytes.fromhex(step["bytes"]))
        summary = _describe(step["parts"]) or "nothing"
        step["note"] = f"{step['note']}: {summary}" if step["note"] else summary
    observer.finish()
    handshake_hash = observer.handshake_hash
    if set(recorder.handshake_hashes) != {handshake_hash}:
        raise AssertionError("the sessions' handshake hash is not the observer's")

    transcript: dict[str, Json] = {
        "format": FORMAT,
        "description": (
            f"{setup.description} between two stalk Sessions wired back to back, "
            "with fixed keys: every write of each side from the first preamble byte to the "
            "last CLOSE. Made by vectors/generate.py; vectors/README.md documents the format."
        ),
        "protocol_version": PROTOCOL_VERSION,
        "pattern": pattern,
        "protocol_name": PROTOCOL_NAMES[pattern],
        "prologue_hex": observer.prologue.hex(),
        "handshake_hash_hex": handshake_hash.hex(),
    }
    if channels:
        transcript["channels"] = True
    if setup.certified:
        transcript["certificates"] = _authority_json()
    configs = {INITIATOR: setup.initiator, RESPONDER: setup.responder}
    for side in (INITIATOR, RESPONDER):
        certificate = issue(side) if setup.certified else None
        transcript[side] = _party(
            side,
            pattern,
            keys[side],
            configs[side],
            observer.payloads[side],
            certificate=certificate,
        )
    transcript["spacks"] = recorder.spacks
    transcript["steps"] = [_ordered(step) for step in recorder.steps]
    return transcript


def _ordered(step: dict[str, Json]) -> dict[str, Json]:
    """A step's fields in reading order (the raw bytes last: they can be long)."""
    order = ("step", "from", "cause", "note", "events", "parts", "bytes")
    return {key: step[key] for key in order}


def render(transcript: dict[str, Json]) -> str:
    """The exact text of a transcript file (2-space indented, ASCII-only JSON)."""
    return json.dumps(transcript, indent=2, ensure_ascii=True, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- command line


def outline(transcript: dict[str, Json]) -> str:
    """One line per step: index, writer, size, note."""
    lines = [f"{transcript['protocol_name']}: {len(transcript['steps'])} steps"]
    for step in transcript["steps"]:
        size = len(step["bytes"]) // 2
        lines.append(f"{step['step']:3d} {step['from']:<9} {size:6d} B  {step['note']}")
    return "\n".join(lines)


def _first_difference(old: str, new: str) -> str:
    for number, (a, b) in enumerate(zip(old.splitlines(), new.splitlines(), strict=False), 1):
        if a != b:
            return f"line {number}: committed {a[:80]!r}, generated {b[:80]!r}"
    return f"committed {len(old)} characters, generated {len(new)}"


def main(argv: Sequence[str] | None = None, *, out: Callable[[str], None] = print) -> int:
    """Write, check or outline the transcripts; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="compare instead of writing")
    mode.add_argument("--outline", action="store_true", help="print each transcript's steps")
    parser.add_argument("--dir", type=Path, default=HERE, help="where the JSON files are")
    args = parser.parse_args(argv)
    status = 0
    for key, name in FILES.items():
        transcript = build_transcript(key)
        text = render(transcript)
        path: Path = args.dir / name
        if args.outline:
            out(outline(transcript))
        elif args.check:
            old = path.read_text(encoding="ascii") if path.exists() else None
            if old == text:
                out(f"{path}: up to date")
            else:
                status = 1
                why = "missing" if old is None else _first_difference(old, text)
                out(f"{path}: DIFFERS ({why}); run python vectors/generate.py")
        else:
            path.write_text(text, encoding="ascii")
            out(f"{path}: {len(text)} bytes, {len(transcript['steps'])} steps")
    return status


if __name__ == "__main__":
    sys.exit(main())
