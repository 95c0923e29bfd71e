"""Run published Noise test vectors through stalk's own Noise layer.

Theory of operation
-------------------
stalk's security rests on ``noiseprotocol`` computing exactly what the Noise specification
says. This module checks that claim against test vectors published by other Noise
implementations, driving them through :mod:`stalk._noise` (never through ``noiseprotocol``
directly), so the wrapper's error translation, ephemeral-key handling and transport ciphers
are covered too.

Two file formats are read; the format is detected from the content, not the file name:

- The JSON format of the Noise wiki page "Test vectors": ``{"vectors": [...]}``. Older files
  spell ``protocol_name`` as ``name`` and give one ``init_psk`` / ``resp_psk`` string instead
  of the ``init_psks`` / ``resp_psks`` lists; both spellings are accepted. Messages alternate
  initiator, responder, ... with no break after the handshake, except in one-way patterns
  (``N``, ``K``, ``X`` and their ``psk`` variants), where every message goes from initiator to
  responder.
- The line-based ``key=value`` format of flynn/noise (blank-line separated blocks). It lists
  no remote static keys: they are derived from the other side's private key wherever the
  pattern has a pre-message. Handshake messages alternate from the initiator; after the
  handshake, transport messages alternate from the initiator (cipher ``c1``) whatever the
  handshake length. In one-way patterns the responder-to-initiator cipher ``c2`` does not
  exist in Noise (``noiseprotocol`` discards it), so such a message is not checked; the
  result's reason says so.

For every vector an initiator and a responder are set up with the vector's fixed keys,
prologues and PSKs. Each message is written by its sender, whose output must equal the
published ciphertext byte for byte, and read by its receiver, which must recover the
published payload. The handshake hash, when given, must match on both sides. The result is
``passed``, ``failed`` (with the first mismatch, or the exception a vector raised), or
``skipped`` when :class:`~stalk._noise.NoiseHandshake` cannot set the protocol up at all
(deferred patterns such as ``I1K``, ``fallback``, the old ``NoisePSK_`` names, ...), with the
reason. No vector can crash a run.

Command line: ``python -m stalk.vectors [-v] FILE...`` prints, per file, its counts, the skip
reasons grouped with counts and every failure, then one closing line
``N passed, N failed, N skipped``. It exits with status 1 if any vector failed or a file could
not be read or parsed, else 0.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from cryptography.hazmat.primitives.asymmetric import x448, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from stalk._noise import NoiseHandshake, TransportCipher
from stalk.errors import HandshakeFailed, StalkError

__all__ = [
    "FileReport",
    "Message",
    "Vector",
    "VectorFileError",
    "VectorResult",
    "load_vectors",
    "main",
    "run_file",
    "run_vector",
]

#: The outcome of one vector.
Status = Literal["passed", "failed", "skipped"]
#: The file format a vector was read from.
VectorFormat = Literal["json", "kv"]

#: Names of the patterns whose every message goes from initiator to responder (Noise §7.4).
_ONE_WAY_PATTERNS: Final = frozenset({"N", "K", "X"})
#: A Noise protocol name: ``Noise_`` + pattern + modifiers, then DH, cipher and hash names.
_PROTOCOL_NAME: Final = re.compile(
    r"Noise_(?P<pattern>[A-Z][A-Z0-9]*)(?P<modifiers>[a-z][a-z0-9+]*)?"
    r"_(?P<dh>[^_]+)_(?P<cipher>[^_]+)_(?P<hash>[^_]+)"
)
#: JSON vector flags naming features this runner does not implement.
_UNSUPPORTED_FLAGS: Final = {
    "fail": "expected-failure vector (fail: true)",
    "fallback": "fallback vector (fallback: true)",
    "fallback_pattern": "fallback vector (fallback_pattern)",
    "hybrid": "hybrid forward secrecy (hybrid)",
}
#: The keys of a flynn/noise block, apart from ``msg_N_payload`` / ``msg_N_ciphertext``.
_KV_KEYS: Final = frozenset(
    {
        "handshake",
        "gen_init_ephemeral",
        "gen_resp_ephemeral",
        "init_static",
        "resp_static",
        "prologue",
        "preshared_key",
    }
)
_KV_MESSAGE_KEY: Final = re.compile(r"msg_(?P<index>[0-9]+)_(?P<part>payload|ciphertext)")
#: How much of a mismatching byte string a failure reason shows, in bytes.
_SHOWN_BYTES: Final = 24


class VectorFileError(StalkError, ValueError):
    """A vector file cannot be read, or is not in a vector format this module knows."""


@dataclass(frozen=True)
class Message:
    """One message of a vector: what the sender writes and what goes on the wire."""

    payload: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class Vector:
    """One test vector, with every key already decoded from hex.

    :ivar protocol_name: the full Noise protocol name.
    :ivar messages: the messages in the order they are sent.
    :ivar source_format: the file format it came from, which fixes the transport ordering.
    :ivar location: where it is in its file (``vector 12`` or ``line 3119``).
    :ivar unsupported: features of the vector this runner cannot check (it is skipped).
    """

    protocol_name: str
    messages: tuple[Message, ...]
    source_format: VectorFormat = "json"
    location: str = ""
    init_prologue: bytes = b""
    resp_prologue: bytes = b""
    init_static: bytes | None = None
    init_ephemeral: bytes | None = None
    init_remote_static: bytes | None = None
    resp_static: bytes | None = None
    resp_ephemeral: bytes | None = None
    resp_remote_static: bytes | None = None
    init_psks: tuple[bytes, ...] = ()
    resp_psks: tuple[bytes, ...] = ()
    handshake_hash: bytes | None = None
    unsupported: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """A short human-readable name: location and protocol name."""
        return f"{self.location} {self.protocol_name}" if self.location else self.protocol_name


@dataclass(frozen=True)
class VectorResult:
    """The outcome of running one vector.

    :ivar reason: why it failed or was skipped; for a pass, any message that was not
        checked (else empty).
    """

    vector: Vector
    status: Status
    reason: str = ""


@dataclass(frozen=True)
class FileReport:
    """The results of every vector in one file."""

    path: Path
    results: tuple[VectorResult, ...]

    def _count(self, status: Status) -> int:
        return sum(1 for result in self.results if result.status == status)

    @property
    def passed(self) -> int:
        """How many vectors passed."""
        return self._count("passed")

    @property
    def failed(self) -> int:
        """How many vectors failed."""
        return self._count("failed")

    @property
    def skipped(self) -> int:
        """How many vectors were skipped."""
        return self._count("skipped")

    @property
    def failures(self) -> tuple[VectorResult, ...]:
        """The failed results, in file order."""
        return tuple(result for result in self.results if result.status == "failed")

    def skip_reasons(self) -> list[tuple[str, int]]:
        """Each distinct skip reason with its count, most frequent first."""
        counts = Counter(result.reason for result in self.results if result.status == "skipped")
        return counts.most_common()


# --- protocol names -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Protocol:
    """What the runner needs to know about a protocol name, parsed without noiseprotocol."""

    pattern: str
    modifiers: tuple[str, ...]
    dh: str

    @property
    def letters(self) -> str:
        """The pattern without the deferral digits (``I1K1`` -> ``IK``)."""
        return self.pattern.replace("1", "")

    @property
    def deferred(self) -> bool:
        """Whether the pattern is a deferred one (Noise §7.6), such as ``I1K`` or ``XX1``."""
        return any(char.isdigit() for char in self.pattern)

    @property
    def one_way(self) -> bool:
        """Whether every message goes from initiator to responder."""
        return self.letters in _ONE_WAY_PATTERNS

    @property
    def initiator_static_premessage(self) -> bool:
        """Whether the responder knows the initiator's static key beforehand."""
        return self.letters[:1] == "K"

    @property
    def responder_static_premessage(self) -> bool:
        """Whether the initiator knows the responder's static key beforehand."""
        return self.one_way or self.letters[1:2] == "K"


def _parse_protocol(name: str) -> _Protocol | None:
    match = _PROTOCOL_NAME.fullmatch(name)
    if match is None:
        return None
    modifiers = match["modifiers"]
    return _Protocol(
        pattern=match["pattern"],
        modifiers=tuple(modifiers.split("+")) if modifiers else (),
        dh=match["dh"],
    )


def _unsupported_reason(name: str, error: HandshakeFailed) -> str:
    """Why ``NoiseHandshake`` could not set ``name`` up, worded so that reasons group well."""
    protocol = _parse_protocol(name)
    if name.startswith("NoisePSK_"):
        return "old NoisePSK_ protocol name (PSK scheme before Noise revision 32)"
    if protocol is None:
        return "not a protocol name noiseprotocol can parse"
    if protocol.deferred:
        return "deferred pattern (noiseprotocol 0.3.1 has only the fundamental patterns)"
    if "fallback" in protocol.modifiers:
        return "fallback modifier (not implemented by noiseprotocol 0.3.1)"
    cause = error.__cause__
    if cause is None:
        return f"cannot be set up: {error}"
    return f"cannot be set up: {type(cause).__name__}: {cause}"


def _public_key(dh: str, private: bytes | None) -> bytes | None:
    """The public key of ``private`` for DH function ``dh``, or None if it cannot be derived."""
    if private is None:
        return None
    try:
        if dh == "25519":
            return (
                x25519.X25519PrivateKey.from_private_bytes(private)
                .public_key()
                .public_bytes(Encoding.Raw, PublicFormat.Raw)
            )
        if dh == "448":
            return (
                x448.X448PrivateKey.from_private_bytes(private)
                .public_key()
                .public_bytes(Encoding.Raw, PublicFormat.Raw)
            )
    except ValueError:
        # A key of the wrong length: leave it to NoiseHandshake to refuse the vector.
        return None
    return None


# --- loading --------------------------------------------------------------------------------


def _hex(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise VectorFileError(f"{where}: expected a hex string, got {type(value).__name__}")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise VectorFileError(f"{where}: not valid hex") from exc


def _optional_hex(entry: Mapping[str, Any], key: str, where: str) -> bytes | None:
    value = entry.get(key)
    return None if value is None else _hex(value, f"{where}: {key}")


def _psks(entry: Mapping[str, Any], side: str, where: str) -> tuple[bytes, ...]:
    """``init_psks`` / ``resp_psks`` lists, or the older single ``init_psk`` / ``resp_psk``."""
    listed = entry.get(f"{side}_psks")
    if listed is not None:
        if not isinstance(listed, list):
            raise VectorFileError(f"{where}: {side}_psks must be a list")
        return tuple(_hex(psk, f"{where}: {side}_psks[{i}]") for i, psk in enumerate(listed))
    single = entry.get(f"{side}_psk")
    return () if single is None else (_hex(single, f"{where}: {side}_psk"),)


def _json_messages(entry: Mapping[str, Any], where: str) -> tuple[Message, ...]:
    messages = entry.get("messages")
    if not isinstance(messages, list):
        raise VectorFileError(f"{where}: 'messages' must be a list")
    decoded = []
    for i, message in enumerate(messages):
        here = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise VectorFileError(f"{here}: must be an object")
        decoded.append(
            Message(
                payload=_hex(message.get("payload"), f"{here}: payload"),
                ciphertext=_hex(message.get("ciphertext"), f"{here}: ciphertext"),
            )
        )
    return tuple(decoded)


def _json_vector(entry: object, index: int) -> Vector:
    where = f"vector {index}"
    if not isinstance(entry, dict):
        raise VectorFileError(f"{where}: must be an object")
    name = entry.get("protocol_name", entry.get("name"))
    if not isinstance(name, str):
        raise VectorFileError(f"{where}: no protocol_name (or name) string")
    where = f"{where} ({name})"
    unsupported = tuple(
        description for flag, description in _UNSUPPORTED_FLAGS.items() if entry.get(flag)
    )
    return Vector(
        protocol_name=name,
        messages=_json_messages(entry, where),
        source_format="json",
        location=f"vector {index}",
        init_prologue=_optional_hex(entry, "init_prologue", where) or b"",
        resp_prologue=_optional_hex(entry, "resp_prologue", where) or b"",
        init_static=_optional_hex(entry, "init_static", where),
        init_ephemeral=_optional_hex(entry, "init_ephemeral", where),
        init_remote_static=_optional_hex(entry, "init_remote_static", where),
        resp_static=_optional_hex(entry, "resp_static", where),
        resp_ephemeral=_optional_hex(entry, "resp_ephemeral", where),
        resp_remote_static=_optional_hex(entry, "resp_remote_static", where),
        init_psks=_psks(entry, "init", where),
        resp_psks=_psks(entry, "resp", where),
        handshake_hash=_optional_hex(entry, "handshake_hash", where),
        unsupported=unsupported,
    )


def _load_json(text: str) -> list[Vector]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VectorFileError(f"malformed JSON: {exc}") from exc
    vectors = document.get("vectors") if isinstance(document, dict) else None
    if not isinstance(vectors, list):
        raise VectorFileError('expected a JSON object with a "vectors" list')
    return [_json_vector(entry, index) for index, entry in enumerate(vectors)]


def _kv_blocks(text: str) -> Iterator[tuple[int, list[tuple[int, str, str]]]]:
    """Blank-line separated blocks of ``(line number, key, value)``; ``#`` starts a comment."""
    block: list[tuple[int, str, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            if block:
                yield block[0][0], block
                block = []
            continue
        if line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise VectorFileError(f"line {number}: expected key=value")
        block.append((number, key.strip(), value.strip()))
    if block:
        yield block[0][0], block


def _kv_vector(first_line: int, block: list[tuple[int, str, str]]) -> Vector:
    where = f"line {first_line}"
    fields: dict[str, bytes] = {}
    name: str | None = None
    parts: dict[int, dict[str, bytes]] = {}
    for number, key, value in block:
        message_key = _KV_MESSAGE_KEY.fullmatch(key)
        if key == "handshake":
            name = value
        elif message_key is not None:
            part = parts.setdefault(int(message_key["index"]), {})
            part[message_key["part"]] = _hex(value, f"line {number}: {key}")
        elif key in _KV_KEYS:
            fields[key] = _hex(value, f"line {number}: {key}")
        else:
            raise VectorFileError(f"line {number}: unknown key {key!r}")
    if name is None:
        raise VectorFileError(f"{where}: block has no handshake= line")
    if sorted(parts) != list(range(len(parts))):
        raise VectorFileError(f"{where}: message numbers must run 0, 1, 2, ...")
    messages = []
    for index in range(len(parts)):
        part = parts[index]
        if set(part) != {"payload", "ciphertext"}:
            raise VectorFileError(f"{where}: msg_{index} needs both payload and ciphertext")
        messages.append(Message(payload=part["payload"], ciphertext=part["ciphertext"]))
    init_static = fields.get("init_static")
    resp_static = fields.get("resp_static")
    protocol = _parse_protocol(name)
    init_remote = resp_remote = None
    if protocol is not None and protocol.responder_static_premessage:
        init_remote = _public_key(protocol.dh, resp_static)
    if protocol is not None and protocol.initiator_static_premessage:
        resp_remote = _public_key(protocol.dh, init_static)
    psk = fields.get("preshared_key")
    psks = () if psk is None else (psk,)
    prologue = fields.get("prologue", b"")
    return Vector(
        protocol_name=name,
        messages=tuple(messages),
        source_format="kv",
        location=where,
        init_prologue=prologue,
        resp_prologue=prologue,
        init_static=init_static,
        init_ephemeral=fields.get("gen_init_ephemeral"),
        init_remote_static=init_remote,
        resp_static=resp_static,
        resp_ephemeral=fields.get("gen_resp_ephemeral"),
        resp_remote_static=resp_remote,
        init_psks=psks,
        resp_psks=psks,
    )


def _load_kv(text: str) -> list[Vector]:
    return [_kv_vector(first_line, block) for first_line, block in _kv_blocks(text)]


def _looks_like_kv(text: str) -> bool:
    return any(line.strip().startswith("handshake=") for line in text.splitlines())


def load_vectors(path: str | Path) -> list[Vector]:
    """Read every vector of a file, detecting its format from the content.

    :raises VectorFileError: the file cannot be read, is not UTF-8, or is not a well-formed
        vector file of either format.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise VectorFileError(f"cannot read {path}: {exc}") from exc
    stripped = text.lstrip()
    try:
        if stripped.startswith(("{", "[")):
            return _load_json(text)
        if _looks_like_kv(text):
            return _load_kv(text)
    except VectorFileError as exc:
        raise VectorFileError(f"{path}: {exc}") from exc
    raise VectorFileError(f"{path}: neither a JSON vector file nor a key=value vector file")


# --- running --------------------------------------------------------------------------------


class _MismatchError(Exception):
    """The first difference between a vector and what stalk computed."""


def _show(data: bytes) -> str:
    shown = data[:_SHOWN_BYTES].hex()
    return f"{len(data)} bytes {shown}{'...' if len(data) > _SHOWN_BYTES else ''}"


def _compare(what: str, expected: bytes, actual: bytes) -> None:
    if expected == actual:
        return
    offset = next(
        (i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
        min(len(expected), len(actual)),
    )
    raise _MismatchError(
        f"{what} mismatch at byte {offset}: expected {_show(expected)}, got {_show(actual)}"
    )


def _setup(vector: Vector, *, initiator: bool) -> NoiseHandshake:
    options: dict[str, Any]
    if initiator:
        ephemeral = vector.init_ephemeral
        options = {
            "prologue": vector.init_prologue,
            "static_private": vector.init_static,
            "remote_static_public": vector.init_remote_static,
            "psks": list(vector.init_psks),
        }
    else:
        ephemeral = vector.resp_ephemeral
        options = {
            "prologue": vector.resp_prologue,
            "static_private": vector.resp_static,
            "remote_static_public": vector.resp_remote_static,
            "psks": list(vector.resp_psks),
        }
    if ephemeral is None:
        return NoiseHandshake(vector.protocol_name, initiator=initiator, **options)
    return NoiseHandshake.fixed_ephemeral_for_testing_only(
        vector.protocol_name, ephemeral_private=ephemeral, initiator=initiator, **options
    )


def _direction(from_initiator: bool) -> str:
    return "initiator->responder" if from_initiator else "responder->initiator"


def _run_handshake(vector: Vector, init: NoiseHandshake, resp: NoiseHandshake) -> int:
    """Run the handshake messages; return how many messages they used."""
    index = 0
    while index < len(vector.messages) and not init.complete:
        message = vector.messages[index]
        from_initiator = index % 2 == 0
        writer, reader = (init, resp) if from_initiator else (resp, init)
        where = f"message {index} ({_direction(from_initiator)}, handshake)"
        try:
            written = writer.write_message(message.payload)
        except HandshakeFailed as exc:
            raise _MismatchError(f"{where}: writing failed: {exc}") from exc
        _compare(f"{where}: ciphertext", message.ciphertext, written)
        try:
            payload = reader.read_message(message.ciphertext)
        except HandshakeFailed as exc:
            raise _MismatchError(f"{where}: reading failed: {exc}") from exc
        _compare(f"{where}: payload", message.payload, payload)
        index += 1
    if init.complete != resp.complete:
        raise _MismatchError(f"after message {index - 1}: only one side finished the handshake")
    return index


def _check_handshake_hash(vector: Vector, init: NoiseHandshake, resp: NoiseHandshake) -> None:
    if not init.complete:
        if vector.handshake_hash is not None:
            raise _MismatchError("the vector ends before the handshake does: no handshake hash")
        return
    _compare("handshake hash (responder vs initiator)", init.handshake_hash, resp.handshake_hash)
    if vector.handshake_hash is not None:
        _compare("handshake hash", vector.handshake_hash, init.handshake_hash)


def _transport_from_initiator(
    vector: Vector, protocol: _Protocol | None, index: int, k: int
) -> bool:
    """Whether message ``index`` (the ``k``-th transport message) goes initiator->responder."""
    if vector.source_format == "kv":
        return k % 2 == 0
    if protocol is not None and protocol.one_way:
        return True
    return index % 2 == 0


def _run_transport(
    vector: Vector, init: NoiseHandshake, resp: NoiseHandshake, first: int
) -> list[str]:
    """Run the transport messages from index ``first``; return notes on unchecked ones."""
    protocol = _parse_protocol(vector.protocol_name)
    one_way = protocol is not None and protocol.one_way
    init_send, init_recv = init.split()
    resp_send, resp_recv = resp.split()
    notes = []
    for k, message in enumerate(vector.messages[first:]):
        index = first + k
        from_initiator = _transport_from_initiator(vector, protocol, index, k)
        if one_way and not from_initiator:
            notes.append(
                f"message {index} not checked: it uses the responder->initiator cipher c2, "
                "which Noise discards in one-way patterns"
            )
            continue
        sender: TransportCipher = init_send if from_initiator else resp_send
        receiver: TransportCipher = resp_recv if from_initiator else init_recv
        where = f"message {index} ({_direction(from_initiator)}, transport)"
        _compare(f"{where}: ciphertext", message.ciphertext, sender.encrypt(message.payload))
        try:
            payload = receiver.decrypt(message.ciphertext)
        except StalkError as exc:
            raise _MismatchError(f"{where}: decryption failed: {exc}") from exc
        _compare(f"{where}: payload", message.payload, payload)
    return notes


def _run(vector: Vector) -> VectorResult:
    if vector.unsupported:
        return VectorResult(vector, "skipped", "; ".join(vector.unsupported))
    try:
        init = _setup(vector, initiator=True)
        resp = _setup(vector, initiator=False)
    except HandshakeFailed as exc:
        return VectorResult(vector, "skipped", _unsupported_reason(vector.protocol_name, exc))
    try:
        first_transport = _run_handshake(vector, init, resp)
        _check_handshake_hash(vector, init, resp)
        notes = _run_transport(vector, init, resp, first_transport) if init.complete else []
    except _MismatchError as exc:
        return VectorResult(vector, "failed", str(exc))
    return VectorResult(vector, "passed", "; ".join(notes))


def run_vector(vector: Vector) -> VectorResult:
    """Run one vector through :mod:`stalk._noise`; never raises."""
    try:
        return _run(vector)
    except Exception as exc:  # noqa: BLE001 - a vector that raises is a failure, not a crash
        return VectorResult(vector, "failed", f"unexpected {type(exc).__name__}: {exc}")


def run_file(path: str | Path) -> FileReport:
    """Load and run every vector of one file.

    :raises VectorFileError: the file cannot be read or parsed.
    """
    vectors = load_vectors(path)
    return FileReport(Path(path), tuple(run_vector(vector) for vector in vectors))


# --- command line ---------------------------------------------------------------------------


def _print_report(report: FileReport, *, verbose: bool) -> None:
    print(
        f"{report.path}: {report.passed} passed, {report.failed} failed, {report.skipped} skipped"
    )
    for reason, count in report.skip_reasons():
        print(f"  skipped {count}: {reason}")
    for result in report.failures:
        print(f"  FAILED {result.vector.label}: {result.reason}")
    if verbose:
        for result in report.results:
            detail = f": {result.reason}" if result.reason else ""
            print(f"  {result.status:<7} {result.vector.label}{detail}")


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m stalk.vectors") -> int:
    """Run vector files given on the command line; return the exit status.

    :param prog: the command's name in usage and error lines (``stalk`` for ``stalk vectors``).
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run published Noise test vectors through stalk's Noise layer.",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="vector file")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every vector")
    args = parser.parse_args(argv)
    passed = failed = skipped = 0
    unreadable = False
    for path in args.files:
        try:
            report = run_file(path)
        except VectorFileError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            unreadable = True
            continue
        _print_report(report, verbose=args.verbose)
        passed += report.passed
        failed += report.failed
        skipped += report.skipped
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed or unreadable else 0


if __name__ == "__main__":
    raise SystemExit(main())
