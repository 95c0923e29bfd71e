"""The authority and certificate commands (``authority ...``, ``cert ...``).

Also the certificate trust ``listen``, ``connect`` and ``send`` share: the authorities a
command trusts, its own certificate, and how a peer's certificate is described.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import Any

import anyio

import stalk
from stalk.certificates import Authorities, Authority, Certificate, RevocationList, utc_text
from stalk.cli.output import _OUTPUT, EXIT_OK, CommandError, _run, _say
from stalk.cli.values import _config, _identity_path, _load_identity, _tcp_only
from stalk.connection import Connection, address_text
from stalk.identity import Identity
from stalk.known_peers import stalk_home
from stalk.renewal import AuthorityService, Enrollments, request_certificate
from stalk.summary import plural


def _authority_path(value: str | None) -> Path:
    return Path(value).expanduser() if value else stalk_home() / "authority"


def _load_authority(path: Path, given: str | None) -> Authority:
    """The authority's key pair from ``path``; a missing one says how to create it."""
    try:
        return Authority.load(path)
    except stalk.IdentityFileError as exc:
        hint = ""
        if not path.exists() and not path.is_symlink():
            command = "stalk authority init" + (f" -f {shlex.quote(given)}" if given else "")
            hint = f"; create one with '{command}'"
        raise CommandError(f"{exc}{hint}") from exc


def cmd_authority_init(args: argparse.Namespace) -> int:
    """Write a new authority key pair; print its public form."""
    path = _authority_path(args.file)
    if path.exists() and not args.force:
        raise CommandError(f"{path} already exists (use --force to replace it)")
    authority = Authority.generate()
    authority.save(path, overwrite=args.force)
    _say(f"wrote {path} (private, mode 0600) and {path}.pub")
    _say(f"{authority.public}  {authority.public.fingerprint}")
    return EXIT_OK


def cmd_authority_sign(args: argparse.Namespace) -> int:
    """Issue a certificate for KEY."""
    authority = _load_authority(_authority_path(args.file), args.file)
    now = int(time.time())
    try:
        cert = authority.sign(
            args.key,
            args.name,
            args.group or (),
            not_before=now,
            not_after=now + args.valid,
            serial=args.serial,
        )
    except ValueError as exc:
        raise CommandError(f"cannot sign: {exc}") from exc
    if args.output is None:
        _say(cert.to_string().rstrip("\n"))
        return EXIT_OK
    path = Path(args.output).expanduser()
    if path.exists() and not args.force:
        raise CommandError(f"{path} already exists (use --force to replace it)")
    cert.save(path, overwrite=args.force)
    _say(f"wrote {path}")
    for line in cert.describe()[1:]:
        _say(f"  {line}")
    return EXIT_OK


def cmd_authority_revoke(args: argparse.Namespace) -> int:
    """Add serials and keys to the authority's revocation list file (made if missing)."""
    authority = _load_authority(_authority_path(args.file), args.file)
    path = Path(args.output).expanduser()
    serials = set(args.serial or ())
    keys = set(args.key or ())
    for cert_path in args.cert or ():
        cert = Certificate.load(cert_path)
        if cert.issuer != authority.public.digest:
            raise CommandError(
                f"{cert_path} was issued by {cert.issuer_fingerprint}, not by this authority "
                f"({authority.public.fingerprint})"
            )
        serials.add(cert.serial)
    issued_at = int(time.time())
    if path.exists():
        current = RevocationList.load(path)
        try:
            Authorities([authority.public], [current])
        except stalk.RevocationListError as exc:
            raise CommandError(f"{path} is not this authority's revocation list: {exc}") from exc
        serials |= current.serials
        keys |= current.subjects
        issued_at = max(issued_at, current.issued_at + 1)  # newer, even with a clock behind
    try:
        revocations = authority.revoke(serials, keys, issued_at=issued_at)
    except ValueError as exc:
        raise CommandError(f"cannot revoke: {exc}") from exc
    revocations.save(path, overwrite=True)
    serial_count, key_count = len(revocations.serials), len(revocations.subjects)
    _say(
        f"wrote {path}: {serial_count} {plural(serial_count, 'serial')} and {key_count} "
        f"{plural(key_count, 'key')} revoked"
    )
    return EXIT_OK


def cmd_authority_serve(args: argparse.Namespace) -> int:
    """Serve certificate renewals for enrolled keys until Ctrl-C."""
    host, port = _tcp_only(args.address, "authority serve")
    authority = _load_authority(_authority_path(args.file), args.file)
    enrollments = Enrollments(args.enrolled)
    identity = (
        _load_identity(Path(args.identity).expanduser(), args.identity) if args.identity else None
    )

    async def serve() -> None:
        try:
            service = await AuthorityService.create(
                host,
                port,
                authority=authority,
                enrollments=enrollments,
                identity=identity,
                valid=args.valid,
                name=args.name,
                config=_config(args),
            )
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {address_text((host, port))}: {exc.strerror or exc}"
            ) from exc
        async with service:
            bound = address_text(service.address)
            _say(f"serving certificates on {bound} as {args.name!r}")
            _say(f"signed by {authority.public}  {authority.public.fingerprint}")
            count = len(enrollments)
            _say(
                f"{count} {plural(count, 'key')} enrolled in {enrollments.path}; each "
                f"certificate valid {args.valid} s"
            )
            with anyio.CancelScope() as serving:
                _OUTPUT.stop_with(serving)
                await service.serve()

    _run(args, serve)
    return EXIT_OK


def cmd_cert_renew(args: argparse.Namespace) -> int:
    """Ask an authority service for a new certificate for our identity; write it."""
    host, port = _tcp_only(args.address, "cert renew")
    path = _identity_path(args.file)
    identity = _load_identity(path, args.file)
    authorities = _authorities(args)
    if authorities is None:
        raise CommandError("cert renew needs --authority: the authority that runs the service")

    async def renew() -> Certificate:
        return await request_certificate(
            host,
            port,
            identity=identity,
            authorities=authorities,
            service_name=args.service_name,
            config=_config(args),
        )

    cert = _run(args, renew)
    output = Path(args.output).expanduser()
    cert.save(output, overwrite=True)
    _say(f"wrote {output}")
    for line in cert.describe()[1:]:
        _say(f"  {line}")
    return EXIT_OK


def cmd_cert_show(args: argparse.Namespace) -> int:
    """Print a certificate; with --authority, check it against those authorities now."""
    cert = Certificate.load(args.certificate)
    for line in cert.describe():
        _say(line)
    if args.authority is None:
        if args.revocations is not None:
            raise CommandError("--revocations needs --authority")
        return EXIT_OK
    trusted = Authorities.load(args.authority)
    if args.revocations is not None:
        trusted.add_revocations(RevocationList.load(args.revocations))
    trusted.verify(cert, now=time.time())
    _say(f"valid now, signed by {cert.issuer_fingerprint} (trusted), not revoked")
    return EXIT_OK


def _authorities(args: argparse.Namespace, *, load_revocations: bool = True) -> Authorities | None:
    """The authorities of ``--authority FILE`` (with ``--revocations``' list), or ``None``."""
    if not args.authority:
        if args.revocations:
            raise CommandError("--revocations needs --authority")
        return None
    authorities = Authorities.load(args.authority)
    if load_revocations and args.revocations:
        authorities.add_revocations(RevocationList.load(args.revocations))
    return authorities


def _own_certificate(
    args: argparse.Namespace, identity: Identity | None, path: Path
) -> Certificate | None:
    """The certificate of ``--certificate CERT``, checked to be for our identity."""
    if args.certificate is None:
        return None
    cert = Certificate.load(args.certificate)
    if identity is None:
        raise CommandError(
            f"--certificate needs the identity it was issued for, and {path} does not exist "
            "(give it with -f FILE)"
        )
    if cert.subject != identity.public:
        raise CommandError(
            f"{args.certificate} is a certificate for {cert.subject.fingerprint}, not for "
            f"your identity {identity.public.fingerprint} ({path})"
        )
    return cert


def _describe_certificate(cert: Certificate) -> str:
    """One line for a certificate: its name, groups and validity (all visible ASCII)."""
    groups = f" (groups {', '.join(cert.groups)})" if cert.groups else ""
    return f"certificate {cert.name!r}{groups}, valid until {utc_text(cert.not_after)}"


def _certified(conn: Connection) -> str:
    """What a connection line adds for a peer with a verified certificate."""
    cert = conn.peer_certificate
    if cert is None:
        return ""
    groups = f", groups {', '.join(cert.groups)}" if cert.groups else ""
    return f", certified as {cert.name!r}{groups}"


def _listener_trust(args: argparse.Namespace, identity: Identity, path: Path) -> dict[str, Any]:
    """``listen``'s certificate options, checked: the listener's keyword arguments."""
    authorities = _authorities(args, load_revocations=False)
    if authorities is None and (args.allow_name or args.allow_group):
        raise CommandError("--allow-name and --allow-group need --authority")
    return {
        "certificate": _own_certificate(args, identity, path),
        "authorities": authorities,
        "allow_names": args.allow_name,
        "allow_groups": args.allow_group,
        "revocations": args.revocations,
    }


def _say_trust(listener: stalk.StreamListener, args: argparse.Namespace) -> None:
    """``listen``'s banner lines for its certificate, authorities and revocations."""
    if listener.certificate is not None:
        _say(f"presenting {_describe_certificate(listener.certificate)}")
    if listener.authorities is not None:
        _say(f"admitting {_admitted(args)} certified by {_fingerprints(listener.authorities)}")
    if listener.revocations is not None:
        _say(f"revocations from {listener.revocations.path}, reloaded when it changes")


def _fingerprints(authorities: Authorities) -> str:
    return ", ".join(authority.fingerprint for authority in authorities)


def _admitted(args: argparse.Namespace) -> str:
    """Whom ``listen --authority`` admits, as its banner says it."""
    names = [repr(name) for name in args.allow_name or ()]
    groups = [f"group {group!r}" for group in args.allow_group or ()]
    return " or ".join(names + groups) if names or groups else "any client"
