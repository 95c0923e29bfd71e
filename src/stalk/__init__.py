"""stalk: peer-to-peer, end-to-end encrypted, message-based connections over TCP.

Unix domain sockets and any anyio byte stream carry them as well (:func:`connect_unix`,
:class:`StreamListener`).

Two peers run a Noise handshake (XX when the caller does not know the peer's key, IK when
it does) and then exchange *spacks*: ordered lists of typed values, delivered whole or not
at all. The architecture is a sans-IO core (:mod:`stalk.session` and the modules it uses)
under a thin anyio layer (:mod:`stalk.connection`, :mod:`stalk.listener`), so the same code
runs on asyncio and trio. SPEC.md defines the wire protocol.
"""

from stalk._version import __version__
from stalk.channel import Channel, ChannelHandler
from stalk.config import Config
from stalk.connection import (
    Authorize,
    Connection,
    MessageHandler,
    StalkAttribute,
    connect,
    connect_unix,
)
from stalk.errors import (
    ChannelClosed,
    ChannelLimitExceeded,
    ChannelLimitReached,
    ChannelReset,
    ClosedByPeer,
    ConnectFailed,
    ConnectionClosed,
    ConnectionLost,
    DecryptionFailed,
    FlowControlError,
    HandshakeFailed,
    HandshakeTimeout,
    IdentityFileError,
    IdleTimeout,
    InvalidPeerKey,
    InvalidSpackValue,
    LocalProtocolError,
    MalformedSpack,
    MessageLimitExceeded,
    MessageTooLarge,
    NonceExhausted,
    PeerIdentityMismatch,
    PeerRefused,
    ProtocolError,
    StalkError,
)
from stalk.identity import Identity, PublicIdentity
from stalk.known_peers import AuthorizedPeers, KnownPeers, stalk_home
from stalk.listener import (
    ConnectionHandler,
    Listener,
    StreamListener,
    UnixListener,
    create_listener,
    create_unix_listener,
    listen,
    listen_unix,
)
from stalk.spack import Float32, Received, Spack, SpackValue
from stalk.wire import CloseCode

__all__ = [
    "Authorize",
    "AuthorizedPeers",
    "Channel",
    "ChannelClosed",
    "ChannelHandler",
    "ChannelLimitExceeded",
    "ChannelLimitReached",
    "ChannelReset",
    "CloseCode",
    "ClosedByPeer",
    "Config",
    "ConnectFailed",
    "Connection",
    "ConnectionClosed",
    "ConnectionHandler",
    "ConnectionLost",
    "DecryptionFailed",
    "Float32",
    "FlowControlError",
    "HandshakeFailed",
    "HandshakeTimeout",
    "Identity",
    "IdentityFileError",
    "IdleTimeout",
    "InvalidPeerKey",
    "InvalidSpackValue",
    "KnownPeers",
    "Listener",
    "LocalProtocolError",
    "MalformedSpack",
    "MessageHandler",
    "MessageLimitExceeded",
    "MessageTooLarge",
    "NonceExhausted",
    "PeerIdentityMismatch",
    "PeerRefused",
    "ProtocolError",
    "PublicIdentity",
    "Received",
    "Spack",
    "SpackValue",
    "StalkAttribute",
    "StalkError",
    "StreamListener",
    "UnixListener",
    "__version__",
    "connect",
    "connect_unix",
    "create_listener",
    "create_unix_listener",
    "listen",
    "listen_unix",
    "stalk_home",
]
