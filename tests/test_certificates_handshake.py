"""Certificates in the handshake (SPEC "Certificates in the handshake").

Every hostile certificate is presented in both roles (the initiator's checked by the
responder, the responder's by the initiator), in XX and in IK: first to the sans-IO
sessions byte by byte, then through the anyio layer on both backends. The side that checks
refuses with the certificate's own error class; a responder tells the initiator with
CERTIFICATE_REFUSED and a reason that names no one, an initiator sends nothing more.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import msgpack
import pytest

import stalk
from helpers import byte_stream_pair, take_all
from stalk import handshake
from stalk.certificates import (
    CERTIFICATE_CONTEXT,
    Authorities,
    Authority,
    Certificate,
    CertificatePolicy,
    CertifiedIdentity,
    Extension,
    _montgomery,
)
from stalk.connection import Connection, StalkAttribute
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
    HandshakeFailed,
    MalformedCertificate,
    NonCanonicalCertificate,
    PeerRefused,
    UnknownAuthority,
)
from stalk.events import NEED_DATA, PAUSED, Event, HandshakeComplete, PeerIdentified
from stalk.framing import FrameReader, Refusal
from stalk.identity import Identity
from stalk.session import Role, Session
from stalk.wire import CloseCode

#: The real time at import: the anyio layer checks certificates against the system clock,
#: and every certificate here is valid for an hour around it (or hostile on purpose).
NOW = int(time.time())
CA = Authority.from_private_bytes(bytes(range(32)))
OTHER_CA = Authority.from_private_bytes(bytes(range(1, 33)))
CLIENT = Identity.from_private_bytes(bytes(range(64, 96)))
SERVER = Identity.from_private_bytes(bytes(range(96, 128)))
STRANGER = Identity.from_private_bytes(bytes(range(128, 160)))
TRUST = Authorities([CA.public])
NAMES = {CLIENT: "alice", SERVER: "db-1", STRANGER: "mallory"}
GROUPS = {CLIENT: ["ops"], SERVER: ["db"], STRANGER: ["ops"]}


def certificate(identity: Identity, authority: Authority = CA, **kwargs: Any) -> Certificate:
    """A valid certificate for ``identity`` around NOW (with overrides)."""
    args: dict[str, Any] = {
        "not_before": NOW - 60,
        "not_after": NOW + 3600,
        "serial": 7,
        "groups": GROUPS[identity],
    }
    args.update(kwargs)
    return authority.sign(identity.public, NAMES[identity], **args)


def forge(identity: Identity, authority: Authority = CA, **overrides: Any) -> bytes:
    """A certificate for ``identity`` built field by field (any field hostile), signed."""
    fields: dict[str, Any] = {
        "version": 1,
        "serial": 7,
        "subject": identity.public.raw,
        "name": NAMES[identity],
        "groups": GROUPS[identity],
        "not_before": NOW - 60,
        "not_after": NOW + 3600,
        "issuer": authority.public.digest,
        "extensions": [],
    }
    fields.update(overrides)
    raw = overrides.pop("raw", {})
    body = b"\x9a" + b"".join(
        raw.get(name) or msgpack.packb(value, use_bin_type=True)
        for name, value in fields.items()
        if name != "raw"
    )
    return body + msgpack.packb(authority.sign_bytes(CERTIFICATE_CONTEXT, body), use_bin_type=True)


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _tampered(identity: Identity) -> bytes:
    """A valid certificate whose name was changed after signing."""
    good = certificate(identity).to_bytes()
    return forge(identity, name="root")[:-66] + good[-66:]


@dataclass(frozen=True)
class Hostile:
    """What a hostile presenter sends, what the checker requires, what it must raise."""

    error: type[CertificateError]
    present: Callable[[Identity], bytes | None]
    policy: dict[str, Any] = field(default_factory=dict)


HOSTILE: dict[str, Hostile] = {
    "missing": Hostile(CertificateMissing, lambda who: None),
    "too_large": Hostile(CertificateTooLarge, lambda who: forge(who, name="n" * 2100)),
    "malformed": Hostile(MalformedCertificate, lambda who: b"\x92\x01\x02"),
    "non_canonical": Hostile(
        NonCanonicalCertificate, lambda who: forge(who, raw={"version": b"\xcc\x01"})
    ),
    "unknown_authority": Hostile(
        UnknownAuthority, lambda who: certificate(who, OTHER_CA).to_bytes()
    ),
    "bad_signature": Hostile(
        BadCertificateSignature, lambda who: _flip_last(certificate(who).to_bytes())
    ),
    "tampered_field": Hostile(BadCertificateSignature, _tampered),
    "authority_as_subject": Hostile(
        AuthorityAsSubject, lambda who: forge(who, subject=_montgomery(CA.public.raw))
    ),
    "duplicate_extension": Hostile(
        CertificateExtensionError,
        lambda who: forge(who, extensions=[["x", False, b""], ["x", False, b""]]),
    ),
    "unknown_critical_extension": Hostile(
        CertificateExtensionError,
        lambda who: certificate(who, extensions=[Extension("x-only", True)]).to_bytes(),
    ),
    "not_yet_valid": Hostile(
        CertificateNotYetValid,
        lambda who: certificate(who, not_before=NOW + 3600, not_after=NOW + 7200).to_bytes(),
    ),
    "expired": Hostile(
        CertificateExpired,
        lambda who: certificate(who, not_before=NOW - 7200, not_after=NOW - 3600).to_bytes(),
    ),
    "revoked": Hostile(
        CertificateRevoked,
        lambda who: certificate(who).to_bytes(),
        {"authorities": Authorities([CA.public], [CA.revoke([7], issued_at=NOW)])},
    ),
    "for_another_key": Hostile(
        CertificateKeyMismatch, lambda who: certificate(STRANGER).to_bytes()
    ),
    "wrong_name": Hostile(
        CertificateNameMismatch,
        lambda who: certificate(who).to_bytes(),
        {"names": frozenset({"someone-else"})},
    ),
    "wrong_group": Hostile(
        CertificateNameMismatch,
        lambda who: certificate(who).to_bytes(),
        {"groups": frozenset({"admin"})},
    ),
}


def policy(**kwargs: Any) -> CertificatePolicy:
    args: dict[str, Any] = {"authorities": TRUST, "clock": lambda: NOW}
    args.update(kwargs)
    return CertificatePolicy(**args)


# -- sans-IO --------------------------------------------------------------------------------


@dataclass
class Run:
    """Two sessions driven until neither moves, with what each raised and wrote."""

    client: Session
    server: Session
    events: dict[Session, list[Event]] = field(default_factory=dict)
    errors: dict[Session, Exception] = field(default_factory=dict)
    writes: dict[Session, list[bytes]] = field(default_factory=dict)

    def go(self) -> Run:
        moved = True
        while moved:
            moved = False
            for src, dst in ((self.client, self.server), (self.server, self.client)):
                data = take_all(src)
                if not data:
                    continue
                moved = True
                self.writes.setdefault(src, []).append(data)
                if dst not in self.errors:
                    dst.receive_data(data)
                    self._collect(dst)
        return self

    def _collect(self, session: Session) -> None:
        seen = self.events.setdefault(session, [])
        try:
            while (event := session.next_event()) is not NEED_DATA:
                if event is PAUSED:
                    continue
                seen.append(event)
                if isinstance(event, PeerIdentified):
                    session.accept()
        except Exception as exc:
            self.errors[session] = exc


def sessions(
    *,
    ik: bool,
    client_cert: Certificate | bytes | None = None,
    server_cert: Certificate | bytes | None = None,
    client_policy: CertificatePolicy | None = None,
    server_policy: CertificatePolicy | None = None,
) -> Run:
    client = Session(
        Role.INITIATOR,
        CLIENT,
        peer=SERVER.public if ik else None,
        certificate=client_cert,
        certificate_policy=client_policy,
    )
    server = Session(
        Role.RESPONDER, SERVER, certificate=server_cert, certificate_policy=server_policy
    )
    return Run(client, server).go()


def complete(events: list[Event]) -> HandshakeComplete:
    done = [e for e in events if isinstance(e, HandshakeComplete)]
    assert len(done) == 1, events
    return done[0]


@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
def test_both_sides_certified(ik: bool) -> None:
    run = sessions(
        ik=ik,
        client_cert=certificate(CLIENT),
        server_cert=certificate(SERVER),
        client_policy=policy(names=frozenset({"db-1"})),
        server_policy=policy(groups=frozenset({"ops"})),
    )
    assert run.errors == {}
    identified = [e for e in run.events[run.server] if isinstance(e, PeerIdentified)]
    assert isinstance(identified[0].peer, CertifiedIdentity)
    assert identified[0].peer.name == "alice"  # what authorize sees, before READY
    server_side = complete(run.events[run.server]).peer
    client_side = complete(run.events[run.client]).peer
    assert isinstance(server_side, CertifiedIdentity)
    assert isinstance(client_side, CertifiedIdentity)
    assert (server_side.name, server_side.groups) == ("alice", ("ops",))
    assert client_side.certificate == certificate(SERVER)
    assert run.server.peer_certificate == certificate(CLIENT)
    assert run.client.peer_certificate == certificate(SERVER)


@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
def test_certificates_without_a_policy_are_ignored(ik: bool) -> None:
    """Without authorities nothing the peer presents is believed: it works as before."""
    run = sessions(ik=ik, client_cert=certificate(CLIENT), server_cert=b"not a certificate")
    assert run.errors == {}
    assert type(complete(run.events[run.client]).peer) is stalk.PublicIdentity
    assert type(complete(run.events[run.server]).peer) is stalk.PublicIdentity
    assert run.client.peer_certificate is None
    assert run.server.peer_certificate is None


def test_a_certificate_for_another_key_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="the certificate is for"):
        Session(Role.INITIATOR, CLIENT, certificate=certificate(SERVER))


def _refusal_or_close(run: Run) -> tuple[int, str]:
    """The code and reason the client was told: a refusal (IK) or a CLOSE (XX)."""
    error = run.errors[run.client]
    assert isinstance(error, PeerRefused), error
    return error.code, error.reason


@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
@pytest.mark.parametrize("case", HOSTILE)
def test_responder_refuses_a_hostile_initiator_certificate(case: str, ik: bool) -> None:
    hostile = HOSTILE[case]
    run = sessions(
        ik=ik,
        client_cert=hostile.present(CLIENT),
        server_policy=policy(**hostile.policy),
    )
    error = run.errors[run.server]
    assert type(error) is hostile.error, error
    assert error.close_code == CloseCode.CERTIFICATE_REFUSED
    code, reason = _refusal_or_close(run)
    assert code == CloseCode.CERTIFICATE_REFUSED
    assert reason == hostile.error.peer_reason  # names no one: an IK refusal is cleartext
    # authorize never ran, and nothing was established on either side.
    assert not any(isinstance(e, PeerIdentified) for e in run.events.get(run.server, []))
    assert run.server.peer is None
    assert not any(isinstance(e, HandshakeComplete) for e in run.events.get(run.client, []))
    if ik:
        # Refused from message 1, before any DH on an answer: a refusal, no message 2.
        answer = b"".join(run.writes[run.server])
        reader = FrameReader()
        reader.feed(answer)
        verdict = reader.verdict()
        assert isinstance(verdict, Refusal)
        assert len(answer) == 2 + len(reason)


@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
@pytest.mark.parametrize("case", HOSTILE)
def test_initiator_refuses_a_hostile_responder_certificate(case: str, ik: bool) -> None:
    hostile = HOSTILE[case]
    run = sessions(
        ik=ik,
        server_cert=hostile.present(SERVER),
        client_policy=policy(**hostile.policy),
    )
    error = run.errors[run.client]
    assert type(error) is hostile.error, error
    # The initiator sent its opening and nothing after message 2: in XX its static key and
    # certificate never went to this responder; in IK no READY confirmed anything.
    assert len(run.writes[run.client]) == 1
    assert run.server not in run.errors  # it waits: EOF will end it
    assert not any(isinstance(e, HandshakeComplete) for e in run.events.get(run.server, []))
    assert run.client.peer is None


@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
def test_a_certificate_that_is_not_bin_is_a_protocol_error(
    ik: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``certificate`` is a known key, typed strictly: a str there is a malformed payload."""
    fields = msgpack.unpackb(handshake.encode_params(1 << 20))
    fields["certificate"] = "a string"
    with monkeypatch.context() as patch:  # the client's parameters, as it encodes them
        patch.setattr(handshake, "encode_params", lambda *_a, **_k: msgpack.packb(fields))
        client = Session(Role.INITIATOR, CLIENT, peer=SERVER.public if ik else None)
    server = Session(Role.RESPONDER, SERVER, certificate_policy=policy())
    run = Run(client, server).go()
    error = run.errors[server]
    assert type(error) is HandshakeFailed
    assert "certificate is of type str, not bin" in str(error)
    assert _refusal_or_close(run)[0] == CloseCode.PROTOCOL_ERROR


# -- the anyio layer, both backends ------------------------------------------------------------


async def _wrap_pair(
    *,
    ik: bool,
    client: dict[str, Any],
    server: dict[str, Any],
    config: stalk.Config | None = None,
) -> tuple[Connection | BaseException, Connection | BaseException]:
    """Both ends of a handshake over memory streams: each connection, or what it raised."""
    a, b = byte_stream_pair()
    results: dict[str, Connection | BaseException] = {}
    config = config or stalk.Config(handshake_timeout=5)

    async def side(name: str, stream: Any, kwargs: dict[str, Any]) -> None:
        try:
            results[name] = await Connection.wrap(stream, config=config, **kwargs)
        except Exception as exc:
            results[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(
            side,
            "client",
            a,
            {"identity": CLIENT, "peer": SERVER.public if ik else None, **client},
        )
        tg.start_soon(side, "server", b, {"identity": SERVER, "server_side": True, **server})
    for value in results.values():
        if isinstance(value, Connection):
            await value.aclose()
    return results["client"], results["server"]


def _presented(identity: Identity, data: bytes | None) -> Certificate | None:
    """A Certificate object that presents ``data`` (the API's own check of its subject passes)."""
    if data is None:
        return None
    return dataclasses.replace(certificate(identity), encoded=data)


def _anyio_policy(hostile: Hostile) -> dict[str, Any]:
    names = hostile.policy.get("names")
    groups = hostile.policy.get("groups")
    return {
        "authorities": hostile.policy.get("authorities", TRUST),
        "allow_names": names,
        "allow_groups": groups,
    }


@pytest.mark.anyio
@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
@pytest.mark.parametrize("case", HOSTILE)
async def test_listener_side_refuses_a_hostile_client_certificate(
    anyio_backend: str, case: str, ik: bool
) -> None:
    hostile = HOSTILE[case]
    client, server = await _wrap_pair(
        ik=ik,
        client={"certificate": _presented(CLIENT, hostile.present(CLIENT))},
        server=_anyio_policy(hostile),
    )
    assert type(server) is hostile.error, server
    assert isinstance(client, PeerRefused), client
    assert client.code == CloseCode.CERTIFICATE_REFUSED
    assert client.reason == hostile.error.peer_reason


@pytest.mark.anyio
@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
@pytest.mark.parametrize("case", HOSTILE)
async def test_client_side_refuses_a_hostile_server_certificate(
    anyio_backend: str, case: str, ik: bool
) -> None:
    hostile = HOSTILE[case]
    client, server = await _wrap_pair(
        ik=ik,
        client=_anyio_policy(hostile),
        server={"certificate": _presented(SERVER, hostile.present(SERVER))},
    )
    assert type(client) is hostile.error, client
    assert isinstance(server, HandshakeFailed), server  # the client left without a word
    assert not isinstance(server, PeerRefused)


# -- over TCP: connect by name, listeners that require certificates --------------------------------


@pytest.fixture
def real_certificates() -> tuple[Authorities, Certificate, Certificate]:
    """Certificates valid now (the TCP tests use the real clock)."""
    now = int(time.time())
    trust = Authorities([CA.public])
    server = CA.sign(SERVER.public, "db-1", ["db"], not_before=now - 60, not_after=now + 600)
    client = CA.sign(CLIENT.public, "alice", ["ops"], not_before=now - 60, not_after=now + 600)
    return trust, server, client


async def _echo(conn: Connection) -> None:
    async for spack in conn:
        cert = conn.peer_certificate
        await conn.send(stalk.Spack(spack[0], cert.name if cert is not None else None))


@pytest.mark.anyio
@pytest.mark.parametrize("ik", [False, True], ids=["XX", "IK"])
async def test_connect_by_name_to_a_listener_that_requires_certificates(
    anyio_backend: str, ik: bool, real_certificates: tuple[Authorities, Certificate, Certificate]
) -> None:
    trust, server_cert, client_cert = real_certificates
    authorized: list[stalk.PublicIdentity] = []

    def authorize(peer: stalk.PublicIdentity) -> bool:
        authorized.append(peer)
        return True

    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(
                stalk.listen,
                "127.0.0.1",
                0,
                _echo,
                identity=SERVER,
                certificate=server_cert,
                authorities=trust,
                allow_groups=["ops"],
                authorize=authorize,
            )
        )
        async with await stalk.connect(
            host,
            port,
            SERVER.public if ik else None,
            identity=CLIENT,
            certificate=client_cert,
            authorities=trust,
            expect_name="db-1",
        ) as conn:
            assert conn.pattern == ("IK" if ik else "XX")
            assert conn.peer_certificate == server_cert
            assert conn.extra(StalkAttribute.peer_certificate) == server_cert
            assert isinstance(conn.peer, CertifiedIdentity)
            assert conn.peer == SERVER.public
            await conn.send(stalk.Spack(1))
            assert list(await conn.receive()) == [1, "alice"]
        tg.cancel_scope.cancel()
    assert len(authorized) == 1
    assert isinstance(authorized[0], CertifiedIdentity)
    assert authorized[0].groups == ("ops",)


@pytest.mark.anyio
async def test_a_listener_refuses_names_and_groups_it_does_not_allow(
    anyio_backend: str, real_certificates: tuple[Authorities, Certificate, Certificate]
) -> None:
    trust, _, client_cert = real_certificates
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(
                stalk.listen,
                "127.0.0.1",
                0,
                _echo,
                identity=SERVER,
                authorities=trust,
                allow_names=["bob"],
                allow_groups=["admin"],
            )
        )
        with pytest.raises(PeerRefused) as info:
            await stalk.connect(host, port, identity=CLIENT, certificate=client_cert)
        assert info.value.code == CloseCode.CERTIFICATE_REFUSED
        assert info.value.reason == "certificate name or groups not accepted"
        with pytest.raises(PeerRefused) as info:
            await stalk.connect(host, port)  # no certificate at all
        assert info.value.reason == "certificate required"
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_connect_refuses_a_server_under_another_name(
    anyio_backend: str, real_certificates: tuple[Authorities, Certificate, Certificate]
) -> None:
    trust, server_cert, _ = real_certificates
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(stalk.listen, "127.0.0.1", 0, _echo, identity=SERVER, certificate=server_cert)
        )
        with pytest.raises(CertificateNameMismatch, match="'db-1'"):
            await stalk.connect(host, port, authorities=trust, expect_name="db-2")
        with pytest.raises(UnknownAuthority):
            await stalk.connect(host, port, authorities=Authorities([OTHER_CA.public]))
        async with await stalk.connect(host, port, authorities=trust, expect_name="db-1") as conn:
            assert conn.peer_certificate is not None
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_without_authorities_everything_works_as_before(
    anyio_backend: str, real_certificates: tuple[Authorities, Certificate, Certificate]
) -> None:
    _, server_cert, client_cert = real_certificates
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(stalk.listen, "127.0.0.1", 0, _echo, identity=SERVER, certificate=server_cert)
        )
        for cert, identity in ((client_cert, CLIENT), (None, None)):
            async with await stalk.connect(host, port, identity=identity, certificate=cert) as conn:
                assert conn.peer_certificate is None
                assert type(conn.peer) is stalk.PublicIdentity
                await conn.send(stalk.Spack(2))
                assert list(await conn.receive()) == [2, None]
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_the_listener_logs_the_certified_name(
    anyio_backend: str,
    real_certificates: tuple[Authorities, Certificate, Certificate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    trust, _, client_cert = real_certificates
    caplog.set_level(logging.INFO, logger="stalk.connection")
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            partial(stalk.listen, "127.0.0.1", 0, _echo, identity=SERVER, authorities=trust)
        )
        async with await stalk.connect(host, port, identity=CLIENT, certificate=client_cert):
            pass
        tg.cancel_scope.cancel()
    assert any(
        f"accepted {CLIENT.public.fingerprint} ('alice') from" in r.getMessage()
        for r in caplog.records
    )


def test_the_api_refuses_inconsistent_arguments(
    real_certificates: tuple[Authorities, Certificate, Certificate],
) -> None:
    trust, server_cert, client_cert = real_certificates

    async def main() -> None:
        with pytest.raises(ValueError, match="needs the identity"):
            await stalk.connect("127.0.0.1", 1, certificate=client_cert)
        with pytest.raises(ValueError, match="need authorities"):
            await stalk.connect("127.0.0.1", 1, expect_name="db-1")
        with pytest.raises(ValueError, match="certificate is for"):
            await stalk.create_listener("127.0.0.1", 0, identity=CLIENT, certificate=server_cert)
        with pytest.raises(ValueError, match="need authorities"):
            await stalk.create_listener("127.0.0.1", 0, identity=SERVER, allow_groups=["x"])
        with pytest.raises(TypeError, match="not one str"):
            await stalk.create_listener(
                "127.0.0.1", 0, identity=SERVER, authorities=trust, allow_names="db-1"
            )

    anyio.run(main)
