"""Certificates (SPEC 25): hostile certificates presented to a listener that requires them.

Every row attacks the shared listener with ``authorities=`` (:data:`~.harness.TRUST`: one
authority, serial 666 revoked; names :data:`~.harness.ALLOW_NAMES` or groups
:data:`~.harness.ALLOW_GROUPS` admitted), as the initiator of an XX or an IK handshake
with its real static key. The certificate rides in the initiator's parameters (XX message
3, IK message 1); the listener must refuse it with the certificate's own error before its
application sees anything, answer CERTIFICATE_REFUSED (13: a refusal verdict in IK, an
authenticated CLOSE instead of READY in XX), write nothing after that refusal, close the
connection, and keep serving (the harness's control client then presents a valid
certificate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import msgpack

from stalk.certificates import CERTIFICATE_CONTEXT, Authority, Extension, _montgomery
from stalk.errors import (
    AuthorityAsSubject,
    BadCertificateSignature,
    CertificateError,
    CertificateExpired,
    CertificateExtensionError,
    CertificateKeyMismatch,
    CertificateMissing,
    CertificateNameMismatch,
    CertificateNotYetValid,
    CertificateRevoked,
    CertificateTooLarge,
    MalformedCertificate,
    NonCanonicalCertificate,
    UnknownAuthority,
)
from stalk.identity import Identity
from stalk.wire import CloseCode

from .attacks import CLEAN, LEGIT, play, row
from .harness import (
    CA,
    CERT_NOW,
    REVOKED_SERIAL,
    TEARDOWN,
    Attack,
    Case,
    Expect,
    Target,
    finish,
    valid_certificate,
)
from .peers import Initiator, Refused, client_handshake, close, params

CATEGORY = "certificates"
#: An authority the listener does not trust.
OTHER_CA = Authority.from_private_bytes(bytes(range(1, 33)))


def forge(identity: Identity, authority: Authority = CA, **overrides: Any) -> bytes:
    """A certificate built field by field with plain msgpack (any field hostile), signed.

    ``raw`` maps a field to the exact bytes to write for it instead.
    """
    fields: dict[str, Any] = {
        "version": 1,
        "serial": 7,
        "subject": identity.public.raw,
        "name": "client-2",
        "groups": ["clients"],
        "not_before": CERT_NOW - 60,
        "not_after": CERT_NOW + 86_400,
        "issuer": authority.public.digest,
        "extensions": [],
    }
    raw: dict[str, bytes] = overrides.pop("raw", {})
    fields.update(overrides)
    body = b"\x9a" + b"".join(
        raw.get(name) or msgpack.packb(value, use_bin_type=True) for name, value in fields.items()
    )
    return body + msgpack.packb(authority.sign_bytes(CERTIFICATE_CONTEXT, body), use_bin_type=True)


def _tampered(me: Identity) -> bytes:
    """A valid certificate whose name was changed after signing (same length)."""
    good = valid_certificate(me).encoded
    return forge(me, name="client-9")[:-66] + good[-66:]


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


#: (id, what is presented, how to build it from the presenter's identity, stalk's error).
HOSTILE: list[tuple[str, str, Callable[[Identity], bytes | None], type[CertificateError]]] = [
    ("missing", "no certificate at all", lambda me: None, CertificateMissing),
    (
        "expired",
        "a certificate that ended an hour ago (beyond the 300 s skew)",
        lambda me: (
            valid_certificate(me, not_before=CERT_NOW - 7200, not_after=CERT_NOW - 3600).encoded
        ),
        CertificateExpired,
    ),
    (
        "not_yet_valid",
        "a certificate that starts in an hour",
        lambda me: (
            valid_certificate(me, not_before=CERT_NOW + 3600, not_after=CERT_NOW + 7200).encoded
        ),
        CertificateNotYetValid,
    ),
    (
        "unknown_authority",
        "a certificate from an authority the listener does not trust",
        lambda me: (
            OTHER_CA.sign(
                me.public,
                "client-2",
                ["clients"],
                not_before=CERT_NOW - 60,
                not_after=CERT_NOW + 60,
            ).encoded
        ),
        UnknownAuthority,
    ),
    (
        "bad_signature",
        "a valid certificate with the last bit of its signature flipped",
        lambda me: _flip_last(valid_certificate(me).encoded),
        BadCertificateSignature,
    ),
    (
        "tampered_name",
        "a valid certificate whose name was changed after signing",
        _tampered,
        BadCertificateSignature,
    ),
    (
        "for_another_key",
        "a valid certificate for another stalk key (replayed)",
        lambda me: valid_certificate(Identity.generate()).encoded,
        CertificateKeyMismatch,
    ),
    (
        "revoked",
        f"a certificate whose serial ({REVOKED_SERIAL}) the revocation list names",
        lambda me: valid_certificate(me, serial=REVOKED_SERIAL).encoded,
        CertificateRevoked,
    ),
    (
        "name_not_allowed",
        "a valid certificate for a name the listener does not admit, in no group",
        lambda me: valid_certificate(me, name="mallory", groups=()).encoded,
        CertificateNameMismatch,
    ),
    (
        "group_not_allowed",
        "a valid certificate in groups the listener does not admit",
        lambda me: valid_certificate(me, name="bob", groups=["admins", "guests"]).encoded,
        CertificateNameMismatch,
    ),
    (
        "unknown_critical_extension",
        "a valid certificate with an unknown critical extension",
        lambda me: valid_certificate(me, extensions=[Extension("x-unknown", True)]).encoded,
        CertificateExtensionError,
    ),
    (
        "duplicate_extension",
        "a signed certificate with the same extension id twice",
        lambda me: forge(me, extensions=[["x", False, b""], ["x", False, b""]]),
        CertificateExtensionError,
    ),
    (
        "oversize",
        "a signed certificate of 2,260 bytes (limit 2,048)",
        lambda me: forge(me, name="n" * 2100),
        CertificateTooLarge,
    ),
    (
        "non_canonical_version",
        "a signed certificate with its version 1 written `cc 01` (not the shortest form)",
        lambda me: forge(me, raw={"version": b"\xcc\x01"}),
        NonCanonicalCertificate,
    ),
    (
        "groups_out_of_order",
        "a signed certificate with its groups not in increasing order",
        lambda me: forge(me, groups=["ops", "clients"]),
        NonCanonicalCertificate,
    ),
    (
        "malformed",
        "a 3-element array instead of a certificate",
        lambda me: b"\x92\x01\x02",
        MalformedCertificate,
    ),
    (
        "authority_as_subject",
        "a certificate signed by the trusted authority for its own key (X25519 form)",
        lambda me: forge(me, subject=_montgomery(CA.public.raw)),
        AuthorityAsSubject,
    ),
]


def _initiator(target: Target, me: Identity, *, ik: bool, certificate: bytes | None) -> Initiator:
    """An initiator whose parameters carry ``certificate`` (none: stalk's plain ones)."""
    payload = params() if certificate is None else params(certificate=certificate)
    if ik:
        return Initiator(server=target.server, identity=me, msg1_payload=payload)
    return Initiator(identity=me, msg3_payload=payload)


async def present(target: Target, *, ik: bool, make: Callable[[Identity], bytes | None]) -> Attack:
    """Present a hostile certificate; expect the refusal and nothing after it.

    Should the listener accept it after all, the session ends with CLOSE and the row's
    ``established=False`` expectation fails.
    """
    me = Identity.generate()
    wire = await target.wire()
    try:
        transport = await client_handshake(
            wire, _initiator(target, me, ik=ik, certificate=make(me))
        )
    except Refused as refused:
        rest = b""
        with anyio.move_on_after(TEARDOWN):
            rest = await wire.read_to_eof()  # IK: the reason was the verdict's rest
        attack = await finish(wire)
        if ik:
            reason = wire.received[2:]
            assert wire.received[1] == len(reason), "bytes after the refusal verdict"
        else:
            assert rest == b"", f"{len(rest)} bytes after the refusal CLOSE"
        attack.code = refused.code
        return attack
    await wire.send(transport.seal(close()))
    return await finish(wire, transport)


async def certified_session(target: Target, *, ik: bool) -> Attack:
    """A valid certificate by hand: the listener admits it, two spacks, then CLOSE."""
    me = Identity.generate()
    wire = await target.wire()
    init = _initiator(target, me, ik=ik, certificate=valid_certificate(me).encoded)
    transport = await client_handshake(wire, init)
    for spack in LEGIT:
        await wire.send(transport.spacks(spack))
    await wire.send(transport.seal(close()))
    return await finish(wire, transport, legit=list(LEGIT))


def _refused(error: type[CertificateError]) -> Expect:
    return Expect(error, False, code=CloseCode.CERTIFICATE_REFUSED)


CASES: list[Case] = [
    *[
        row(
            CATEGORY,
            "client",
            f"{pattern}_{case_id}",
            f"{pattern.upper()} initiator presenting {sends}",
            _refused(error),
            play(present, ik=pattern == "ik", make=make),
            certified=True,
        )
        for pattern in ("xx", "ik")
        for case_id, sends, make, error in HOSTILE
    ],
    *[
        row(
            CATEGORY,
            "client",
            f"{pattern}_valid",
            f"{pattern.upper()} initiator presenting a valid certificate, two spacks, CLOSE",
            CLEAN,
            play(certified_session, ik=pattern == "ik"),
            certified=True,
        )
        for pattern in ("xx", "ik")
    ],
]
