"""stalk against its own test vectors: ``vectors/stalk-{xx,ik,channels}.json``.

- The committed files are exactly what ``vectors/generate.py`` produces now (the generator
  is imported by path), and its ``--check`` mode notices a stale or missing file.
- An independent replay: Sessions built only from what a file records (keys, ephemerals,
  configs) are driven through the recorded steps with this module's own driver and its own
  JSON-to-value decoding; every write must match byte for byte, every event too, and every
  delivered spack must equal the recorded value type-exactly.
- Tampering: one flipped byte in a recorded message makes the receiving Session raise a
  stalk error and deliver nothing from that message; and the replay rejects a transcript
  whose recorded bytes or events were altered (the checks can fail).
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import subprocess
import sys
from array import array
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest

from helpers import drain, take_all
from stalk.certificates import (
    Authorities,
    Authority,
    Certificate,
    CertificatePolicy,
    PublicAuthority,
)
from stalk.errors import (
    CertificateExpired,
    CertificateNotYetValid,
    DecryptionFailed,
    HandshakeFailed,
)
from stalk.events import (
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
from stalk.session import Role, Session, SessionConfig, SessionState
from stalk.spack import Float32, Spack, SpackValue
from stalk.wire import CloseCode

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "vectors"
FILES = {
    "XX": "stalk-xx.json",
    "IK": "stalk-ik.json",
    "channels": "stalk-channels.json",
    "certificates-xx": "stalk-certificates-xx.json",
    "certificates-ik": "stalk-certificates-ik.json",
}
NAMES = list(FILES)
#: The transcripts in which both sides present and require certificates.
CERTIFIED = ["certificates-xx", "certificates-ik"]
#: The transcripts of the same script without channels, one per Noise pattern.
PATTERNS = ["XX", "IK"]
INITIATOR, RESPONDER = "initiator", "responder"

#: This module's own table (vectors/README.md, "Spack values"): element -> (typecode, size).
ELEMENTS = {
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

Transcript = dict[str, Any]


@cache
def _load(name: str) -> str:
    return (VECTORS / FILES[name]).read_text(encoding="ascii")


def load(name: str) -> Transcript:
    """A fresh copy of a committed transcript (tests may alter it)."""
    result: Transcript = json.loads(_load(name))
    return result


@pytest.fixture(scope="module")
def generator() -> Iterator[ModuleType]:
    """``vectors/generate.py``, imported by path."""
    spec = importlib.util.spec_from_file_location("stalk_vectors_generate", VECTORS / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def other(side: str) -> str:
    return RESPONDER if side == INITIATOR else INITIATOR


# --------------------------------------------------------------------------- values


def value_from_json(node: dict[str, Any]) -> SpackValue:
    """Decode one typed JSON value as vectors/README.md describes it."""
    kind = node["type"]
    if kind == "nil":
        assert set(node) == {"type"}
        return None
    if kind == "bool":
        assert type(node["value"]) is bool
        return bool(node["value"])
    if kind == "int":
        text = node["value"]
        assert isinstance(text, str)
        assert str(int(text)) == text  # canonical decimal
        return int(text)
    if kind == "float64":
        raw = bytes.fromhex(node["hex"])
        assert len(raw) == 8
        return float(struct.unpack(">d", raw)[0])
    if kind == "float32":
        raw = bytes.fromhex(node["hex"])
        assert len(raw) == 4
        return Float32(struct.unpack(">f", raw)[0])
    if kind == "str":
        assert isinstance(node["value"], str)
        return str(node["value"])
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
            assert isinstance(key, (str, bytes))
            assert key not in result
            result[key] = value_from_json(entry["value"])
        return result
    if kind == "array":
        typecode, size = ELEMENTS[node["element"]]
        assert array(typecode).itemsize == size
        raw = bytes.fromhex(node["hex"])
        assert len(raw) % size == 0
        values = array(typecode, raw)
        if sys.byteorder == "big":
            values.byteswap()
        return values
    raise AssertionError(f"unknown value type {kind!r}")


def spack_values(transcript: Transcript, index: int) -> list[SpackValue]:
    return [value_from_json(node) for node in transcript["spacks"][index]["values"]]


def same(a: object, b: object) -> bool:
    """Type-exact equality: floats by their bits, arrays by typecode and contents."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, array) and isinstance(b, array):
        return a.typecode == b.typecode and a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return same(list(a), list(b)) and same(list(a.values()), list(b.values()))
    return a == b


def test_same_is_type_exact() -> None:
    assert same([math.nan, -0.0], [math.nan, -0.0])
    assert not same(0.0, -0.0)
    assert not same(Float32(1.5), 1.5)
    assert not same(True, 1)
    assert not same([1], (1,))
    assert not same(array("d", [1.0]), array("f", [1.0]))
    assert not same({"a": 1, "b": 2}, {"b": 2, "a": 1})  # map order is wire order
    assert not same({"a": 1}, {b"a": 1})


# --------------------------------------------------------------------------- (a) generator


@pytest.mark.parametrize("name", NAMES)
def test_committed_transcript_is_what_the_generator_writes(
    generator: ModuleType, name: str
) -> None:
    assert generator.FILES == FILES
    text = generator.render(generator.build_transcript(name))
    committed = _load(name)
    if text != committed:
        line = next(
            (
                n
                for n, (a, b) in enumerate(
                    zip(committed.splitlines(), text.splitlines(), strict=False), 1
                )
                if a != b
            ),
            None,
        )
        pytest.fail(
            f"vectors/{FILES[name]} differs from the generator's output (first at line {line}):"
            " if the change is intended, run python vectors/generate.py"
        )


def test_generator_script_check_mode_passes() -> None:
    result = subprocess.run(
        [sys.executable, str(VECTORS / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("up to date") == len(FILES)


def test_generator_check_mode_fails_on_any_difference(
    generator: ModuleType, tmp_path: Path
) -> None:
    (tmp_path / FILES["XX"]).write_text(_load("XX").replace('"note": "msg3', '"note": "msg 3', 1))
    # stalk-ik.json is missing altogether; the others are up to date
    for name in NAMES[2:]:
        (tmp_path / FILES[name]).write_text(_load(name))
    lines: list[str] = []
    status = generator.main(["--check", "--dir", str(tmp_path)], out=lines.append)
    assert status == 1
    assert len(lines) == len(FILES)
    assert ["DIFFERS" in line for line in lines] == [True, True] + [False] * (len(FILES) - 2)
    assert "missing" in lines[1]
    assert all("up to date" in line for line in lines[2:])
    assert (tmp_path / FILES["XX"]).read_text() != _load("XX")  # --check wrote nothing
    assert not (tmp_path / FILES["IK"]).exists()


# --------------------------------------------------------------------------- (b) replay


def session_config(config: dict[str, Any]) -> SessionConfig:
    """A party's recorded ``config`` as a SessionConfig."""
    fields = dict(config)
    channels = fields.pop("channels", None)
    return SessionConfig(**fields, channels=None if channels is None else ChannelParams(**channels))


def certificate_of(transcript: Transcript, side: str) -> Certificate | None:
    """``side``'s recorded certificate, decoded (``None`` in a transcript without)."""
    recorded = transcript[side].get("certificate")
    if recorded is None:
        return None
    return Certificate.from_bytes(bytes.fromhex(recorded["encoded_hex"]))


def policy_of(transcript: Transcript, side: str, now: float | None) -> CertificatePolicy | None:
    """What ``side`` requires of its peer's certificate, as recorded, checked at ``now``.

    :param now: the verification time (``None``: the recorded one).
    """
    recorded = transcript[side].get("certificate")
    if recorded is None:
        return None
    trust = transcript["certificates"]
    when = float(trust["verification_time"] if now is None else now)
    names, groups = recorded["requires_names"], recorded["requires_groups"]
    return CertificatePolicy(
        Authorities([PublicAuthority(bytes.fromhex(trust["authority_public_hex"]))]),
        lambda: when,
        clock_skew=trust["clock_skew"],
        names=None if names is None else frozenset(names),
        groups=None if groups is None else frozenset(groups),
    )


def build_sessions(transcript: Transcript, *, now: float | None = None) -> dict[str, Session]:
    """Both Sessions, from the keys and configurations the transcript records.

    :param now: with certificates, verify them at this time instead of the recorded one.
    """
    identities: dict[str, Identity] = {}
    for side in (INITIATOR, RESPONDER):
        party = transcript[side]
        identity = Identity.from_private_bytes(bytes.fromhex(party["static_private_hex"]))
        assert identity.public.raw.hex() == party["static_public_hex"]
        ephemeral = Identity.from_private_bytes(bytes.fromhex(party["ephemeral_private_hex"]))
        assert ephemeral.public.raw.hex() == party["ephemeral_public_hex"]
        identities[side] = identity
    pinned = PublicIdentity(bytes.fromhex(transcript[RESPONDER]["static_public_hex"]))
    return {
        INITIATOR: Session(
            Role.INITIATOR,
            identities[INITIATOR],
            peer=pinned if transcript[INITIATOR]["pins_responder_key"] else None,
            config=session_config(transcript[INITIATOR]["config"]),
            ephemeral_for_testing_only=bytes.fromhex(
                transcript[INITIATOR]["ephemeral_private_hex"]
            ),
            certificate=certificate_of(transcript, INITIATOR),
            certificate_policy=policy_of(transcript, INITIATOR, now),
        ),
        RESPONDER: Session(
            Role.RESPONDER,
            identities[RESPONDER],
            config=session_config(transcript[RESPONDER]["config"]),
            ephemeral_for_testing_only=bytes.fromhex(
                transcript[RESPONDER]["ephemeral_private_hex"]
            ),
            certificate=certificate_of(transcript, RESPONDER),
            certificate_policy=policy_of(transcript, RESPONDER, now),
        ),
    }


def queue(transcript: Transcript, session: Session, indices: list[int]) -> None:
    """Queue the recorded spacks, each on its channel (0 without channels)."""
    for index in indices:
        channel = transcript["spacks"][index].get("channel", 0)
        session.queue(Spack(*spack_values(transcript, index)), channel)


def perform(transcript: Transcript, session: Session, cause: dict[str, Any], index: int) -> None:
    """Make the API call that a step records as its cause (nothing for a reaction)."""
    call = cause.get("call")
    if call is None:
        assert cause == {"received": index - 1}, f"step {index}: bad cause {cause}"
    elif call == "create":
        assert index == 0
        assert session.role is Role.INITIATOR
    elif call == "accept":
        session.accept()
    elif call == "send":
        assert len(cause["spacks"]) == 1
        queue(transcript, session, cause["spacks"])
        session.flush()
    elif call == "queue+flush":
        queue(transcript, session, cause["spacks"])
        session.flush()
    elif call == "queue":
        queue(transcript, session, cause["spacks"])
    elif call == "ping":
        session.ping(bytes.fromhex(cause["payload_hex"]))
    elif call == "close":
        session.close(cause["code"], cause["reason"])
    elif call == "open_channel":
        assert session.open_channel() == cause["channel"]
    elif call == "close_channel":
        session.close_channel(cause["channel"])
    elif call == "reset_channel":
        session.reset_channel(cause["channel"], cause["code"], cause["reason"])
    elif call == "release":
        spack = transcript["spacks"][cause["spack"]]
        assert spack["channel"] == cause["channel"]
        session.release(cause["channel"], spack["encoded_length"])
    elif call == "release_channel":
        session.release_channel(cause["channel"])
    else:
        raise AssertionError(f"step {index}: unknown call {call!r}")


def check_event(
    transcript: Transcript, side: str, event: Event, want: dict[str, Any], where: str
) -> None:
    assert want["side"] == side, f"{where}: event from the wrong side"
    kind = want["event"]
    where = f"{where}: {kind} event"
    channels = transcript.get("channels", False)
    if kind in ("peer_identified", "handshake_complete"):
        assert isinstance(event, (PeerIdentified, HandshakeComplete)), where
        assert event.pattern == want["pattern"] == transcript["pattern"], where
        assert event.peer.raw.hex() == want["peer_static_public_hex"], where
        peer = transcript[other(side)]
        assert want["peer_static_public_hex"] == peer["static_public_hex"], where
    if kind == "peer_identified":
        assert isinstance(event, PeerIdentified), where
    elif kind == "handshake_complete":
        assert isinstance(event, HandshakeComplete), where
        assert event.handshake_hash.hex() == want["handshake_hash_hex"], where
        assert want["handshake_hash_hex"] == transcript["handshake_hash_hex"], where
        assert event.peer_max_message_size == want["peer_max_message_size"], where
        advertised = transcript[other(side)]["advertised_params"]["max_message_size"]
        assert want["peer_max_message_size"] == advertised, where
    elif kind == "message":
        spack = transcript["spacks"][want["spack"]]
        if channels:
            assert isinstance(event, ChannelMessageReceived), where
            assert event.channel == want["channel"] == spack["channel"], where
            assert event.size == spack["encoded_length"], where
        else:
            assert isinstance(event, MessageReceived), where
            assert "channel" not in want, where
        assert spack["from"] == other(side), where
        assert same(list(event.spack), spack_values(transcript, want["spack"])), where
        assert event.spack.encode().hex() == spack["encoded_hex"], where
    elif kind == "pong":
        assert isinstance(event, PongReceived), where
        assert event.payload.hex() == want["payload_hex"], where
    elif kind == "close":
        assert isinstance(event, CloseReceived), where
        assert (event.code, event.reason) == (want["code"], want["reason"]), where
    elif kind == "channel_opened":
        assert event == ChannelOpened(want["channel"]), where
    elif kind == "channel_close":
        assert event == ChannelCloseReceived(want["channel"]), where
    elif kind == "channel_reset":
        assert event == ChannelResetReceived(want["channel"], want["code"], want["reason"]), where
    else:
        raise AssertionError(f"{where}: unknown event {kind!r}")


def by_channel(transcript: Transcript, indices: list[int]) -> dict[int, list[int]]:
    """Spack indices grouped by the channel they went on (all on 0 without channels)."""
    grouped: dict[int, list[int]] = {}
    for index in indices:
        grouped.setdefault(transcript["spacks"][index].get("channel", 0), []).append(index)
    return grouped


def replay(transcript: Transcript, *, stop_before: int | None = None) -> dict[str, Session]:
    """Drive fresh Sessions through the recorded steps, checking every write and event.

    :param stop_before: stop before this step (its cause is not performed).
    """
    sessions = build_sessions(transcript)
    steps = transcript["steps"]
    delivered: dict[str, list[int]] = {INITIATOR: [], RESPONDER: []}
    for index, step in enumerate(steps[:stop_before]):
        where = f"step {index} ({step['note'][:60]})"
        assert step["step"] == index
        side = step["from"]
        actor, receiver = sessions[side], sessions[other(side)]
        perform(transcript, actor, step["cause"], index)
        data = take_all(actor)
        assert data.hex() == step["bytes"], f"{where}: the {side} wrote different bytes"
        # The transcripts never make a session pause owing output (may_owe=False).
        accepted = step["cause"].get("call") == "accept"
        events = [(side, e) for e in drain(actor, may_owe=False)] if accepted else []
        if data:
            receiver.receive_data(data)
            events += [(other(side), e) for e in drain(receiver, may_owe=False)]
        assert len(events) == len(step["events"]), f"{where}: events {events}"
        for (event_side, event), want in zip(events, step["events"], strict=True):
            check_event(transcript, event_side, event, want, where)
            if want["event"] == "message":
                delivered[event_side].append(want["spack"])
        following = steps[index + 1] if index + 1 < len(steps) else None
        if following is None or following["cause"] != {"received": index}:
            assert take_all(receiver) == b"", f"{where}: an unrecorded write"
    if stop_before is None:
        for side, session in sessions.items():
            assert take_all(session) == b""
            assert session.close_sent
            assert session.close_received is not None
            assert session.handshake_hash is not None
            assert session.handshake_hash.hex() == transcript["handshake_hash_hex"]
            assert session.channels == transcript.get("channels", False)
            expected = certificate_of(transcript, other(side))
            verified = session.peer_certificate
            assert verified == expected  # the peer's, verified (None without certificates)
            sent = [s["index"] for s in transcript["spacks"] if s["from"] == other(side)]
            got = by_channel(transcript, delivered[side])
            assert got == by_channel(transcript, sent), f"the {side} got spacks {got}"
    return sessions


@pytest.mark.parametrize("name", NAMES)
def test_replay_reproduces_every_write_and_every_spack(name: str) -> None:
    transcript = load(name)
    pattern = transcript["pattern"]
    assert transcript["format"] == "stalk-transcript/1"
    assert transcript["protocol_name"] == f"Noise_{pattern}_25519_AESGCM_SHA256"
    assert transcript["steps"][0]["bytes"].startswith(transcript["prologue_hex"])
    assert bytes.fromhex(transcript["prologue_hex"]) == b"STALK\x01" + pattern.encode()
    replay(transcript)


@pytest.mark.parametrize("name", NAMES)
def test_every_recorded_spack_encoding(name: str) -> None:
    transcript = load(name)
    for spack in transcript["spacks"]:
        values = spack_values(transcript, spack["index"])
        encoded = Spack(*values).encode()
        assert encoded.hex() == spack["encoded_hex"], f"spack {spack['index']}"
        assert len(encoded) == spack["encoded_length"]
        assert same(list(Spack.decode(encoded)), values), f"spack {spack['index']}"


# --------------------------------------------------------------------------- coverage


def transport_parts(transcript: Transcript) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for step in transcript["steps"]:
        for part in step["parts"]:
            if part["part"] == "transport":
                yield step, part


def value_types(node: dict[str, Any], found: set[str]) -> None:
    kind = node["type"]
    found.add(kind)
    if kind == "array":
        found.add(f"array {node['element']}")
    elif kind == "str" and not node["value"].isascii():
        found.add("non-ASCII str")
    elif kind in ("list", "tuple"):
        for item in node["items"]:
            value_types(item, found)
    elif kind == "map":
        for entry in node["entries"]:
            found.add(f"{entry['key']['type']} key")
            value_types(entry["key"], found)
            value_types(entry["value"], found)


@pytest.mark.parametrize("name", NAMES)
def test_parts_tile_each_step(name: str) -> None:
    for step in load(name)["steps"]:
        data = bytes.fromhex(step["bytes"])
        pos = 0
        for part in step["parts"]:
            assert part["offset"] == pos
            if part["part"] in ("preamble", "verdict"):
                assert data[pos:].startswith(bytes.fromhex(part["hex"]))
                pos += len(part["hex"]) // 2
            else:
                assert data[pos : pos + 2] == struct.pack(">H", part["frame_length"])
                pos += 2 + part["frame_length"]
        assert pos == len(data)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_transcript_has_the_required_content(pattern: str) -> None:
    transcript = load(pattern)
    steps = transcript["steps"]
    found: set[str] = set()
    for node in transcript["spacks"][0]["values"]:
        value_types(node, found)
    wanted = {"nil", "bool", "int", "float64", "float32", "str", "non-ASCII str", "bytes"}
    wanted |= {"list", "tuple", "map", "str key", "bytes key", "array"}
    wanted |= {f"array {element}" for element in ELEMENTS}
    assert wanted <= found

    parts = list(transport_parts(transcript))
    kinds = [[r["kind"] for r in part["records"]] for _, part in parts]
    # A batch: several spacks in one Noise message, from one queue()+flush().
    assert any(
        step["cause"].get("call") == "queue+flush" and kind.count("MESSAGE") >= 3
        for (step, _), kind in zip(parts, kinds, strict=True)
    )
    # A spack spread over 3 transport messages: FRAGMENT, FRAGMENT, then its MESSAGE.
    pieces: dict[int, list[tuple[int, str]]] = {}
    for _, part in parts:
        for record in part["records"]:
            if record["kind"] in ("MESSAGE", "FRAGMENT"):
                pieces.setdefault(record["spack"], []).append((part["nonce"], record["kind"]))
    assert any(
        [kind for _, kind in p] == ["FRAGMENT", "FRAGMENT", "MESSAGE"]
        and len({n for n, _ in p}) == 3
        for p in pieces.values()
    )
    # PING answered by PONG with the same body, from the other side.
    pings = [
        (s["from"], r["body_hex"]) for s, p in parts for r in p["records"] if r["kind"] == "PING"
    ]
    pongs = [
        (s["from"], r["body_hex"]) for s, p in parts for r in p["records"] if r["kind"] == "PONG"
    ]
    assert pings
    assert [(other(side), body) for side, body in pings] == pongs
    # A REKEY, and later messages of that side under the next key.
    rekeyed = {s["from"] for s, p in parts if p["records"][-1]["kind"] == "REKEY"}
    assert rekeyed
    assert all(any(p["key_epoch"] >= 1 for s, p in parts if s["from"] == side) for side in rekeyed)
    # Spacks both ways; CLOSE from the initiator, then the responder's CLOSE ends it all.
    assert {s["from"] for s in transcript["spacks"]} == {INITIATOR, RESPONDER}
    closes = [(s["from"], s["step"]) for s, p in parts if p["records"][-1]["kind"] == "CLOSE"]
    assert closes == [(INITIATOR, closes[0][1]), (RESPONDER, len(steps) - 1)]


def records_of(
    transcript: Transcript,
) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """Every record of every transport message: ``(step, part, record)``."""
    for step, part in transport_parts(transcript):
        for record in part["records"]:
            yield step, part, record


def test_channel_transcript_has_the_required_content() -> None:
    transcript = load("channels")
    for side in (INITIATOR, RESPONDER):
        assert set(transcript[side]["config"]["channels"]) == {
            "max_channels",
            "channel_window",
            "connection_window",
        }
        assert transcript[side]["advertised_params"]["channel_window"] <= 4096  # credit matters
    records = list(records_of(transcript))
    data = [(s, p, r) for s, p, r in records if r["kind"] in ("MESSAGE", "FRAGMENT")]
    # Data on channel 0, both ways.
    assert {s["from"] for s, _, r in data if r["channel"] == 0} == {INITIATOR, RESPONDER}
    # Each side opens a channel of its own by sending data on it (odd ids, even ids).
    first: dict[int, tuple[str, str]] = {}
    for step, _, record in records:
        if record["channel"]:
            first.setdefault(record["channel"], (step["from"], record["kind"]))
    assert any(c % 2 == 1 and f == (INITIATOR, "MESSAGE") for c, f in first.items())
    assert any(c % 2 == 0 and f == (RESPONDER, "MESSAGE") for c, f in first.items())
    # A spack larger than the receiver's channel window crosses in window-sized parts, with
    # WINDOW and CONNECTION_WINDOW records of the same size granting them back.
    window = transcript[RESPONDER]["advertised_params"]["channel_window"]
    large = [s for s in transcript["spacks"] if s["from"] == INITIATOR]
    large = [s for s in large if s["encoded_length"] > window]
    assert large
    pieces = [r["length"] for _, _, r in data if r["spack"] == large[0]["index"]]
    assert len(pieces) >= 3
    assert pieces[:-1] == [window] * (len(pieces) - 1)
    grants = [
        (r["kind"], r["increment"])
        for s, _, r in records
        if s["from"] == RESPONDER and r["kind"] in ("WINDOW", "CONNECTION_WINDOW")
    ]
    assert ("WINDOW", window) in grants
    assert ("CONNECTION_WINDOW", window) in grants
    # A WINDOW that a release earned: the initiator's, on a channel of the responder's.
    assert any(
        s["from"] == INITIATOR and s["cause"].get("call") == "release" and r["kind"] == "WINDOW"
        for s, _, r in records
    )
    # Records of two channels in one transport message.
    assert any(
        len({r["channel"] for r in p["records"] if r["kind"] in ("MESSAGE", "FRAGMENT")}) >= 2
        for _, p in transport_parts(transcript)
    )
    # A channel half-closed each way: CLOSE on it from both sides.
    closes = {(s["from"], r["channel"]) for s, _, r in records if r["kind"] == "CLOSE"}
    assert any(c and (other(side), c) in closes for side, c in closes)
    # A reset with a code and a reason, answered by the other side's RESET.
    resets = [
        (s["from"], r["channel"], r["code"], r["reason"])
        for s, _, r in records
        if r["kind"] == "RESET"
    ]
    assert len(resets) == 2
    (side, channel, code, reason), answer = resets
    assert code
    assert reason
    assert answer == (other(side), channel, 0, "")
    # A REKEY; both connection CLOSEs, the responder's last.
    assert any(r["kind"] == "REKEY" for _, _, r in records)
    ends = [
        (s["from"], s["step"]) for s, _, r in records if r["kind"] == "CLOSE" and not r["channel"]
    ]
    assert ends == [(INITIATOR, ends[0][1]), (RESPONDER, len(transcript["steps"]) - 1)]
    # A call that wrote nothing is a step of its own.
    assert any(not s["bytes"] for s in transcript["steps"])


# --------------------------------------------------------------------------- (c) tampering


def find_step(transcript: Transcript, target: str) -> tuple[int, int]:
    """The step index and the byte offset in it to corrupt, for a named target.

    ``batch``: inside the ciphertext of the batch message; ``batch tag``: its last byte (AEAD
    tag); ``last fragment``: inside the last of the three messages of the fragmented spack
    (the first two are intact); ``after rekey``: inside the first message sent under a
    rekeyed key; ``msg2``: the tag over handshake message 2's payload. With channels:
    ``two channels``: inside a message with data on two channels (one of them opening);
    ``window``: inside a message of WINDOW and CONNECTION_WINDOW records; ``reset``:
    inside the message of a RESET with a code.
    """
    for step in transcript["steps"]:
        parts = step["parts"]
        for part in parts:
            records = [r["kind"] for r in part.get("records", ())]
            body = part["offset"] + 2
            end = body + part.get("frame_length", 0)
            data = {r.get("channel") for r in part.get("records", ()) if "spack" in r}
            if target == "two channels" and len(data) >= 2:
                return step["step"], body + 7
            if target == "window" and "WINDOW" in records:
                return step["step"], body + 1
            if target == "reset" and any(
                r["kind"] == "RESET" and r["code"] for r in part.get("records", ())
            ):
                return step["step"], body + 4
            if target == "first message" and "MESSAGE" in records:
                return step["step"], body + 2
            if target == "batch" and records.count("MESSAGE") >= 3:
                return step["step"], body + 5
            if target == "batch tag" and records.count("MESSAGE") >= 3:
                return step["step"], end - 1
            if target == "after rekey" and part.get("key_epoch") == 1:
                return step["step"], body + 3
            if target == "msg2" and part.get("message") == "msg2":
                return step["step"], end - 1
            if target == "initiator certificate" and part.get("message") in ("msg1", "msg3"):
                payload = part["payload"]
                if "certificate_hex" in payload:
                    return step["step"], end - 16 - 30  # inside the certificate's signature
        if target == "last fragment" and any(
            r["kind"] == "FRAGMENT" for part in parts for r in part.get("records", ())
        ):
            last = parts[-1]
            assert last["records"][0]["kind"] == "MESSAGE"
            return step["step"], last["offset"] + 2 + 100
    raise AssertionError(f"no {target} in the transcript")


def deliver_tampered(transcript: Transcript, target: str) -> tuple[Session, Session, list[Event]]:
    """Replay up to the target step, then deliver its bytes with one bit flipped.

    :returns: the writer, the receiver (now FAILED) and what the receiver delivered.
    """
    index, offset = find_step(transcript, target)
    step = transcript["steps"][index]
    sessions = replay(transcript, stop_before=index)
    actor, receiver = sessions[step["from"]], sessions[other(step["from"])]
    perform(transcript, actor, step["cause"], index)
    data = bytearray(take_all(actor))
    assert data.hex() == step["bytes"]
    data[offset] ^= 0x01
    receiver.receive_data(bytes(data))
    events: list[Event] = []
    handshake = target in ("msg2", "initiator certificate")
    expected = HandshakeFailed if handshake else DecryptionFailed
    with pytest.raises(expected):
        drain(receiver, events, may_owe=False)  # keeps what came before the error
    assert receiver.state is SessionState.FAILED
    with pytest.raises(expected):  # terminal: the same error again
        receiver.next_event()
    return actor, receiver, events


TARGETS = ["batch", "batch tag", "last fragment", "after rekey"]
CHANNEL_TARGETS = ["two channels", "window", "reset", "after rekey"]
TAMPERED = (
    [(pattern, target) for pattern in PATTERNS for target in TARGETS]
    + [("channels", target) for target in CHANNEL_TARGETS]
    + [(name, "first message") for name in CERTIFIED]
)


@pytest.mark.parametrize(("name", "target"), TAMPERED)
def test_flipped_byte_in_a_transport_message_delivers_nothing(name: str, target: str) -> None:
    _, _, events = deliver_tampered(load(name), target)
    # No spack of that message, no piece of the fragmented one, no channel opened or reset.
    assert events == []


#: A session that fails while a spack of its own waits for credit sends its error CLOSE in
#: the middle of that spack, which its peer refuses as a CLOSE inside a fragmented spack
#: (SPEC section 24 forbids the CLOSE; section 13 has no exception for an error CLOSE).
@pytest.mark.parametrize(("name", "target"), TAMPERED)
def test_receiver_of_a_flipped_byte_closes_with_protocol_error(name: str, target: str) -> None:
    # SPEC "Error handling": an authenticated CLOSE(PROTOCOL_ERROR) tells the sender why.
    actor, receiver, _ = deliver_tampered(load(name), target)
    actor.receive_data(take_all(receiver))
    closing = drain(actor, may_owe=False)
    assert len(closing) == 1
    assert isinstance(closing[0], CloseReceived)
    assert closing[0].code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("name", NAMES)
def test_flipped_byte_in_message_two_fails_the_handshake(name: str) -> None:
    _, initiator, events = deliver_tampered(load(name), "msg2")
    assert events == []
    assert initiator.handshake_hash is None


def _alter_bytes(transcript: Transcript) -> None:
    index, offset = find_step(transcript, "batch")
    step = transcript["steps"][index]
    raw = bytearray.fromhex(step["bytes"])
    raw[offset] ^= 0x80
    step["bytes"] = raw.hex()


def _alter_pong(transcript: Transcript) -> None:
    for step in transcript["steps"]:
        for event in step["events"]:
            if event["event"] == "pong":
                event["payload_hex"] = event["payload_hex"][:-2] + "00"


def _alter_message_event(transcript: Transcript) -> None:
    for step in transcript["steps"]:
        for event in step["events"]:
            if event["event"] == "message" and event["spack"] == 3:
                event["spack"] = 2  # the empty spack, sent in the same batch


def _alter_handshake_hash(transcript: Transcript) -> None:
    transcript["handshake_hash_hex"] = "00" * 32


def _drop_event(transcript: Transcript) -> None:
    transcript["steps"][-1]["events"].pop()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(
    ("alter", "message"),
    [
        (_alter_bytes, "wrote different bytes"),
        (_alter_pong, "pong event"),
        (_alter_message_event, "message event"),
        (_alter_handshake_hash, "handshake_complete event"),
        (_drop_event, "events"),
    ],
)
def test_replay_rejects_an_altered_transcript(
    pattern: str, alter: Callable[[Transcript], None], message: str
) -> None:
    transcript = load(pattern)
    alter(transcript)
    with pytest.raises(AssertionError, match=message):
        replay(transcript)


def _events_of(transcript: Transcript, kind: str) -> Iterator[dict[str, Any]]:
    for step in transcript["steps"]:
        for event in step["events"]:
            if event["event"] == kind:
                yield event


def _alter_bytes_of_a_window(transcript: Transcript) -> None:
    index, offset = find_step(transcript, "window")
    step = transcript["steps"][index]
    raw = bytearray.fromhex(step["bytes"])
    raw[offset] ^= 0x80
    step["bytes"] = raw.hex()


def _alter_release(transcript: Transcript) -> None:
    """The release that earns a WINDOW names a smaller spack of the same channel."""
    (step,) = (s for s in transcript["steps"] if s["cause"].get("call") == "release" and s["bytes"])
    smaller = [
        s["index"]
        for s in transcript["spacks"]
        if s["channel"] == step["cause"]["channel"] and s["index"] < step["cause"]["spack"]
    ]
    step["cause"]["spack"] = smaller[0]


def _alter_message_channel(transcript: Transcript) -> None:
    event = next(e for e in _events_of(transcript, "message") if e["channel"])
    event["channel"] += 2


def _alter_reset_code(transcript: Transcript) -> None:
    next(_events_of(transcript, "channel_reset"))["code"] += 1


def _alter_opened(transcript: Transcript) -> None:
    next(_events_of(transcript, "channel_opened"))["channel"] += 2


@pytest.mark.parametrize(
    ("alter", "message"),
    [
        (_alter_release, "wrote different bytes"),
        (_alter_message_channel, "message event"),
        (_alter_reset_code, "channel_reset event"),
        (_alter_opened, "channel_opened event"),
        (_alter_bytes_of_a_window, "wrote different bytes"),
    ],
)
def test_replay_rejects_an_altered_channel_transcript(
    alter: Callable[[Transcript], None], message: str
) -> None:
    transcript = load("channels")
    alter(transcript)
    with pytest.raises(AssertionError, match=message):
        replay(transcript)


# --------------------------------------------------------------------------- certificates


@pytest.mark.parametrize("name", CERTIFIED)
def test_certificate_transcript_records_what_the_authority_signed(name: str) -> None:
    transcript = load(name)
    trust = transcript["certificates"]
    authority = Authority.from_private_bytes(bytes.fromhex(trust["authority_seed_hex"]))
    assert authority.public.raw.hex() == trust["authority_public_hex"]
    assert str(authority.public) == trust["authority_printable"]
    assert authority.public.digest.hex() == trust["issuer_hex"]
    for side in (INITIATOR, RESPONDER):
        party = transcript[side]
        recorded = party["certificate"]
        cert = certificate_of(transcript, side)
        assert cert is not None
        assert cert.subject.raw.hex() == party["static_public_hex"] == recorded["subject_hex"]
        assert (cert.serial, cert.name, list(cert.groups)) == (
            recorded["serial"],
            recorded["name"],
            recorded["groups"],
        )
        assert cert.not_before <= trust["verification_time"] < cert.not_after
        assert cert.issuer.hex() == recorded["issuer_hex"] == trust["issuer_hex"]
        assert cert.signature.hex() == recorded["signature_hex"]
        assert len(cert.encoded) == recorded["encoded_length"]
        assert Certificate.from_string(recorded["printable"]).encoded == cert.encoded
        # Ed25519 is deterministic: the authority's key gives exactly these bytes again.
        again = authority.sign(
            cert.subject,
            cert.name,
            cert.groups,
            not_before=cert.not_before,
            not_after=cert.not_after,
            serial=cert.serial,
        )
        assert again.encoded == cert.encoded
        # It rides last in the side's handshake parameters, as a bin.
        params = bytes.fromhex(party["params_payload_hex"])
        decoded = msgpack.unpackb(params)
        assert list(decoded)[-1] == "certificate"
        assert decoded["certificate"] == cert.encoded
        assert party["advertised_params"]["certificate_hex"] == recorded["encoded_hex"]
    # Each side's requirement is met by the other's certificate, not by its own.
    assert (
        transcript[RESPONDER]["certificate"]["name"]
        in (transcript[INITIATOR]["certificate"]["requires_names"])
    )
    assert set(transcript[INITIATOR]["certificate"]["groups"]) & set(
        transcript[RESPONDER]["certificate"]["requires_groups"]
    )


@pytest.mark.parametrize("name", CERTIFIED)
@pytest.mark.parametrize(
    ("when", "error"),
    [("after", CertificateExpired), ("before", CertificateNotYetValid)],
)
def test_certificate_transcript_refused_outside_the_validity_window(
    name: str, when: str, error: type[Exception]
) -> None:
    """The same bytes, verified just outside the window (with the skew), are refused.

    The first verifier is the party that first holds a certificate and the key it is for:
    the XX initiator at message 2, the IK responder at message 1.
    """
    transcript = load(name)
    trust = transcript["certificates"]
    cert = certificate_of(transcript, RESPONDER)
    assert cert is not None
    skew = trust["clock_skew"]
    now = cert.not_after + skew if when == "after" else cert.not_before - skew - 1
    sessions = build_sessions(transcript, now=now)
    first = 0 if transcript["pattern"] == "IK" else 1
    writer = transcript["steps"][first]["from"]
    if first == 1:
        sessions[RESPONDER].receive_data(bytes.fromhex(transcript["steps"][0]["bytes"]))
        assert drain(sessions[RESPONDER], may_owe=False) == []
    data = take_all(sessions[writer])
    assert data.hex() == transcript["steps"][first]["bytes"]
    verifier = sessions[other(writer)]
    verifier.receive_data(data)
    with pytest.raises(error):
        drain(verifier, may_owe=False)
    assert verifier.state is SessionState.FAILED
    assert verifier.peer_certificate is None


@pytest.mark.parametrize("name", CERTIFIED)
def test_flipped_byte_in_the_initiators_certificate_fails_the_handshake(name: str) -> None:
    _, responder, events = deliver_tampered(load(name), "initiator certificate")
    assert events == []  # not even PeerIdentified: the payload never decrypted
    assert responder.peer_certificate is None
    assert responder.handshake_hash is None
