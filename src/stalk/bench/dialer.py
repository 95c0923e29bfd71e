"""How the client worker opens a connection of each kind the benchmark measures.

stalk XX and IK, with and without certificates (new and returning peers), with a raised
message limit, with channels; TLS 1.3; plain TCP. Each ``dial`` is one full handshake.
"""

from __future__ import annotations

import time
from typing import Final

import anyio
from anyio.abc import AsyncResource

import stalk
from stalk.bench import BIG_LIMIT, CERTIFIED_NAME, CHANNEL_LIMIT, HOST
from stalk.bench.common import (
    BenchError,
    _client_ssl_context,
    bench_authority,
    bench_certificate,
)

#: Distinct client certificates the certified handshakes cycle through: more than a
#: verifier caches (SIGNED_CACHE, 256), so the server checks a signature every time, as
#: it would for many different clients.
_CLIENT_CERTIFICATES: Final = 512


class _Dialer:
    """The client's side of every transport: its keys, certificates, configs and TLS context.

    The static key is made once per process, as a real client's would be.
    """

    def __init__(self, ports: dict[str, int], server_key: str, cafile: str) -> None:
        self.ports = ports
        self.server_key = stalk.PublicIdentity.from_string(server_key)
        self.identity = stalk.Identity.generate()
        self.ssl_context = _client_ssl_context(cafile)
        self.big_config = stalk.Config(max_message_size=BIG_LIMIT)
        self.channel_config = stalk.Config(max_channels=CHANNEL_LIMIT)
        self.channel_big_config = stalk.Config(
            max_channels=CHANNEL_LIMIT, max_message_size=BIG_LIMIT
        )
        now = int(time.time())
        #: The certified handshakes' client certificates, cycled (see _CLIENT_CERTIFICATES).
        self.certificates = [
            bench_certificate(self.identity, "bench-client", serial, now)
            for serial in range(_CLIENT_CERTIFICATES)
        ]
        self._next_certificate = 0
        #: The authority the certified handshakes trust, in its public form: a client loads
        #: it once (deriving it from the private key costs more than a handshake's check).
        self.authority = bench_authority().public
        #: The returning peers' trust: kept, so it remembers the server's certificate.
        self.known_authorities = stalk.Authorities([self.authority])

    async def dial(self, kind: str) -> AsyncResource:
        """Open one connection of ``kind`` (full handshake) and return it."""
        if kind == "stalk_xx":
            return await stalk.connect(HOST, self.ports["stalk"], identity=self.identity)
        if kind in ("stalk_xx_cert_known", "stalk_ik_cert_known"):
            # Returning peers: one certificate each way, seen before by both verifiers.
            return await stalk.connect(
                HOST,
                self.ports["stalk_cert"],
                self.server_key if kind == "stalk_ik_cert_known" else None,
                identity=self.identity,
                certificate=self.certificates[0],
                authorities=self.known_authorities,
                expect_name=CERTIFIED_NAME,
            )
        if kind in ("stalk_xx_cert", "stalk_ik_cert"):
            # A fresh Authorities each time: the server's certificate is checked every time
            # (an Authorities keeps the certificates it verified), as a new client would.
            self._next_certificate = (self._next_certificate + 1) % len(self.certificates)
            return await stalk.connect(
                HOST,
                self.ports["stalk_cert"],
                self.server_key if kind == "stalk_ik_cert" else None,
                identity=self.identity,
                certificate=self.certificates[self._next_certificate],
                authorities=stalk.Authorities([self.authority]),
                expect_name=CERTIFIED_NAME,
            )
        if kind in ("stalk", "stalk_ik", "stalk_plain"):
            return await stalk.connect(
                HOST, self.ports["stalk"], self.server_key, identity=self.identity
            )
        if kind == "stalk_big":
            return await stalk.connect(
                HOST,
                self.ports["stalk_big"],
                self.server_key,
                identity=self.identity,
                config=self.big_config,
            )
        if kind in ("stalk_ch0", "stalk_ch0_plain", "stalk_chfan"):
            return await stalk.connect(
                HOST,
                self.ports["stalk_ch"],
                self.server_key,
                identity=self.identity,
                config=self.channel_config,
            )
        if kind == "stalk_chbig":
            return await stalk.connect(
                HOST,
                self.ports["stalk_chbig"],
                self.server_key,
                identity=self.identity,
                config=self.channel_big_config,
            )
        if kind in ("tls", "tls2"):
            return await anyio.connect_tcp(
                HOST,
                self.ports["tls"],
                ssl_context=self.ssl_context,
                tls=True,
                tls_standard_compatible=False,
            )
        if kind == "tcp":
            return await anyio.connect_tcp(HOST, self.ports["tcp"])
        raise BenchError(f"unknown connection kind {kind!r}")
