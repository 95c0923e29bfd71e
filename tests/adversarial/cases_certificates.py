"""Certificates (SPEC 25): hostile certificates presented to stalk, in both roles.

The listener side: every ``client`` row attacks the shared listener with
``authorities=`` (:data:`~.harness.TRUST`: one authority, serial 666 revoked; names
:data:`~.harness.ALLOW_NAMES` or groups :data:`~.harness.ALLOW_GROUPS` admitted), as the
initiator of an XX or an IK handshake with its real static key. The certificate rides in
the initiator's parameters (XX message 3, IK message 1); the listener must refuse it with
the certificate's own error before its application sees anything, answer
CERTIFICATE_REFUSED (13: a refusal verdict in IK, an authenticated CLOSE instead of READY
in XX), write nothing after that refusal, close the connection, and keep serving (the
harness's control client then presents a valid certificate).

The client side: every ``server`` row is a hostile server (by hand, as in
``cases_server.py``, with its real static key) whose message 2 presents the certificate
to :func:`stalk.connect` with ``authorities=`` :data:`~.harness.TRUST` (its revocation list
included) and ``expect_name=`` :data:`SERVER_NAME`, in XX and in IK. ``connect`` must raise
the certificate's own error, and the client must send nothing after message 2 (no XX
message 3, no IK READY: an initiator has no refusal of its own) and close the connection.
``connect`` checks a name only, no groups: the listener's rows about groups have no
client-side twin, and ``wrong_name`` is the client's own.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
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
from stalk.framing import encode_frame
from stalk.identity import Identity
from stalk.wire import CloseCode

from . import cases_server
from .attacks import CLEAN, LEGIT, play, row
from .harness import (
    CA,
    CERT_NOW,
    REVOKED_SERIAL,
    TEARDOWN,
    TRUST,
    Attack,
    Case,
    Expect,
    ServerPlay,
    ServerSide,
    Target,
    finish,
    valid_certificate,
)
from .peers import (
    Initiator,
    Refused,
    Responder,
    Wire,
    client_handshake,
    close,
    params,
    server_opening,
)

CATEGORY = "certificates"
#: The ``server`` rows' category.
SERVER_CATEGORY = "server-certificates"
#: An authority neither the listener nor the client trusts.
OTHER_CA = Authority.from_private_bytes(bytes(range(1, 33)))
#: The name on a hostile client's certificates (the listener admits it by group).
CLIENT_NAME = "client-2"
#: The name on a hostile server's certificates, and the one ``connect`` expects.
SERVER_NAME = "db-1"


def forge(identity: Identity, authority: Authority = CA, **overrides: Any) -> bytes:
    """A certificate built field by field with plain msgpack (any field hostile), signed.

    ``raw`` maps a field to the exact bytes to write for it instead.
    """
    fields: dict[str, Any] = {
        "version": 1,
        "serial": 7,
        "subject": identity.public.raw,
        "name": CLIENT_NAME,
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


def _tampered(me: Identity, name: str) -> bytes:
    """A valid certificate whose name was changed after signing (same length)."""
    good = valid_certificate(me, name).encoded
    other = name[:-1] + chr(ord(name[-1]) ^ 1)
    return forge(me, name=other)[:-66] + good[-66:]


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


#: How a hostile certificate is built from its presenter's identity and the name it
#: would bear if it were valid (``None``: no certificate at all).
Make = Callable[[Identity, str], bytes | None]

#: (id, what is presented, how to build it, stalk's error). Each certificate is wrong in
#: one way only: with the presenter's real key and the name its verifier accepts, it
#: fails exactly the check its row names.
HOSTILE: list[tuple[str, str, Make, type[CertificateError]]] = [
    ("missing", "no certificate at all", lambda me, name: None, CertificateMissing),
    (
        "expired",
        "a certificate that ended an hour ago (beyond the 300 s skew)",
        lambda me, name: (
            valid_certificate(
                me, name, not_before=CERT_NOW - 7200, not_after=CERT_NOW - 3600
            ).encoded
        ),
        CertificateExpired,
    ),
    (
        "not_yet_valid",
        "a certificate that starts in an hour",
        lambda me, name: (
            valid_certificate(
                me, name, not_before=CERT_NOW + 3600, not_after=CERT_NOW + 7200
            ).encoded
        ),
        CertificateNotYetValid,
    ),
    (
        "unknown_authority",
        "a certificate from an authority it does not trust",
        lambda me, name: (
            OTHER_CA.sign(
                me.public, name, ["clients"], not_before=CERT_NOW - 60, not_after=CERT_NOW + 60
            ).encoded
        ),
        UnknownAuthority,
    ),
    (
        "bad_signature",
        "a valid certificate with the last bit of its signature flipped",
        lambda me, name: _flip_last(valid_certificate(me, name).encoded),
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
        lambda me, name: valid_certificate(Identity.generate(), name).encoded,
        CertificateKeyMismatch,
    ),
    (
        "revoked",
        f"a certificate whose serial ({REVOKED_SERIAL}) the revocation list names",
        lambda me, name: valid_certificate(me, name, serial=REVOKED_SERIAL).encoded,
        CertificateRevoked,
    ),
    (
        "name_not_allowed",
        "a valid certificate for a name the listener does not admit, in no group",
        lambda me, name: valid_certificate(me, "mallory", groups=()).encoded,
        CertificateNameMismatch,
    ),
    (
        "group_not_allowed",
        "a valid certificate in groups the listener does not admit",
        lambda me, name: valid_certificate(me, "bob", groups=["admins", "guests"]).encoded,
        CertificateNameMismatch,
    ),
    (
        "wrong_name",
        f"a valid certificate for `db-2` (`connect` expects `{SERVER_NAME}`)",
        lambda me, name: valid_certificate(me, "db-2").encoded,
        CertificateNameMismatch,
    ),
    (
        "unknown_critical_extension",
        "a valid certificate with an unknown critical extension",
        lambda me, name: (
            valid_certificate(me, name, extensions=[Extension("x-unknown", True)]).encoded
        ),
        CertificateExtensionError,
    ),
    (
        "duplicate_extension",
        "a signed certificate with the same extension id twice",
        lambda me, name: forge(me, name=name, extensions=[["x", False, b""], ["x", False, b""]]),
        CertificateExtensionError,
    ),
    (
        "oversize",
        "a signed certificate of 2,260 bytes (limit 2,048)",
        lambda me, name: forge(me, name="n" * 2100),
        CertificateTooLarge,
    ),
    (
        "non_canonical_version",
        "a signed certificate with its version 1 written `cc 01` (not the shortest form)",
        lambda me, name: forge(me, name=name, raw={"version": b"\xcc\x01"}),
        NonCanonicalCertificate,
    ),
    (
        "groups_out_of_order",
        "a signed certificate with its groups not in increasing order",
        lambda me, name: forge(me, name=name, groups=["ops", "clients"]),
        NonCanonicalCertificate,
    ),
    (
        "malformed",
        "a 3-element array instead of a certificate",
        lambda me, name: b"\x92\x01\x02",
        MalformedCertificate,
    ),
    (
        "authority_as_subject",
        "a certificate signed by the trusted authority for its own key (X25519 form)",
        lambda me, name: forge(me, name=name, subject=_montgomery(CA.public.raw)),
        AuthorityAsSubject,
    ),
]
#: The rows about a listener's allowed names and groups (``connect`` has no such list).
LISTENER_ONLY = frozenset({"name_not_allowed", "group_not_allowed"})
#: The row about ``connect``'s expected name (a listener expects no one name).
CLIENT_ONLY = frozenset({"wrong_name"})


def _initiator(target: Target, me: Identity, *, ik: bool, certificate: bytes | None) -> Initiator:
    """An initiator whose parameters carry ``certificate`` (none: stalk's plain ones)."""
    payload = params() if certificate is None else params(certificate=certificate)
    if ik:
        return Initiator(server=target.server, identity=me, msg1_payload=payload)
    return Initiator(identity=me, msg3_payload=payload)


async def present(target: Target, *, ik: bool, make: Make) -> Attack:
    """Present a hostile certificate; expect the refusal and nothing after it.

    Should the listener accept it after all, the session ends with CLOSE and the row's
    ``established=False`` expectation fails.
    """
    me = Identity.generate()
    wire = await target.wire()
    try:
        transport = await client_handshake(
            wire, _initiator(target, me, ik=ik, certificate=make(me, CLIENT_NAME))
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


# -- the client side: a hostile server ----------------------------------------------------------


def _certified_responder(side: ServerSide, certificate: bytes | None) -> Responder:
    """A responder with the server's real key whose message 2 carries ``certificate``."""
    payload = params() if certificate is None else params(certificate=certificate)
    return Responder(identity=side.identity, msg2_payload=payload)


async def present_to_client(wire: Wire, side: ServerSide, *, make: Make) -> None:
    """Answer the opening with message 2 presenting ``make``'s certificate, then wait.

    No EOF and nothing more from us: stalk's client must close by itself, and everything
    it sends until then is the outcome's ``rest`` (SPEC 25: nothing).
    """
    opening = await server_opening(wire)
    assert opening is not None
    resp = _certified_responder(side, make(side.identity, SERVER_NAME))
    resp.start(opening[:8])
    assert resp.noise is not None
    resp.noise.read_message(opening[10:])
    await wire.send(b"\x00" + encode_frame(resp.msg2()))
    await side.finish(wire)


async def certified_server(wire: Wire, side: ServerSide) -> None:
    """A valid certificate in message 2: the client connects; two spacks, then CLOSE."""
    resp = _certified_responder(side, valid_certificate(side.identity, SERVER_NAME).encoded)
    await cases_server.handshake_then(wire, side, resp=resp, build=lambda t: t.seal(close()))


def _checking(behave: Callable[..., Any], *, ik: bool, **kwargs: Any) -> ServerPlay:
    """A :class:`ServerPlay` whose client requires a certificate for :data:`SERVER_NAME`."""
    bound = partial(behave, **kwargs) if kwargs else behave
    return ServerPlay(bound, ik=ik, authorities=TRUST, expect_name=SERVER_NAME)


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
        if case_id not in CLIENT_ONLY
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
    *[
        cases_server.row(
            f"{pattern}_{case_id}",
            SERVER_CATEGORY,
            f"{pattern.upper()} server whose message 2 presents {sends}",
            Expect(error, False, silent=True),
            _checking(present_to_client, ik=pattern == "ik", make=make),
        )
        for pattern in ("xx", "ik")
        for case_id, sends, make, error in HOSTILE
        if case_id not in LISTENER_ONLY
    ],
    *[
        cases_server.row(
            f"{pattern}_valid",
            SERVER_CATEGORY,
            f"{pattern.upper()} server presenting a valid certificate, two spacks, CLOSE",
            cases_server.CLEAN,
            _checking(certified_server, ik=pattern == "ik"),
        )
        for pattern in ("xx", "ik")
    ],
]
