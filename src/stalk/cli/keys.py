"""The key commands: ``keygen``, ``id`` and ``forget``."""

from __future__ import annotations

import argparse

from stalk.cli.output import EXIT_OK, CommandError, _say
from stalk.cli.values import _Address, _identity_path, _load_identity
from stalk.connection import address_text
from stalk.identity import Identity
from stalk.known_peers import KnownPeers


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write a new identity."""
    path = _identity_path(args.file)
    if path.exists() and not args.force:
        raise CommandError(f"{path} already exists (use --force to replace it)")
    identity = Identity.generate()
    identity.save(path, overwrite=args.force)
    _say(f"wrote {path} (private, mode 0600) and {path}.pub")
    _say(f"{identity.public}  {identity.public.fingerprint}")
    return EXIT_OK


def cmd_id(args: argparse.Namespace) -> int:
    """Print our public key and fingerprint."""
    identity = _load_identity(_identity_path(args.file), args.file)
    _say(str(identity.public))
    _say(identity.public.fingerprint)
    return EXIT_OK


def cmd_forget(args: argparse.Namespace) -> int:
    """Remove a host's key from known_peers."""
    address: _Address = args.address
    host, port = (address, None) if isinstance(address, str) else address
    if KnownPeers().forget(host, port):
        _say(f"forgot the key of {address_text(address)}")
        return EXIT_OK
    raise CommandError(f"no known key for {address_text(address)}")
