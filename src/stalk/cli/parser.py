"""The argparse parser: every command's options, help text and examples."""

from __future__ import annotations

import argparse
import textwrap
from typing import Final, TypeAlias

import stalk
from stalk import bench  # light: the benchmark itself is imported when it runs
from stalk.cli.authorities import (
    cmd_authority_init,
    cmd_authority_revoke,
    cmd_authority_serve,
    cmd_authority_sign,
    cmd_cert_renew,
    cmd_cert_show,
)
from stalk.cli.keys import cmd_forget, cmd_id, cmd_keygen
from stalk.cli.network import cmd_connect, cmd_listen, cmd_send
from stalk.cli.output import EXIT_STATUSES
from stalk.cli.tools import cmd_bench, cmd_demo, cmd_vectors
from stalk.cli.values import (
    DEFAULT_LISTEN_HOST,
    DURATION_FORMAT,
    VALUES,
    _address,
    _duration,
    _key_argument,
    _listen_address,
    _message_size,
    _peer_key,
    _seconds,
    _send_value,
    _serial,
    _socket_mode,
)
from stalk.renewal import DEFAULT_SERVICE_NAME, DEFAULT_VALIDITY
from stalk.summary import SUMMARY_CHARS, VALUE_CHARS

#: The event loops ``--backend`` offers.
BACKENDS: Final = ("asyncio", "trio")

#: How ``connect`` and ``send`` decide whom to trust, and which identity they use.
TRUST: Final = (
    "Trust works as in ssh: --peer KEY pins the server's key; without it the key "
    "remembered for the ADDRESS in $STALK_HOME/known_peers is pinned, and the first "
    "connection to an address records the key the server presents. With --authority FILE "
    "--name NAME the server is trusted by its certificate instead: it must present one "
    "for NAME from an authority in FILE. Your identity is FILE, or $STALK_HOME/identity "
    "if it exists, else a new key for this connection."
)

#: What ``add_subparsers`` returns.
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class _HelpFormatter(argparse.HelpFormatter):
    """Fills each paragraph of a description or epilog on its own; indented lines stay."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in text.split("\n\n"):
            if any(line.startswith(" ") for line in block.splitlines()):
                blocks.append("\n".join(indent + line for line in block.splitlines()))
            else:
                blocks.append(
                    textwrap.fill(
                        " ".join(block.split()),
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                    )
                )
        return "\n\n".join(blocks)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _global_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    """``--backend`` and ``-v``, on the main parser and on each command's alike.

    Each parser stores them under its own names (``prefix``), so that an option given
    before the command and one given after it both count (see :func:`_resolve_globals`).
    """
    group = parser.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "--backend",
        dest=f"{prefix}backend",
        choices=BACKENDS,
        help="the event loop (default: asyncio; trio needs pip install 'stalk[trio]')",
    )
    group.add_argument(
        "-v",
        "--verbose",
        dest=f"{prefix}verbose",
        action="count",
        default=0,
        help="show the library's log: -v adds info (connections established and ended, "
        "failed and refused clients of listen), -vv debug (default: warnings only)",
    )


def _resolve_globals(args: argparse.Namespace) -> None:
    """One ``backend`` and ``verbose`` from the options before and after the command."""
    backend = args.backend or args.global_backend
    args.backend_given = backend is not None
    args.backend = backend or "asyncio"
    args.verbose += args.global_verbose


def _command(
    commands: _Commands, name: str, summary: str, description: str, *examples: str
) -> argparse.ArgumentParser:
    """A command's parser: its help line, description, examples and the global options."""
    sub = commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=f"{_examples(*examples)}\n\n{EXIT_STATUSES}",
        formatter_class=_HelpFormatter,
    )
    _global_options(sub, "")
    return sub


def _identity_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "-f",
        "--file",
        metavar="FILE",
        help="your identity file (default: $STALK_HOME/identity; $STALK_HOME defaults to ~/.stalk)",
    )


def _peer_data_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--full",
        action="store_true",
        help="print received spacks whole (default: a summary of about "
        f"{SUMMARY_CHARS} characters, each text or bytes value cut to about {VALUE_CHARS}); "
        "control and bidi characters are escaped either way",
    )
    sub.add_argument(
        "--max-message-size",
        type=_message_size,
        metavar="BYTES",
        help="the largest encoded spack accepted from the peer, advertised to it "
        f"(stalk.Config.max_message_size, default {stalk.Config().max_message_size})",
    )


#: What an ADDRESS argument may be, as the help of connect, send and forget says it.
ADDRESS_HELP: Final = (
    "HOST:PORT ([::1]:7417 for IPv6), or unix:PATH for a unix domain socket "
    "(unix:@NAME: a Linux abstract name)"
)


def _dial_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "address", type=_address, metavar="ADDRESS", help=f"the listener: {ADDRESS_HELP}"
    )
    sub.add_argument(
        "--peer",
        type=_peer_key,
        metavar="KEY",
        help="pin the server's public key, stalk:... (what 'stalk id' prints on the server, "
        "not its SHA256: fingerprint); default: the key remembered in "
        "$STALK_HOME/known_peers, or trust on first use",
    )
    sub.add_argument(
        "--authority",
        metavar="FILE",
        help="trust the server by its certificate instead: FILE lists the authorities "
        "(stalk-authority:... lines) one of which must have issued it, for --name; "
        "known_peers is then not used",
    )
    sub.add_argument("--name", help="with --authority: the name the server's certificate must bear")
    _revocations_option(sub, "")
    _certificate_option(sub, "the server")
    _identity_option(sub)
    _peer_data_options(sub)


def _revocations_option(sub: argparse.ArgumentParser, reloaded: str) -> None:
    sub.add_argument(
        "--revocations",
        metavar="LIST",
        help="with --authority: refuse the certificates the revocation list LIST revokes"
        + reloaded,
    )


def _certificate_option(sub: argparse.ArgumentParser, whom: str) -> None:
    sub.add_argument(
        "--certificate",
        metavar="CERT",
        help=f"present this certificate (issued for your identity) to {whom}, which may "
        "require one",
    )


def _key_commands(commands: _Commands) -> None:
    """``keygen``, ``id`` and ``forget``."""
    sub = _command(
        commands,
        "keygen",
        "create your identity (a static key pair)",
        "Create an identity: the static X25519 key pair that names you to your peers. The "
        "private key is written to FILE with mode 0600, the public key to FILE.pub. An "
        "existing identity is kept unless --force is given.",
        "stalk keygen",
        "stalk keygen -f ./server.key",
    )
    _identity_option(sub)
    sub.add_argument("--force", action="store_true", help="replace an existing identity")
    sub.set_defaults(run=cmd_keygen)

    sub = _command(
        commands,
        "id",
        "print your public key and fingerprint",
        "Print your public key (stalk:..., what peers pin with --peer or list in an "
        "authorized-peers file) and, on a second line, its fingerprint (SHA256:..., to "
        "compare by eye). Create the identity first with 'stalk keygen'.",
        "stalk id",
        "stalk id -f ./server.key | head -1",
    )
    _identity_option(sub)
    sub.set_defaults(run=cmd_id)

    sub = _command(
        commands,
        "forget",
        "remove a remembered key from known_peers",
        "Remove the key remembered for ADDRESS from $STALK_HOME/known_peers, after a "
        "legitimate key change (the server has a new identity); the next connection "
        "records the key the server presents then.",
        "stalk forget 127.0.0.1:7417",
        "stalk forget '[::1]:7417'",
        "stalk forget unix:/run/app.sock",
    )
    sub.add_argument("address", type=_address, metavar="ADDRESS", help=ADDRESS_HELP)
    sub.set_defaults(run=cmd_forget)


def _authority_commands(commands: _Commands) -> None:
    """``authority init``, ``authority sign``, ``authority revoke`` and ``cert show``."""
    group = commands.add_parser(
        "authority",
        help="an authority: create it, sign certificates, revoke them",
        description="An authority is an Ed25519 key pair that signs certificates: 'this "
        "stalk key is NAME, in these groups, until then'. Peers that trust the authority "
        "accept the keys it certified without pinning them (SPEC.md section 25).",
        formatter_class=_HelpFormatter,
    )
    authority = group.add_subparsers(
        dest="authority_command", required=True, metavar="COMMAND", title="commands"
    )
    sub = _command(
        authority,
        "init",
        "create an authority key pair",
        "Create an authority: an Ed25519 key pair. The private key is written to FILE with "
        "mode 0600 (default: $STALK_HOME/authority), the public key to FILE.pub; the public "
        "form, stalk-authority:..., printed on the last line, is what peers put in their "
        "authorities file. An existing authority is kept unless --force is given.",
        "stalk authority init",
        "stalk authority init -f ./ca.key | tail -1 > authorities",
    )
    _authority_option(sub)
    sub.add_argument("--force", action="store_true", help="replace an existing authority")
    sub.set_defaults(run=cmd_authority_init)

    sub = _command(
        authority,
        "sign",
        "issue a certificate for a stalk key",
        "Issue a certificate: KEY (a stalk:... public key, what 'stalk id' prints) is NAME, "
        "in each GROUP, from now for DURATION. It is written to CERT_FILE (or printed) as a "
        "'#' description and a stalk-certificate: line. A name or group is 1 to 128 (a "
        "group 1 to 32) visible ASCII characters, no spaces; at most 16 groups.",
        "stalk authority sign --name db-1 --group db --valid 24h stalk:... -o db-1.cert",
        "stalk authority sign -f ./ca.key --name alice --valid 30d stalk:...",
    )
    _authority_option(sub)
    sub.add_argument("key", type=_key_argument, metavar="KEY", help="the stalk:... key to certify")
    sub.add_argument("--name", required=True, help="the name the certificate gives KEY")
    sub.add_argument(
        "--group",
        action="append",
        metavar="GROUP",
        help="a group the certificate puts KEY in (repeat for several)",
    )
    sub.add_argument(
        "--valid",
        type=_duration,
        required=True,
        metavar="DURATION",
        help=f"how long the certificate is valid from now: {DURATION_FORMAT}",
    )
    sub.add_argument(
        "--serial",
        type=_serial,
        metavar="N",
        help="the serial number to revoke it by (default: 64 random bits)",
    )
    sub.add_argument(
        "-o", "--output", metavar="CERT_FILE", help="where to write it (default: print it)"
    )
    sub.add_argument("--force", action="store_true", help="replace an existing CERT_FILE")
    sub.set_defaults(run=cmd_authority_sign)

    sub = _command(
        authority,
        "revoke",
        "add certificates or keys to a revocation list",
        "Revoke certificates by serial (--serial, or --cert naming a certificate file), or "
        "every certificate of a key (--key): the signed revocation list LIST_FILE gets them "
        "added to what it already revokes (it is created if missing, even empty) and is "
        "replaced atomically. A listener given the file reloads it when it changes.",
        "stalk authority revoke --cert db-1.cert -o revoked",
        "stalk authority revoke --serial 42 --key stalk:... -o revoked",
    )
    _authority_option(sub)
    sub.add_argument("--serial", type=_serial, action="append", metavar="N", help="a serial")
    sub.add_argument(
        "--key", type=_key_argument, action="append", metavar="KEY", help="a stalk:... key"
    )
    sub.add_argument(
        "--cert", action="append", metavar="CERT_FILE", help="a certificate file to revoke"
    )
    sub.add_argument(
        "-o", "--output", required=True, metavar="LIST_FILE", help="the revocation list file"
    )
    sub.set_defaults(run=cmd_authority_revoke)

    sub = _command(
        authority,
        "serve",
        "renew certificates online for enrolled keys",
        "Run the authority as a stalk service on [HOST:]PORT: keys enrolled in --enrolled "
        "FILE (lines 'stalk:KEY NAME [GROUP,GROUP...]', read again when it changes) "
        "connect and get a new certificate for their NAME and GROUPs, valid for --valid "
        "from then ('stalk cert renew', or stalk.CertificateKeeper in a program); any other "
        "key is refused. The service presents its own certificate from the authority, for "
        "--name, so clients need only the authority's public key. Its stalk identity is a "
        "new key each time unless --identity is given (never the authority's own key). "
        "HOST defaults to 127.0.0.1. Ctrl-C stops.",
        "stalk authority serve 7418 --enrolled enrolled --valid 24h",
        "stalk authority serve 0.0.0.0:7418 -f ca.key --enrolled enrolled --valid 1h -v",
    )
    sub.add_argument("address", type=_listen_address, metavar="[HOST:]PORT")
    _authority_option(sub)
    sub.add_argument(
        "--enrolled",
        required=True,
        metavar="FILE",
        help="who may renew, and as what: lines stalk:KEY NAME [GROUP,GROUP...]",
    )
    sub.add_argument(
        "--valid",
        type=_duration,
        default=DEFAULT_VALIDITY,
        metavar="DURATION",
        help=f"validity of each certificate issued: {DURATION_FORMAT} (default: 24h)",
    )
    sub.add_argument(
        "--name",
        default=DEFAULT_SERVICE_NAME,
        help=f"the name of the service's own certificate (default: {DEFAULT_SERVICE_NAME})",
    )
    sub.add_argument(
        "--identity",
        metavar="FILE",
        help="the service's stalk identity file (default: a new key each time)",
    )
    sub.set_defaults(max_message_size=None)
    sub.set_defaults(run=cmd_authority_serve)

    group = commands.add_parser(
        "cert",
        help="show a certificate (and check it)",
        description="Certificates signed by an authority (see 'stalk authority').",
        formatter_class=_HelpFormatter,
    )
    cert = group.add_subparsers(
        dest="cert_command", required=True, metavar="COMMAND", title="commands"
    )
    sub = _command(
        cert,
        "show",
        "print a certificate's fields; --authority checks it",
        "Print what CERT_FILE says: name, groups, the key it is for, its validity, serial "
        "and issuer. With --authority FILE (a file of stalk-authority: lines), also check "
        "it now, as a peer would: exit status 1 and the reason if it is not valid "
        "(unknown authority, forged, expired, revoked with --revocations...).",
        "stalk cert show db-1.cert",
        "stalk cert show db-1.cert --authority authorities --revocations revoked",
    )
    sub.add_argument("certificate", metavar="CERT_FILE", help="a certificate file")
    sub.add_argument("--authority", metavar="FILE", help="check it against the authorities in FILE")
    sub.add_argument(
        "--revocations", metavar="LIST_FILE", help="with --authority: a revocation list"
    )
    sub.set_defaults(run=cmd_cert_show)

    sub = _command(
        cert,
        "renew",
        "get a new certificate from an authority service",
        "Ask the authority service at HOST:PORT ('stalk authority serve') for a new "
        "certificate for your identity (FILE, or $STALK_HOME/identity), which the service "
        "must have enrolled, and write it to CERT_FILE (replacing it). The service is "
        "trusted by its own certificate: from an authority in --authority FILE, for the "
        "name --service-name. The new certificate is checked before it is written.",
        "stalk cert renew ca.example:7418 --authority authorities -o me.cert",
    )
    sub.add_argument("address", type=_address, metavar="HOST:PORT", help="the service")
    sub.add_argument(
        "--authority",
        required=True,
        metavar="FILE",
        help="the authorities (stalk-authority:... lines) one of which runs the service",
    )
    sub.add_argument(
        "--service-name",
        default=DEFAULT_SERVICE_NAME,
        metavar="NAME",
        help=f"the name of the service's certificate (default: {DEFAULT_SERVICE_NAME})",
    )
    sub.add_argument("-o", "--output", required=True, metavar="CERT_FILE", help="where to write it")
    sub.set_defaults(revocations=None, max_message_size=None)
    _identity_option(sub)
    sub.set_defaults(run=cmd_cert_renew)


def _authority_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "-f",
        "--file",
        metavar="AUTHORITY_FILE",
        help="the authority's private key file (default: $STALK_HOME/authority)",
    )


def _network_commands(commands: _Commands) -> None:
    """``listen``, ``connect`` and ``send``."""
    sub = _command(
        commands,
        "listen",
        "accept connections; print (or echo) what peers send",
        "Accept stalk connections on [HOST:]PORT, or on a unix domain socket (unix:PATH); "
        "print each peer that connects, a summary of each spack it sends, and how it left. "
        "With --echo, send every spack back. "
        f"HOST defaults to {DEFAULT_LISTEN_HOST} (this machine only); 0.0.0.0 or '[::]' "
        "accepts other machines. PORT 0 picks a free port (the first line shows it). A "
        "unix socket's file is removed when listen stops; one left by a listener that was "
        "killed is replaced. The identity is FILE, or $STALK_HOME/identity, created on "
        "first use. With --authority, only clients presenting a valid certificate from one "
        "of its authorities are admitted (and, with --allow-name or --allow-group, only "
        "those names or groups); --certificate presents ours, so that clients connect by "
        "name. Refused and failed clients are shown with -v. Ctrl-C stops.",
        "stalk listen 7417 --echo",
        "stalk listen 0.0.0.0:7417 --authorized-peers ~/.stalk/authorized_peers -v",
        "stalk listen 7417 --authority authorities --certificate db-1.cert --allow-group ops",
        "stalk listen '[::1]:0'",
        "stalk listen unix:/tmp/app.sock --socket-mode 660",
    )
    sub.add_argument(
        "address",
        type=_listen_address,
        metavar="ADDRESS",
        help="[HOST:]PORT, or unix:PATH for a unix domain socket (unix:@NAME: a Linux "
        "abstract name)",
    )
    sub.add_argument("--echo", action="store_true", help="send every spack back to its peer")
    sub.add_argument(
        "--authorized-peers",
        metavar="FILE",
        help="admit only the keys in FILE (one stalk:... key per line, # comments); "
        "default: admit any key",
    )
    sub.add_argument(
        "--socket-mode",
        type=_socket_mode,
        metavar="MODE",
        help="a unix socket file's permissions, in octal: 600 lets only you connect, 660 "
        "your group too (default: what the umask gives; connecting needs write permission)",
    )
    sub.add_argument(
        "--authority",
        metavar="FILE",
        help="admit only clients with a valid certificate from an authority in FILE "
        "(stalk-authority:... lines, # comments); default: no certificate needed",
    )
    sub.add_argument(
        "--allow-name",
        action="append",
        metavar="NAME",
        help="with --authority: admit certificates for NAME (repeat for several)",
    )
    sub.add_argument(
        "--allow-group",
        action="append",
        metavar="GROUP",
        help="with --authority: admit certificates in GROUP (repeat; a name or a group "
        "admits; default: any certified client)",
    )
    _revocations_option(sub, " (read again when it changes, at the next client)")
    _certificate_option(sub, "clients")
    _identity_option(sub)
    _peer_data_options(sub)
    sub.set_defaults(run=cmd_listen)

    sub = _command(
        commands,
        "connect",
        "send each line of input as a spack; print the replies",
        "Connect to ADDRESS, send each line of standard input as a spack of one value "
        "(read as a VALUE, below), and print every spack that comes back. Ctrl-D (the end "
        "of input) closes the connection cleanly once the peer has finished; Ctrl-C leaves "
        "at once. When the peer closes first, connect says so and exits at once, with "
        f"status 0 for a clean close and 1 for an error.\n\n{TRUST}\n\n{VALUES}",
        "stalk connect 127.0.0.1:7417",
        "printf '42\\nhello\\n' | stalk connect 127.0.0.1:7417 --peer stalk:...",
        "stalk connect unix:/tmp/app.sock",
        "stalk connect db.example:7417 --authority authorities --name db-1 --certificate me.cert",
    )
    _dial_options(sub)
    sub.set_defaults(run=cmd_connect)

    sub = _command(
        commands,
        "send",
        "send one spack and exit; --wait prints the reply",
        "Send one spack made of the VALUEs to ADDRESS and exit. With --wait, print the "
        f"first spack that comes back.\n\n{TRUST}\n\n{VALUES}",
        "stalk send 127.0.0.1:7417 42 hello \"b'raw'\" --wait 5",
        "stalk send 127.0.0.1:7417 \"'42'\"    # the text 42, not the number",
    )
    _dial_options(sub)
    sub.add_argument(
        "values",
        nargs="+",
        type=_send_value,
        metavar="VALUE",
        help="a Python literal, or text (see VALUE above)",
    )
    sub.add_argument(
        "--wait",
        type=_seconds,
        metavar="SECONDS",
        help="print the first reply, waiting at most SECONDS for it (default: do not wait)",
    )
    sub.set_defaults(run=cmd_send)


def _tool_commands(commands: _Commands) -> None:
    """``demo``, ``vectors`` and ``bench``."""
    sub = _command(
        commands,
        "demo",
        "self-checking demo on loopback (no setup needed)",
        "Run a self-checking demo on loopback: a listener, a first connection (XX) and a "
        "pinned one (IK), a spack of every value type and a 20 MiB spack checked byte for "
        "byte, and a wrong pinned key refused. Nothing outside a temporary directory is "
        "touched; the status is 0 only if every check passed.",
        "stalk demo",
        "stalk demo --backend trio",
    )
    sub.set_defaults(run=cmd_demo)

    sub = _command(
        commands,
        "vectors",
        "run published Noise test vectors",
        "Run published Noise test vector files (the cacophony and snow formats) through "
        "stalk's Noise layer and print how many passed, failed and were skipped (patterns "
        "and primitives stalk does not use); -v lists every vector.",
        "stalk vectors snow.txt cacophony.txt",
    )
    sub.add_argument("files", nargs="+", metavar="FILE", help="a vector file")
    sub.set_defaults(run=cmd_vectors)

    sub = _command(
        commands,
        "bench",
        "benchmark stalk against TLS 1.3 and plain TCP",
        "Benchmark stalk against TLS 1.3 and plain TCP, each side in its own process "
        "(src/stalk/bench/README.md explains every figure). --backend X is short for "
        "--backends X.",
        "stalk bench --quick",
        "stalk bench --smoke --backends asyncio",
    )
    bench.add_arguments(sub)
    sub.set_defaults(run=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    examples = _examples("stalk keygen", "stalk listen 7417 --echo", "stalk demo --backend trio")
    parser = argparse.ArgumentParser(
        prog="stalk",
        description="End-to-end encrypted, message-based connections over TCP or unix "
        "sockets: keys, a listener, a client, the demo and tools. 'stalk COMMAND --help' "
        "describes each command.",
        epilog=f"{examples}\n\n{EXIT_STATUSES}",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stalk {stalk.__version__}")
    _global_options(parser, "global_")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", title="commands"
    )
    _key_commands(commands)
    _authority_commands(commands)
    _network_commands(commands)
    _tool_commands(commands)
    return parser
