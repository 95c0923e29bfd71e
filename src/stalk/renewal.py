"""Online renewal: an authority as a stalk service, and a helper that keeps a certificate fresh.

Theory of operation
-------------------
Short-lived certificates limit what a stolen key or a late revocation costs, but someone
has to issue them again and again. Here the authority runs as a stalk service
(:class:`AuthorityService`, ``stalk authority serve``): a listener whose own stalk identity
holds a certificate from the same authority, under a service name (``"authority"`` by
default), so a client that trusts the authority finds it by name with nothing else to
pin. The service admits only **enrolled** keys (an :class:`Enrollments` file: each key
with the name and groups it may be certified for) and refuses any other with
NOT_AUTHORIZED in the handshake.

The exchange, over an ordinary connection, one or more times:

- the client sends ``Spack("renew")``;
- the service answers ``Spack("certificate", CERT)``, CERT the encoding of a new
  certificate (SPEC "Certificates") for the client's own static key, with the name and
  groups its enrollment gives and ``valid`` seconds of validity from now; or
  ``Spack("refused", REASON)`` (the key is no longer enrolled, say); anything else the
  client sends is answered ``Spack("refused", "unknown request")``.

The key being certified is the one the handshake authenticated, so a client can only
ever renew its own certificate, and only while it is enrolled. A client checks what it
receives like any certificate (:meth:`~stalk.Authorities.verify`, for its own key).

:func:`request_certificate` is one exchange; :class:`CertificateKeeper` runs in the
background and renews when two thirds of the certificate's validity have passed (retrying
with a growing pause when the service cannot be reached), handing each new certificate
to a callback: a listener's :attr:`~stalk.Listener.certificate`, for instance, which its
next handshakes present.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import anyio.to_thread

from stalk import _files, _logs
from stalk.certificates import Authorities, Authority, Certificate, check_names, utc_text
from stalk.config import Config
from stalk.connection import Connection, connect
from stalk.errors import IdentityFileError, RenewalFailed, StalkError
from stalk.identity import Identity, PublicIdentity
from stalk.listener import Listener, create_listener
from stalk.spack import Spack

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "DEFAULT_VALIDITY",
    "AuthorityService",
    "CertificateKeeper",
    "Enrollment",
    "Enrollments",
    "request_certificate",
]

logger = _logs.RENEWAL

#: The name the service's own certificate bears, and clients ask for by default.
DEFAULT_SERVICE_NAME: Final = "authority"
#: How long a renewed certificate is valid: 24 hours.
DEFAULT_VALIDITY: Final = 24 * 3600
#: A certificate is renewed once this part of its validity has passed.
RENEW_AT: Final = 2 / 3
#: Pauses between failed renewals grow from this...
RETRY_MIN: Final = 1.0
#: ...to at most this, in seconds.
RETRY_MAX: Final = 300.0
#: Enrollment files are small: a line per enrolled key.
_MAX_ENROLLMENTS_FILE: Final = 16 * 1024 * 1024


class Enrollment:
    """One enrolled key: the name and groups its certificates bear."""

    __slots__ = ("groups", "key", "name")

    def __init__(self, key: PublicIdentity, name: str, groups: tuple[str, ...] = ()) -> None:
        self.key = key
        self.name = name
        self.groups = groups

    def __repr__(self) -> str:
        return f"Enrollment({self.key}, {self.name!r}, {list(self.groups)})"


class Enrollments:
    """The keys an authority service renews certificates for, from a file.

    Lines ``stalk:KEY NAME [GROUP,GROUP...]``; blank lines and ``#`` comments are skipped.
    The file decides who gets certificates, so it is checked as a trust file (SPEC "Trust
    files"); :meth:`refresh` reads it again when it has changed.

    :param path: the enrollment file.
    :raises IdentityFileError: it cannot be read, is unsafe, or has a malformed line (a
        name or group that a certificate cannot carry, a key listed twice).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._by_key: dict[PublicIdentity, Enrollment] = {}
        self._seen: tuple[int, ...] | None = None
        self.refresh()

    def _stamp(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def changed(self) -> bool:
        """Whether the file is not the version last read (a ``stat``)."""
        stamp = self._stamp()
        return stamp is None or stamp != self._seen

    def refresh(self) -> bool:
        """Read the file again if it changed; return whether it was read.

        :raises IdentityFileError: the new version is refused (the old one stays in force).
        """
        stamp = self._stamp()
        if stamp is not None and stamp == self._seen:
            return False
        data, st = _files.read_file(self.path, "enrollment file", limit=_MAX_ENROLLMENTS_FILE)
        _files.check_owner(self.path, st, "enrollment file")
        _files.check_not_writable_by_others(self.path, st, "enrollment file")
        _files.check_directories(self.path, "enrollment file")
        self._by_key = _parse_enrollments(data, self.path)
        self._seen = stamp
        return True

    def get(self, key: PublicIdentity) -> Enrollment | None:
        """The enrollment of ``key``, or ``None``."""
        return self._by_key.get(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, PublicIdentity) and key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)


def _parse_enrollments(data: bytes, path: Path) -> dict[PublicIdentity, Enrollment]:
    """``key -> enrollment`` from an enrollment file's bytes.

    :raises IdentityFileError: a malformed line, named with its number.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IdentityFileError(f"enrollment file '{path}' is not UTF-8 text") from exc
    enrolled: dict[PublicIdentity, Enrollment] = {}
    for number, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        where = f"enrollment file '{path}', line {number}"
        if len(fields) not in (2, 3):
            raise IdentityFileError(f"{where}: expected KEY NAME [GROUP,GROUP...]")
        try:
            key = PublicIdentity.from_string(fields[0])
            groups = tuple(fields[2].split(",")) if len(fields) == 3 else ()
            check_names(fields[1], groups)
        except ValueError as exc:
            raise IdentityFileError(f"{where}: {exc}") from exc
        if key in enrolled:
            raise IdentityFileError(f"{where}: {key.fingerprint} is enrolled twice")
        enrolled[key] = Enrollment(key, fields[1], tuple(sorted(set(groups))))
    return enrolled


class AuthorityService:
    """An authority as a stalk service: it renews certificates for enrolled keys.

    Use :meth:`create`, then :meth:`serve` (or ``async with``). Its own identity presents a
    certificate from ``authority`` for ``name``, issued again before it expires.

    :ivar authority: the authority that signs.
    :ivar enrollments: who may renew, and as what.
    :ivar valid: seconds of validity of each certificate it issues.
    :ivar name: the name of its own certificate.
    :ivar listener: the listener it serves on.
    """

    def __init__(
        self,
        listener: Listener,
        authority: Authority,
        enrollments: Enrollments,
        *,
        valid: int,
        name: str,
    ) -> None:
        self.listener = listener
        self.authority = authority
        self.enrollments = enrollments
        self.valid = valid
        self.name = name
        #: Certificates issued so far (to clients; its own not counted).
        self.issued = 0
        self._reloading = anyio.Lock()

    @classmethod
    async def create(
        cls,
        host: str,
        port: int,
        *,
        authority: Authority,
        enrollments: Enrollments,
        identity: Identity | None = None,
        valid: int = DEFAULT_VALIDITY,
        name: str = DEFAULT_SERVICE_NAME,
        config: Config | None = None,
    ) -> AuthorityService:
        """Bind the service on ``host:port`` (port 0 picks a free one).

        :param identity: the service's stalk identity (default: a new one): never the
            authority's own key, which signs certificates and nothing else.
        :param valid: seconds of validity of each certificate issued (its own too).
        :param name: the name of its own certificate (clients ask for it).
        :raises OSError: the address cannot be bound.
        :raises ValueError: ``valid`` is not positive, or ``name`` cannot be certified.
        """
        if not 0 < valid <= 100 * 365 * 86400:
            raise ValueError("valid must be a positive number of seconds, at most 100 years")
        identity = identity or Identity.generate()
        own = _issue(authority, identity.public, name, (), valid)

        async def authorize(peer: PublicIdentity) -> bool:
            return await service._authorize(peer)

        listener = await create_listener(
            host, port, identity=identity, authorize=authorize, config=config, certificate=own
        )
        service = cls(listener, authority, enrollments, valid=valid, name=name)
        return service

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` it is bound to."""
        return self.listener.address

    async def __aenter__(self) -> AuthorityService:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.listener.aclose()

    async def aclose(self) -> None:
        """Stop listening."""
        await self.listener.aclose()

    async def _authorize(self, peer: PublicIdentity) -> bool:
        """Admit enrolled keys only (the file read again first, if it changed)."""
        await self._refresh()
        return peer in self.enrollments

    async def _refresh(self) -> None:
        """Read the enrollment file again if it changed, in a worker thread."""
        if not self.enrollments.changed():
            return
        async with self._reloading:
            await anyio.to_thread.run_sync(self._reload)

    def _reload(self) -> None:
        try:
            self.enrollments.refresh()
        except IdentityFileError as exc:
            _logs.THROTTLE.log(
                logger,
                logging.WARNING,
                "enrollments",
                "enrollment file not reloaded, the one in force stays: %s",
                exc,
            )

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; its own certificate is issued again before it expires."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_own_certificate)
            await tg.start(self.listener.serve, self._handle)
            task_status.started(self.address)

    async def _keep_own_certificate(self) -> None:
        while True:
            own = self.listener.certificate
            if own is not None:
                # At least RETRY_MIN apart: a certificate of a second or two is due at once.
                await anyio.sleep(max(RETRY_MIN, _renewal_time(own) - time.time()))
            self.listener.certificate = _issue(
                self.authority, self.listener.identity.public, self.name, (), self.valid
            )

    async def _handle(self, conn: Connection) -> None:
        async for request in conn:
            await self._refresh()
            await conn.send(self._answer(conn.peer, request))

    def _answer(self, peer: PublicIdentity, request: Spack) -> Spack:
        """The answer to one request of ``peer``, an authenticated key."""
        if list(request) != ["renew"]:
            return Spack("refused", "unknown request")
        enrollment = self.enrollments.get(peer)
        if enrollment is None:
            return Spack("refused", "not enrolled")
        cert = _issue(self.authority, peer, enrollment.name, enrollment.groups, self.valid)
        self.issued += 1
        logger.info(
            "issued a certificate for %r to %s, serial %d, valid until %s",
            cert.name,
            peer.fingerprint,
            cert.serial,
            utc_text(cert.not_after),
        )
        return Spack("certificate", cert.to_bytes())


def _issue(
    authority: Authority, key: PublicIdentity, name: str, groups: tuple[str, ...], valid: int
) -> Certificate:
    now = int(time.time())
    return authority.sign(key, name, groups, not_before=now, not_after=now + valid)


def _renewal_time(cert: Certificate) -> float:
    """When ``cert`` is due for renewal: two thirds into its validity."""
    return cert.not_before + RENEW_AT * (cert.not_after - cert.not_before)


async def request_certificate(
    host: str,
    port: int,
    *,
    identity: Identity,
    authorities: Authorities,
    service_name: str = DEFAULT_SERVICE_NAME,
    config: Config | None = None,
    timeout: float = 30.0,
) -> Certificate:
    """Ask the authority service at ``host:port`` for a new certificate for ``identity``.

    The service is trusted by its own certificate: from one of ``authorities``, for
    ``service_name``. What it answers is checked as any certificate, for our key.

    :param timeout: seconds to wait for its answer once connected (the connection itself
        is bounded by ``Config.handshake_timeout``).
    :raises ~stalk.HandshakeFailed: the service could not be reached or trusted, or it
        refused us (``PeerRefused`` with NOT_AUTHORIZED: we are not enrolled).
    :raises ~stalk.RenewalFailed: it refused to renew, answered something else, or did
        not answer within ``timeout``.
    :raises ~stalk.CertificateError: what it sent is not a valid certificate for our key.
    :raises ~stalk.ConnectFailed: TCP could not connect.
    """
    async with await connect(
        host,
        port,
        identity=identity,
        authorities=authorities,
        expect_name=service_name,
        config=config,
    ) as conn:
        await conn.send(Spack("renew"))
        try:
            with anyio.fail_after(timeout):
                answer = await conn.receive()
        except anyio.EndOfStream:
            raise RenewalFailed("the authority service closed without answering") from None
        except TimeoutError:
            raise RenewalFailed(
                f"the authority service did not answer within {timeout} s"
            ) from None
    values = list(answer)
    if len(values) == 2 and values[0] == "refused" and isinstance(values[1], str):
        raise RenewalFailed(
            f"the authority service refused to renew: {values[1]!r}", reason=values[1]
        )
    if len(values) != 2 or values[0] != "certificate" or not isinstance(values[1], bytes):
        raise RenewalFailed("the authority service answered something else than a certificate")
    return authorities.verify(values[1], now=time.time(), key=identity.public)


class CertificateKeeper:
    """Keeps ``identity``'s certificate fresh from an authority service, in the background.

    Run :meth:`run` in a task group (``await tg.start(keeper.run)`` returns once there is
    a certificate); ``certificate`` is always the newest, and ``on_renewed`` is called
    with each new one (set a listener's ``certificate`` there, or save it). A certificate
    is renewed when two thirds of its validity have passed; a failed renewal is logged and
    tried again after a pause that doubles from 1 s up to 5 minutes, never past the
    certificate's end.

    :param address: the service's ``(host, port)``.
    :param identity: our key pair (the service must have it enrolled).
    :param authorities: who may sign the service's certificate and ours.
    :param certificate: a certificate to start from (else one is asked for at once).
    :param on_renewed: called with each new certificate.
    :param service_name: the name of the service's certificate.
    :param config: for the connections to the service.
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        identity: Identity,
        authorities: Authorities,
        certificate: Certificate | None = None,
        on_renewed: Callable[[Certificate], object] | None = None,
        service_name: str = DEFAULT_SERVICE_NAME,
        config: Config | None = None,
    ) -> None:
        self.address = address
        self.identity = identity
        self.authorities = authorities
        self.certificate = certificate
        self.on_renewed = on_renewed
        self.service_name = service_name
        self.config = config
        #: Renewals that succeeded, and that failed.
        self.renewals = 0
        self.failures = 0

    def due_in(self) -> float:
        """Seconds until the next renewal is due (0: now)."""
        if self.certificate is None:
            return 0.0
        return max(0.0, _renewal_time(self.certificate) - time.time())

    async def renew(self) -> Certificate:
        """Renew now; the new certificate becomes ``certificate``.

        :raises: what :func:`request_certificate` raises.
        """
        host, port = self.address
        cert = await request_certificate(
            host,
            port,
            identity=self.identity,
            authorities=self.authorities,
            service_name=self.service_name,
            config=self.config,
        )
        self.certificate = cert
        self.renewals += 1
        if self.on_renewed is not None:
            self.on_renewed(cert)
        return cert

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[Certificate] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Renew whenever due, until cancelled.

        :raises: without a starting certificate, what the first :meth:`renew` raises (so
            ``tg.start(keeper.run)`` fails at once when the service refuses us).
        """
        if self.certificate is None:
            await self.renew()
        assert self.certificate is not None
        task_status.started(self.certificate)
        pause = RETRY_MIN
        wait = self.due_in()
        while True:
            await anyio.sleep(wait)
            try:
                await self.renew()
            except (StalkError, OSError) as exc:
                self.failures += 1
                left = self.certificate.not_after - time.time() if self.certificate else 0.0
                wait = pause if left <= 0 else min(pause, max(RETRY_MIN, left / 2))
                logger.warning(
                    "renewing the certificate from %s failed (%s); the current one has "
                    "%.0f s left; trying again in %.0f s",
                    self.address,
                    exc,
                    max(0.0, left),
                    wait,
                )
                pause = min(RETRY_MAX, pause * 2)
                continue
            pause = RETRY_MIN
            # At least RETRY_MIN apart: a certificate of a second or two is due at once.
            wait = max(RETRY_MIN, self.due_in())
