"""Serving and dialling: ``listen``, ``connect`` and ``send``."""

from __future__ import annotations

import argparse
import codecs
import os
import shlex
import stat
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio

import stalk
from stalk.certificates import Authorities, Certificate
from stalk.cli.authorities import (
    _authorities,
    _certified,
    _listener_trust,
    _own_certificate,
    _say_trust,
)
from stalk.cli.output import (
    _OUTPUT,
    EXIT_OK,
    CommandError,
    _error_text,
    _note,
    _run,
    _say,
    _show,
    escape,
)
from stalk.cli.values import _Address, _config, _identity_path, _load_identity, parse_value
from stalk.connection import Connection, address_text
from stalk.identity import Identity, PublicIdentity
from stalk.known_peers import AuthorizedPeers, KnownPeers
from stalk.spack import Spack


def cmd_listen(args: argparse.Namespace) -> int:
    """Serve: print peers and a summary of their spacks (or echo them)."""
    address: _Address = args.address
    if args.socket_mode is not None and not isinstance(address, str):
        raise CommandError("--socket-mode is for a unix socket (unix:PATH)")
    path = _identity_path(args.file)
    if args.file is None and not path.exists():
        Identity.generate().save(path)
        _say(f"created a new identity in {path}")
    identity = _load_identity(path, args.file)
    authorize = AuthorizedPeers(args.authorized_peers) if args.authorized_peers else None
    config = _config(args)
    trust = _listener_trust(args, identity, path)

    async def handler(conn: Connection) -> None:
        who = conn.peer.fingerprint
        where = "?"
        if conn.host is not None and conn.port is not None:
            where = address_text((conn.host, conn.port))
        elif conn.path is not None:
            where = address_text(conn.path)
        _say(f"peer {who} connected ({conn.pattern}) from {where}{_certified(conn)}")
        ending = ""
        try:
            async for spack in conn:
                _say(f"{who}: {_show(spack, args)}")
                if args.echo:
                    await conn.send(spack)
        except stalk.StalkError as exc:
            ending = f": {escape(_error_text(exc))}"
        finally:
            _say(f"peer {who} disconnected{ending}")

    async def serve() -> None:
        listener: stalk.StreamListener
        try:
            if isinstance(address, str):
                listener = await stalk.create_unix_listener(
                    address,
                    identity=identity,
                    authorize=authorize,
                    config=config,
                    mode=args.socket_mode,
                    **trust,
                )
            else:
                listener = await stalk.create_listener(
                    *address, identity=identity, authorize=authorize, config=config, **trust
                )
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {address_text(address)}: {exc.strerror or exc}"
            ) from exc
        async with listener:
            _say(f"listening on {address_text(listener.address)} as {identity.public}")
            _say(f"fingerprint {identity.public.fingerprint}")
            _say_trust(listener, args)
            with anyio.CancelScope() as serving:
                _OUTPUT.stop_with(serving)
                await listener.serve(handler)

    _run(args, serve)
    return EXIT_OK


async def _dial(args: argparse.Namespace) -> Connection:
    """Connect with ssh-like trust: --peer, else known_peers (IK), else XX and remember.

    With --authority, the server's certificate is the trust instead: known_peers is
    neither read nor written.
    """
    where: _Address = args.address
    host, port = (where, None) if isinstance(where, str) else where
    address = address_text(where)
    path = _identity_path(args.file)
    identity = _load_identity(path, args.file) if args.file or path.exists() else None
    authorities = _authorities(args)
    if authorities is not None and args.name is None:
        raise CommandError("--authority needs --name: the name the server's certificate must bear")
    if authorities is None and args.name is not None:
        raise CommandError("--name needs --authority: the authorities that certify names")
    certificate = _own_certificate(args, identity, path)
    if authorities is not None:
        return await _connect(
            where,
            args.peer,
            identity=identity,
            config=_config(args),
            certificate=certificate,
            authorities=authorities,
            expect_name=args.name,
        )
    known = KnownPeers()
    peer: PublicIdentity | None = args.peer or known.lookup(host, port)
    try:
        conn = await _connect(
            where, peer, identity=identity, config=_config(args), certificate=certificate
        )
    except stalk.PeerIdentityMismatch:
        if args.peer or peer is None:
            raise
        presented = await _presented_key(where)
        raise CommandError(
            f"THE KEY OF {address} HAS CHANGED. Expected {peer.fingerprint} (from "
            f"{known.path}), the peer now presents {presented}. Someone may be "
            f"intercepting the connection. If the change is legitimate, run "
            f"'stalk forget {shlex.quote(address)}' and connect again."
        ) from None
    if peer is None:
        known.remember(host, port, conn.peer)
        _note(f"stalk: recorded key {conn.peer.fingerprint} for {address} in {known.path}")
    return conn


async def _connect(
    where: _Address,
    peer: PublicIdentity | None = None,
    *,
    identity: Identity | None = None,
    config: stalk.Config | None = None,
    certificate: Certificate | None = None,
    authorities: Authorities | None = None,
    expect_name: str | None = None,
) -> Connection:
    """``stalk.connect``, or ``stalk.connect_unix`` for a path."""
    trust: dict[str, Any] = {
        "certificate": certificate,
        "authorities": authorities,
        "expect_name": expect_name,
    }
    if isinstance(where, str):
        return await stalk.connect_unix(where, peer, identity=identity, config=config, **trust)
    return await stalk.connect(*where, peer, identity=identity, config=config, **trust)


async def _presented_key(where: _Address) -> str:
    try:
        async with await _connect(where) as probe:
            return probe.peer.fingerprint
    except stalk.StalkError:
        return "an unknown key"


def cmd_send(args: argparse.Namespace) -> int:
    """Send one spack; with --wait print one reply."""
    spack = Spack(*args.values)

    async def run() -> None:
        async with await _dial(args) as conn:
            await conn.send(spack)
            if args.wait is not None:
                try:
                    with anyio.fail_after(args.wait):
                        reply = await conn.receive()
                except TimeoutError:
                    raise CommandError(f"no reply within {args.wait:g} s") from None
                except anyio.EndOfStream:
                    raise CommandError("the peer closed the connection without replying") from None
                _say(_show(reply, args))

    _run(args, run)
    return EXIT_OK


async def _stdin_lines() -> AsyncIterator[str]:
    """The lines of standard input, without their line endings.

    A terminal, pipe or socket is read from its file descriptor once it is readable, so
    that waiting for input is cancellable: when the server ends the session, or on
    Ctrl-C, ``stalk connect`` ends at once instead of after the next line. Anything else
    (a regular file, ``/dev/null``) never blocks for long and is read in a worker thread.
    """
    fd = -1
    if sys.platform != "win32" and sys.stdin is not None:
        try:
            fd = sys.stdin.fileno()
            mode = os.fstat(fd).st_mode
        except (OSError, ValueError):
            fd = -1
        else:
            if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)):
                fd = -1
    if fd < 0:
        async for line in anyio.wrap_file(sys.stdin):
            yield line.rstrip("\n")
        return
    decoder = codecs.getincrementaldecoder(sys.stdin.encoding or "utf-8")(errors="replace")
    pending: list[str] = []
    while True:
        await anyio.wait_readable(fd)
        data = os.read(fd, 1 << 16)
        text = decoder.decode(data, final=not data)
        if "\n" in text:
            *lines, rest = "".join([*pending, text]).split("\n")
            pending = [rest]
            for line in lines:
                yield line.removesuffix("\r")
        else:
            pending.append(text)
        if not data:
            break
    if last := "".join(pending):
        yield last


async def _send_lines(conn: Connection, ended: anyio.Event) -> None:
    """Send each line of standard input as a spack of one value, then EOF (CLOSE normal).

    A line whose value a spack cannot carry (``{1, 2}`` is a set) is reported and skipped.
    """
    async for line in _stdin_lines():
        try:
            await conn.send(Spack(parse_value(line)))
        except (stalk.InvalidSpackValue, stalk.MessageTooLarge) as exc:
            _note(f"stalk: not sent: {escape(str(exc))}")
    ended.set()
    await conn.send_eof()


def cmd_connect(args: argparse.Namespace) -> int:
    """Send each stdin line as a spack; print what comes back until the peer closes."""

    async def run() -> None:
        async with await _dial(args) as conn:
            typing = sys.stdin is not None and sys.stdin.isatty()
            hint = "; each line is sent as a spack, Ctrl-D ends" if typing else ""
            _note(f"connected to {conn.peer.fingerprint} ({conn.pattern}){_certified(conn)}{hint}")
            input_ended = anyio.Event()
            async with anyio.create_task_group() as tg:
                _OUTPUT.stop_with(tg.cancel_scope)
                tg.start_soon(_send_lines, conn, input_ended)
                async for spack in conn:
                    _say(_show(spack, args))
                # The peer closed cleanly: stop waiting for input.
                tg.cancel_scope.cancel()
            if not input_ended.is_set() and not _OUTPUT.closed:
                _note("stalk: the peer closed the connection")

    _run(args, run)
    return EXIT_OK
