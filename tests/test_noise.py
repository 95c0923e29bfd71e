"""Tests for stalk._noise: the noiseprotocol 0.3.1 traits it designs around, one test each.

The module docstring of :mod:`stalk._noise` lists the traits; every test here is named for
the trait it pins, so that a change of noiseprotocol (or of the wrapper) that breaks an
assumption fails a test that says which one. Every test runs twice: with stalk's lean
engine (what XX and IK use) and with noiseprotocol (``reference=True``), which must
behave alike (``tests/test_noise_lean.py`` compares their output byte for byte).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stalk._noise import (
    DHLEN,
    MAX_NOISE_MESSAGE,
    MAX_NONCE,
    MAX_PLAINTEXT,
    TAGLEN,
    HandshakeAuthenticationFailed,
    NoiseHandshake,
    TransportCipher,
)
from stalk.errors import (
    DecryptionFailed,
    HandshakeFailed,
    LocalProtocolError,
    NonceExhausted,
)
from stalk.identity import Identity

XX = "Noise_XX_25519_AESGCM_SHA256"
IK = "Noise_IK_25519_AESGCM_SHA256"
N_ONE_WAY = "Noise_N_25519_AESGCM_SHA256"


#: Whether the pairs below run noiseprotocol (``reference=True``); set by :func:`engine`.
REFERENCE = False


@pytest.fixture(autouse=True, params=["lean", "noiseprotocol"])
def engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with each engine behind NoiseHandshake."""
    global REFERENCE  # noqa: PLW0603 - the pair helpers read it
    REFERENCE = request.param == "noiseprotocol"
    try:
        yield request.param
    finally:
        REFERENCE = False


def new_private() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


@dataclass
class Pair:
    """An initiator and a responder, with the static private keys they were given."""

    init: NoiseHandshake
    resp: NoiseHandshake
    init_static: bytes
    resp_static: bytes


def xx_pair(*, init_prologue: bytes = b"", resp_prologue: bytes = b"") -> Pair:
    init_static, resp_static = new_private(), new_private()
    return Pair(
        NoiseHandshake(
            XX,
            initiator=True,
            prologue=init_prologue,
            static_private=init_static,
            reference=REFERENCE,
        ),
        NoiseHandshake(
            XX,
            initiator=False,
            prologue=resp_prologue,
            static_private=resp_static,
            reference=REFERENCE,
        ),
        init_static,
        resp_static,
    )


def ik_pair(
    *, pinned: bytes | None = None, init_prologue: bytes = b"", resp_prologue: bytes = b""
) -> Pair:
    """An IK pair; ``pinned`` is the responder key the initiator expects (default: the real one)."""
    init_static, resp_static = new_private(), new_private()
    return Pair(
        NoiseHandshake(
            IK,
            initiator=True,
            prologue=init_prologue,
            static_private=init_static,
            remote_static_public=pinned if pinned is not None else public_of(resp_static),
            reference=REFERENCE,
        ),
        NoiseHandshake(
            IK,
            initiator=False,
            prologue=resp_prologue,
            static_private=resp_static,
            reference=REFERENCE,
        ),
        init_static,
        resp_static,
    )


def handshake(pair: Pair) -> None:
    """Run the handshake to completion, alternating from the initiator."""
    writer, reader = pair.init, pair.resp
    while not (pair.init.complete and pair.resp.complete):
        reader.read_message(writer.write_message(b""))
        writer, reader = reader, writer


def transport(pair: Pair) -> tuple[TransportCipher, TransportCipher]:
    """Initiator-to-responder ciphers ``(send, receive)`` of a finished handshake."""
    handshake(pair)
    send, _ = pair.init.split()
    _, receive = pair.resp.split()
    return send, receive


# --- remote static key --------------------------------------------------------------------


def test_remote_static_needs_no_public_accessor_xx_both_sides() -> None:
    pair = xx_pair()
    assert pair.init.remote_static is None
    assert pair.resp.remote_static is None
    pair.resp.read_message(pair.init.write_message(b""))  # msg 1: -> e
    assert pair.resp.remote_static is None
    pair.init.read_message(pair.resp.write_message(b""))  # msg 2: <- e, ee, s, es
    assert pair.init.remote_static == public_of(pair.resp_static)
    assert pair.resp.remote_static is None
    pair.resp.read_message(pair.init.write_message(b""))  # msg 3: -> s, se
    # noiseprotocol has deleted its handshake state by now; our own reference outlives it.
    assert pair.init.complete
    assert pair.resp.complete
    assert pair.resp.remote_static == public_of(pair.init_static)
    assert pair.init.remote_static == public_of(pair.resp_static)


def test_remote_static_needs_no_public_accessor_ik_responder_after_msg1() -> None:
    pair = ik_pair()
    assert pair.init.remote_static == public_of(pair.resp_static)  # pinned beforehand
    assert pair.resp.remote_static is None
    pair.resp.read_message(pair.init.write_message(b""))  # msg 1: -> e, es, s, ss
    assert not pair.resp.complete
    assert pair.resp.remote_static == public_of(pair.init_static)
    pair.init.read_message(pair.resp.write_message(b""))
    assert pair.resp.remote_static == public_of(pair.init_static)
    assert pair.init.remote_static == public_of(pair.resp_static)


# --- plaintext cap ------------------------------------------------------------------------


def test_plaintext_cap_refuses_more_than_max_plaintext() -> None:
    send, _ = transport(xx_pair())
    with pytest.raises(ValueError, match="exceeds"):
        send.encrypt(bytes(MAX_PLAINTEXT + 1))
    assert send.nonce == 0  # nothing was consumed


def test_plaintext_cap_max_plaintext_gives_a_65535_byte_ciphertext() -> None:
    send, receive = transport(xx_pair())
    plaintext = bytes(range(256)) * (MAX_PLAINTEXT // 256) + bytes(MAX_PLAINTEXT % 256)
    assert len(plaintext) == MAX_PLAINTEXT
    ciphertext = send.encrypt(plaintext)
    assert len(ciphertext) == MAX_NOISE_MESSAGE == 65_535 == MAX_PLAINTEXT + TAGLEN
    assert receive.decrypt(ciphertext) == plaintext


# --- handshake failures are translated ----------------------------------------------------


def test_handshake_authentication_failure_is_handshake_failed_not_invalid_tag() -> None:
    pair = xx_pair()
    pair.resp.read_message(pair.init.write_message(b""))
    msg2 = bytearray(pair.resp.write_message(b"payload"))
    msg2[DHLEN + 1] ^= 0x01  # inside the encrypted static key
    with pytest.raises(HandshakeFailed) as caught:
        pair.init.read_message(bytes(msg2))
    assert isinstance(caught.value, HandshakeAuthenticationFailed)
    assert not isinstance(caught.value, InvalidTag)
    assert isinstance(caught.value.__cause__, InvalidTag)  # what noiseprotocol raised


def test_handshake_authentication_failure_ik_wrong_pinned_key() -> None:
    pair = ik_pair(pinned=public_of(new_private()))
    with pytest.raises(HandshakeAuthenticationFailed) as caught:
        pair.resp.read_message(pair.init.write_message(b""))
    assert isinstance(caught.value.__cause__, InvalidTag)


def _p(value: int) -> bytes:
    return value.to_bytes(32, "little")


_P = 2**255 - 19
_ORDER8_A = 325606250916557431795983626356110631294008115727848805560023387167927233504
_ORDER8_B = 39382357235489614581723060781553021112529911719440698176882885853963445705823

#: Curve25519 public keys that X25519 (RFC 7748) maps to a point of small order, so that the
#: shared secret is all zeros whatever the private key. These are libsodium's blocklist
#: (``has_small_order`` in crypto_scalarmult/curve25519/ref10/x25519_ref10.c), the first
#: seven values of D. J. Bernstein's list at cr.yp.to/ecdh.html: 0 and 1; the x-coordinates
#: of the two order-8 points; p-1 (order 2); and the non-canonical encodings p and p+1 of 0
#: and 1. RFC 7748 ignores bit 255 of a public key, so each value with bit 255 set is the
#: same point: libsodium rejects those too, and they are listed here (14 keys in all).
LOW_ORDER_BASE = {
    "0": _p(0),
    "1": _p(1),
    "order8a": _p(_ORDER8_A),
    "order8b": _p(_ORDER8_B),
    "p-1": _p(_P - 1),
    "p": _p(_P),
    "p+1": _p(_P + 1),
}
LOW_ORDER_POINTS = {
    **LOW_ORDER_BASE,
    **{
        f"{name}|2^255": _p(int.from_bytes(v, "little") | 2**255)
        for name, v in LOW_ORDER_BASE.items()
    },
}
#: cr.yp.to's list also has p+order8a, p+order8b, 2p-1, 2p and 2p+1, which are >= 2**255: they
#: matter only to implementations that do not clear bit 255. Under RFC 7748 they decode to
#: other, ordinary points (the value minus 2**255), so they are not rejected and not tested
#: as invalid; ``test_cr_yp_to_values_above_2_255_are_ordinary_points_under_rfc7748`` pins it.
ABOVE_2_255 = {
    "p+order8a": _p(_P + _ORDER8_A),
    "p+order8b": _p(_P + _ORDER8_B),
    "2p-1": _p(2 * _P - 1),
    "2p": _p(2 * _P),
    "2p+1": _p(2 * _P + 1),
}


def test_low_order_point_list_is_what_x25519_rejects() -> None:
    assert len(LOW_ORDER_POINTS) == 14
    private = X25519PrivateKey.generate()
    for point in LOW_ORDER_POINTS.values():
        with pytest.raises(ValueError, match="shared key"):  # the all-zero shared secret
            private.exchange(X25519PublicKey.from_public_bytes(point))


def test_cr_yp_to_values_above_2_255_are_ordinary_points_under_rfc7748() -> None:
    private = X25519PrivateKey.generate()
    for point in ABOVE_2_255.values():
        assert private.exchange(X25519PublicKey.from_public_bytes(point)) != bytes(32)


@pytest.mark.parametrize("point", LOW_ORDER_POINTS.values(), ids=LOW_ORDER_POINTS.keys())
def test_low_order_ephemeral_in_ik_msg1_is_handshake_failed_not_value_error(point: bytes) -> None:
    pair = ik_pair()
    msg1 = point + pair.init.write_message(b"")[DHLEN:]
    with pytest.raises(HandshakeFailed) as caught:
        pair.resp.read_message(msg1)  # es = DH(s, re) fails at once
    assert not isinstance(caught.value, ValueError)
    assert isinstance(caught.value.__cause__, ValueError)  # what cryptography raised


@pytest.mark.parametrize("point", LOW_ORDER_POINTS.values(), ids=LOW_ORDER_POINTS.keys())
def test_low_order_ephemeral_in_xx_msg1_is_handshake_failed_not_value_error(point: bytes) -> None:
    pair = xx_pair()
    pair.init.write_message(b"")
    # XX message 1 is just "e": reading it does no DH, so the responder's first DH (ee, as it
    # writes message 2) is where the low-order key is caught. No message 2 is produced.
    pair.resp.read_message(point)
    with pytest.raises(HandshakeFailed) as caught:
        pair.resp.write_message(b"")
    assert not isinstance(caught.value, ValueError)
    assert isinstance(caught.value.__cause__, ValueError)


@pytest.mark.parametrize("point", LOW_ORDER_POINTS.values(), ids=LOW_ORDER_POINTS.keys())
def test_low_order_ephemeral_in_xx_msg2_is_handshake_failed_not_value_error(point: bytes) -> None:
    pair = xx_pair()
    pair.resp.read_message(pair.init.write_message(b""))
    msg2 = point + pair.resp.write_message(b"")[DHLEN:]
    with pytest.raises(HandshakeFailed) as caught:
        pair.init.read_message(msg2)
    assert not isinstance(caught.value, ValueError)


def test_out_of_turn_read_is_handshake_failed() -> None:
    pair = xx_pair()
    with pytest.raises(HandshakeFailed):
        pair.init.read_message(bytes(DHLEN))  # the initiator must write first


def test_out_of_turn_write_is_handshake_failed() -> None:
    pair = xx_pair()
    with pytest.raises(HandshakeFailed):
        pair.resp.write_message(b"")  # the responder must read first


def test_write_or_read_after_the_handshake_is_handshake_failed() -> None:
    pair = xx_pair()
    handshake(pair)
    with pytest.raises(HandshakeFailed, match="complete"):
        pair.init.write_message(b"")
    with pytest.raises(HandshakeFailed, match="complete"):
        pair.resp.read_message(bytes(64))


def test_failed_handshake_is_fatal_even_though_noiseprotocol_would_continue() -> None:
    pair = xx_pair()
    pair.resp.read_message(pair.init.write_message(b""))
    msg2 = bytearray(pair.resp.write_message(b""))
    msg2[-1] ^= 0x01
    with pytest.raises(HandshakeFailed):
        pair.init.read_message(bytes(msg2))
    # noiseprotocol has popped message 2's pattern and would now write message 3.
    with pytest.raises(HandshakeFailed, match="already failed"):
        pair.init.write_message(b"")
    assert not pair.init.complete
    with pytest.raises(HandshakeFailed):
        pair.init.split()


def test_unsupported_protocol_is_handshake_failed() -> None:
    for name in ("Noise_XX1_25519_AESGCM_SHA256", "Noise_XX_25519_AESGCM_MD5", "Noise_YY"):
        with pytest.raises(HandshakeFailed, match="cannot set up"):
            NoiseHandshake(name, initiator=True, static_private=new_private(), reference=REFERENCE)


def test_missing_static_key_is_handshake_failed() -> None:
    with pytest.raises(HandshakeFailed, match="cannot set up"):
        NoiseHandshake(XX, initiator=True, reference=REFERENCE)


# --- fixed ephemeral ----------------------------------------------------------------------


def test_fixed_ephemeral_emits_no_user_warning() -> None:
    ephemeral = new_private()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        init = NoiseHandshake.fixed_ephemeral_for_testing_only(
            XX,
            ephemeral_private=ephemeral,
            initiator=True,
            static_private=new_private(),
            reference=REFERENCE,
        )
        msg1 = init.write_message(b"")
    assert caught == []
    assert msg1[:DHLEN] == public_of(ephemeral)  # and it is really used


def test_fixed_ephemeral_warning_filter_does_not_leak() -> None:
    NoiseHandshake.fixed_ephemeral_for_testing_only(
        XX,
        ephemeral_private=new_private(),
        initiator=True,
        static_private=new_private(),
        reference=REFERENCE,
    )
    with pytest.warns(UserWarning, match="still active"):
        warnings.warn("still active", UserWarning, stacklevel=1)


# --- transport ciphers --------------------------------------------------------------------


def test_transport_decrypt_failure_does_not_advance_the_nonce() -> None:
    send, receive = transport(xx_pair())
    genuine = send.encrypt(b"hello")
    tampered = bytearray(genuine)
    tampered[0] ^= 0x80
    with pytest.raises(DecryptionFailed) as caught:
        receive.decrypt(bytes(tampered))
    assert isinstance(caught.value.__cause__, InvalidTag)
    with pytest.raises(DecryptionFailed):
        receive.decrypt(genuine[: TAGLEN - 1])  # too short to carry a tag
    assert receive.nonce == 0
    assert receive.decrypt(genuine) == b"hello"
    assert receive.nonce == 1


def test_nonce_exhaustion_raises_at_2_64_minus_1_and_never_wraps() -> None:
    send, receive = transport(xx_pair())
    send.set_nonce_for_testing_only(MAX_NONCE - 1)
    receive.set_nonce_for_testing_only(MAX_NONCE - 1)
    assert receive.decrypt(send.encrypt(b"last")) == b"last"  # nonce 2**64-2 is the last one
    assert send.nonce == receive.nonce == MAX_NONCE == 2**64 - 1
    for _ in range(2):
        with pytest.raises(NonceExhausted):
            send.encrypt(b"one too many")
        with pytest.raises(NonceExhausted):
            receive.decrypt(bytes(TAGLEN + 4))
    assert send.nonce == receive.nonce == MAX_NONCE  # not wrapped to 0


def test_rekey_on_both_sides_keeps_them_in_step_and_changes_the_ciphertext() -> None:
    send, receive = transport(xx_pair())
    before = send.encrypt(b"same plaintext")
    assert receive.decrypt(before) == b"same plaintext"
    send.rekey()
    receive.rekey()
    assert send.nonce == receive.nonce == 1  # Rekey() does not reset the nonce
    send.set_nonce_for_testing_only(0)
    assert send.encrypt(b"same plaintext") != before  # same nonce, new key
    send.set_nonce_for_testing_only(1)
    after = send.encrypt(b"same plaintext")
    assert receive.decrypt(after) == b"same plaintext"


def test_rekey_on_one_side_only_breaks_decryption() -> None:
    send, receive = transport(xx_pair())
    send.rekey()
    with pytest.raises(DecryptionFailed):
        receive.decrypt(send.encrypt(b"x"))


def test_one_way_pattern_discarded_direction_is_local_protocol_error() -> None:
    resp_static = new_private()
    init = NoiseHandshake(N_ONE_WAY, initiator=True, remote_static_public=public_of(resp_static))
    resp = NoiseHandshake(N_ONE_WAY, initiator=False, static_private=resp_static)
    assert resp.read_message(init.write_message(b"one way")) == b"one way"
    init_send, init_receive = init.split()
    resp_send, resp_receive = resp.split()
    assert resp_receive.decrypt(init_send.encrypt(b"data")) == b"data"
    for unused in (init_receive, resp_send):
        with pytest.raises(LocalProtocolError):
            unused.encrypt(b"x")
        with pytest.raises(LocalProtocolError):
            unused.decrypt(bytes(TAGLEN))
        with pytest.raises(LocalProtocolError):
            unused.rekey()


# --- handshake hash and prologue ----------------------------------------------------------


@pytest.mark.parametrize("make", [xx_pair, ik_pair], ids=["XX", "IK"])
def test_handshake_hash_is_equal_on_both_sides_and_32_bytes(make: Callable[[], Pair]) -> None:
    pair = make()
    with pytest.raises(HandshakeFailed):
        _ = pair.init.handshake_hash
    handshake(pair)
    assert pair.init.handshake_hash == pair.resp.handshake_hash
    assert len(pair.init.handshake_hash) == 32


def test_wrong_prologue_on_one_side_fails_the_handshake_xx() -> None:
    pair = xx_pair(init_prologue=b"stalk v1", resp_prologue=b"stalk v2")
    pair.resp.read_message(pair.init.write_message(b""))  # cleartext: nothing to check yet
    with pytest.raises(HandshakeAuthenticationFailed):
        pair.init.read_message(pair.resp.write_message(b""))


def test_wrong_prologue_on_one_side_fails_the_handshake_ik() -> None:
    pair = ik_pair(init_prologue=b"stalk v1", resp_prologue=b"")
    with pytest.raises(HandshakeAuthenticationFailed):
        pair.resp.read_message(pair.init.write_message(b""))


def test_transport_rekey_matches_the_noise_spec_independently() -> None:
    """REKEY per Noise §4.2, computed here with cryptography alone (no stalk code).

    The key comes from noiseprotocol's own CipherState; the lean engine's keys are the same
    (``tests/test_noise_lean.py``).
    """
    alice, bob = Identity.generate(), Identity.generate()
    init = NoiseHandshake(
        "Noise_IK_25519_AESGCM_SHA256",
        initiator=True,
        static_private=alice.private_bytes(),
        remote_static_public=bob.public.raw,
        reference=True,
    )
    resp = NoiseHandshake(
        "Noise_IK_25519_AESGCM_SHA256",
        initiator=False,
        static_private=bob.private_bytes(),
        reference=True,
    )
    resp.read_message(init.write_message(b""))
    init.read_message(resp.write_message(b""))
    send, _ = init.split()
    key = init._engine._conn.noise_protocol.cipher_state_encrypt.k  # type: ignore[union-attr]
    first = send.encrypt(b"one")
    send.rekey()
    second = send.encrypt(b"two")
    nonce = b"\x00\x00\x00\x00" + (2**64 - 1).to_bytes(8, "big")
    new_key = AESGCM(key).encrypt(nonce, bytes(32), b"")[:32]
    assert first == AESGCM(key).encrypt(bytes(4) + (0).to_bytes(8, "big"), b"one", None)
    # The nonce is not reset by Rekey(): the second message uses n = 1 under the new key.
    assert second == AESGCM(new_key).encrypt(bytes(4) + (1).to_bytes(8, "big"), b"two", None)
