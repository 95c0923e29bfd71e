"""The lean Noise engine against noiseprotocol: the same bytes, keys and failures.

stalk runs ``Noise_XX_25519_AESGCM_SHA256`` and ``Noise_IK_25519_AESGCM_SHA256`` on its own
engine (:class:`stalk._noise._LeanEngine`); noiseprotocol, selected with ``reference=True``,
is the reference. With the same keys (ephemeral ones fixed), prologue and payloads, both
must write identical handshake messages, read identical payloads, learn the same remote
static key at the same step, end with the same handshake hash and transport keys, and fail
on the same altered messages in the same way. The published vectors check both as well
(``tests/test_vectors.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from stalk._noise import DHLEN, NoiseHandshake, TransportCipher
from stalk.errors import HandshakeFailed

XX = "Noise_XX_25519_AESGCM_SHA256"
IK = "Noise_IK_25519_AESGCM_SHA256"
MESSAGES = {XX: 3, IK: 2}
#: Low-order X25519 points (tests/test_noise.py lists them all, with their sources).
LOW_ORDER = [bytes(32), (1).to_bytes(32, "little"), (2**255 - 20).to_bytes(32, "little")]


def _private(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(32))


def _public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


@dataclass(frozen=True)
class Setup:
    """Everything both engines are given for one handshake."""

    name: str
    prologue: bytes
    init_static: bytes
    resp_static: bytes
    init_ephemeral: bytes
    resp_ephemeral: bytes
    payloads: tuple[bytes, ...]

    @classmethod
    def random(cls, name: str, seed: int) -> Setup:
        rng = random.Random(seed)
        return cls(
            name,
            rng.randbytes(rng.randrange(0, 40)),
            _private(rng),
            _private(rng),
            _private(rng),
            _private(rng),
            tuple(rng.randbytes(rng.randrange(0, 300)) for _ in range(MESSAGES[name])),
        )

    def pair(self, *, reference: bool) -> tuple[NoiseHandshake, NoiseHandshake]:
        init = NoiseHandshake.fixed_ephemeral_for_testing_only(
            self.name,
            ephemeral_private=self.init_ephemeral,
            initiator=True,
            prologue=self.prologue,
            static_private=self.init_static,
            remote_static_public=_public(self.resp_static) if self.name == IK else None,
            reference=reference,
        )
        resp = NoiseHandshake.fixed_ephemeral_for_testing_only(
            self.name,
            ephemeral_private=self.resp_ephemeral,
            initiator=False,
            prologue=self.prologue,
            static_private=self.resp_static,
            reference=reference,
        )
        return init, resp


def _keys(noise: NoiseHandshake) -> tuple[bytes | None, bytes | None]:
    send, receive = noise.split()
    return send._key, receive._key


def _transcript(setup: Setup, *, reference: bool) -> list[object]:
    """Everything observable from one handshake and a few transport messages after it."""
    init, resp = setup.pair(reference=reference)
    assert init.lean is not reference
    assert resp.lean is not reference
    seen: list[object] = [init.remote_static, resp.remote_static]
    writer, reader = init, resp
    for payload in setup.payloads:
        message = writer.write_message(payload)
        seen += [message, reader.read_message(message)]
        seen += [init.remote_static, resp.remote_static, init.complete, resp.complete]
        writer, reader = reader, writer
    seen += [init.handshake_hash, resp.handshake_hash, _keys(init), _keys(resp)]
    ciphers: list[TransportCipher] = [*init.split(), *resp.split()]
    for step in range(3):
        for cipher in ciphers[::2]:  # the two sending ciphers
            seen.append(cipher.encrypt(b"transport %d" % step))
            cipher.rekey()
    return seen


@pytest.mark.parametrize("name", [XX, IK], ids=["XX", "IK"])
@pytest.mark.parametrize("seed", range(25))
def test_lean_engine_writes_what_noiseprotocol_writes(name: str, seed: int) -> None:
    setup = Setup.random(name, seed)
    lean = _transcript(setup, reference=False)
    assert lean == _transcript(setup, reference=True)
    init_keys, resp_keys = lean[-8], lean[-7]
    assert isinstance(init_keys, tuple)
    assert isinstance(resp_keys, tuple)
    assert init_keys == tuple(reversed(resp_keys))


@pytest.mark.parametrize("name", [XX, IK], ids=["XX", "IK"])
@pytest.mark.parametrize("lean_initiator", [True, False], ids=["lean-init", "lean-resp"])
def test_lean_engine_talks_to_noiseprotocol_with_fresh_ephemerals(
    name: str, lean_initiator: bool
) -> None:
    init_static, resp_static = _private(random.Random(1)), _private(random.Random(2))
    init = NoiseHandshake(
        name,
        initiator=True,
        static_private=init_static,
        remote_static_public=_public(resp_static) if name == IK else None,
        reference=not lean_initiator,
    )
    resp = NoiseHandshake(
        name, initiator=False, static_private=resp_static, reference=lean_initiator
    )
    writer, reader = init, resp
    for number in range(MESSAGES[name]):
        assert reader.read_message(writer.write_message(b"m%d" % number)) == b"m%d" % number
        writer, reader = reader, writer
    assert init.complete
    assert resp.complete
    assert init.handshake_hash == resp.handshake_hash
    assert _keys(init) == tuple(reversed(_keys(resp)))
    assert init.remote_static == _public(resp_static)
    assert resp.remote_static == _public(init_static)


# -- the same failures ----------------------------------------------------------------------


#: Errors the engines name differently for the same fault.
_SAME_CAUSE: dict[str | None, str] = {
    "NoiseValueError": "ValueError",  # noiseprotocol's, for a key of the wrong length
    "NoiseHandshakeError": "out of turn",
    "_OutOfTurn": "out of turn",
}


def _outcome(noise: NoiseHandshake, action: Callable[[], object]) -> tuple[object, ...]:
    """What an action did: its result, or the error class and its cause's class."""
    try:
        result = action()
    except HandshakeFailed as exc:
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else None
        cause = _SAME_CAUSE.get(cause, cause)
        return ("failed", type(exc), cause, noise.remote_static, noise.complete)
    return ("ok", result, noise.remote_static, noise.complete)


def _altered_run(
    setup: Setup, target: int, alter: Callable[[bytes], bytes]
) -> list[list[tuple[object, ...]]]:
    """Run the handshake with message ``target`` altered; what each engine did, per step."""
    runs = []
    for reference in (False, True):
        init, resp = setup.pair(reference=reference)
        seen: list[tuple[object, ...]] = []
        writer, reader = init, resp
        for number, payload in enumerate(setup.payloads):
            written = _outcome(writer, partial(writer.write_message, payload))
            seen.append(written)
            if written[0] != "ok":
                break
            message = written[1]
            assert isinstance(message, bytes)
            if number == target:
                message = alter(message)
            read = _outcome(reader, partial(reader.read_message, message))
            seen.append(read)
            if read[0] != "ok":
                # Fatal on both engines: no further read or write.
                seen.append(_outcome(reader, partial(reader.write_message, b"")))
                break
            writer, reader = reader, writer
        runs.append(seen)
    return runs


def _flip(position: int, message: bytes) -> bytes:
    altered = bytearray(message)
    altered[position % len(altered)] ^= 0x01
    return bytes(altered)


def _truncate(length: int, message: bytes) -> bytes:
    return message[:length]


def _extend(message: bytes) -> bytes:
    return message + b"\x00"


def _replace_e(point: bytes, message: bytes) -> bytes:
    return point + message[DHLEN:]


@pytest.mark.parametrize("name", [XX, IK], ids=["XX", "IK"])
def test_lean_engine_fails_like_noiseprotocol_on_altered_messages(name: str) -> None:
    setup = Setup.random(name, 7)
    for target in range(MESSAGES[name]):
        alterations: list[Callable[[bytes], bytes]] = [
            *(partial(_flip, position) for position in range(0, 400, 3)),
            *(partial(_truncate, length) for length in range(0, 140, 5)),
            _extend,
            *(partial(_replace_e, point) for point in LOW_ORDER),
        ]
        for alter in alterations:
            lean, reference = _altered_run(setup, target, alter)
            assert lean == reference


def test_lean_engine_fails_like_noiseprotocol_on_a_low_order_static_key() -> None:
    """IK message 1 carrying a low-order ``s``: its ``ss`` DH fails, ``rs`` is known."""
    for point in LOW_ORDER:
        outcomes = []
        for reference in (False, True):
            resp_static = _private(random.Random(3))
            init = NoiseHandshake(
                IK,
                initiator=True,
                static_private=_private(random.Random(4)),
                remote_static_public=_public(resp_static),
                reference=reference,
            )
            if reference:
                real = init._engine._hs.s  # type: ignore[union-attr]
                init._engine._hs.s = type(real)(  # type: ignore[union-attr]
                    private=real.private, public=real.public, public_bytes=point
                )
            else:
                init._engine._s_public = point  # type: ignore[union-attr]
            resp = NoiseHandshake(
                IK, initiator=False, static_private=resp_static, reference=reference
            )
            outcome = _outcome(resp, partial(resp.read_message, init.write_message(b"")))
            outcomes.append(outcome)
            assert outcome[:2] == ("failed", HandshakeFailed)
            assert resp.remote_static == point  # known although the read failed
        assert outcomes[0] == outcomes[1]


def test_out_of_turn_calls_fail_alike() -> None:
    for name in (XX, IK):
        for reference in (False, True):
            init, resp = Setup.random(name, 11).pair(reference=reference)
            expected = ("failed", HandshakeFailed, "out of turn")
            assert _outcome(init, partial(init.read_message, bytes(96)))[:3] == expected
            assert _outcome(resp, partial(resp.write_message, b""))[:3] == expected
