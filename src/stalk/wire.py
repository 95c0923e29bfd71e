"""Every constant of the stalk wire protocol, version 1 (SPEC.md gives the meaning of each).

Nothing here does anything; the sans-IO modules (:mod:`stalk.framing`,
:mod:`stalk.handshake`, :mod:`stalk.records`, :mod:`stalk.session`) import their numbers
from this one place so that SPEC.md and the code can be checked against each other.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

__all__ = [
    "DEFAULT_CHANNEL_WINDOW",
    "DEFAULT_CONNECTION_WINDOW",
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_REKEY_AFTER_BYTES",
    "DEFAULT_REKEY_AFTER_MESSAGES",
    "EXT_ARRAY_FLOAT32",
    "EXT_ARRAY_FLOAT64",
    "EXT_ARRAY_INT8",
    "EXT_ARRAY_INT16",
    "EXT_ARRAY_INT32",
    "EXT_ARRAY_INT64",
    "EXT_ARRAY_ITEMSIZE",
    "EXT_ARRAY_UINT8",
    "EXT_ARRAY_UINT16",
    "EXT_ARRAY_UINT32",
    "EXT_ARRAY_UINT64",
    "EXT_FLOAT32",
    "EXT_TUPLE",
    "FRAME_HEADER_LEN",
    "MAGIC",
    "MAX_CHANNELS_LIMIT",
    "MAX_CHANNEL_ID",
    "MAX_CLEARTEXT_PAYLOAD",
    "MAX_CLOSE_REASON",
    "MAX_DEPTH",
    "MAX_FRAME_BODY",
    "MAX_HANDSHAKE_PAYLOAD",
    "MAX_MESSAGE_SIZE_LIMIT",
    "MAX_NOISE_MESSAGE",
    "MAX_PING_PAYLOAD",
    "MAX_PLAINTEXT",
    "MAX_REFUSAL_REASON",
    "MAX_WINDOW",
    "MIN_CHANNEL_WINDOW",
    "MIN_CONNECTION_WINDOW",
    "MIN_MAX_MESSAGE_SIZE",
    "PATTERNS",
    "PREAMBLE_LEN",
    "PROTOCOL_NAMES",
    "PROTOCOL_VERSION",
    "RECORD_CAPACITY",
    "TAGLEN",
    "WEIGHT_FACTOR",
    "WEIGHT_FLOOR",
    "CloseCode",
    "Pattern",
    "RecordKind",
    "close_code_name",
]

#: The first five bytes an initiator sends: ASCII ``STALK``.
MAGIC: Final = b"STALK"
#: The wire protocol version this code speaks (preamble byte 5, handshake payload "version").
PROTOCOL_VERSION: Final = 1
#: ``MAGIC || version (u8) || pattern (2 ASCII bytes)``.
PREAMBLE_LEN: Final = 8

Pattern = Literal["XX", "IK"]
PATTERNS: Final[tuple[Pattern, ...]] = ("XX", "IK")
#: The Noise protocol run for each pattern byte pair in the preamble.
PROTOCOL_NAMES: Final[dict[Pattern, str]] = {
    "XX": "Noise_XX_25519_AESGCM_SHA256",
    "IK": "Noise_IK_25519_AESGCM_SHA256",
}

#: Every message on the wire after the preamble is ``u16 big-endian length || body``.
FRAME_HEADER_LEN: Final = 2
#: A frame body is one Noise message, so it is bounded by Noise's 65535-byte limit.
MAX_FRAME_BODY: Final = 65_535

#: Bounds the msgpack map carried in a handshake message that may hold a certificate (XX
#: messages 2 and 3, IK messages 1 and 2): the parameters (well under 200 bytes) and a
#: certificate of at most 2,048 bytes (2,063 with its key), rounded up to 3 KiB.
MAX_HANDSHAKE_PAYLOAD: Final = 3_072
#: Bounds XX message 1's payload: cleartext, never a certificate (it is the empty map).
MAX_CLEARTEXT_PAYLOAD: Final = 1_024
#: Bounds a refusal's reason (one length byte).
MAX_REFUSAL_REASON: Final = 255
#: Bounds a CLOSE record's reason text, in UTF-8 bytes.
MAX_CLOSE_REASON: Final = 1_024
#: Bounds a PING/PONG payload: enough for a nonce or timestamp, not a data channel.
MAX_PING_PAYLOAD: Final = 1_024

#: Noise §3: no Noise message (handshake or transport) may exceed 65535 bytes.
MAX_NOISE_MESSAGE: Final = 65_535
#: AESGCM's authentication tag length (Noise §12.3).
TAGLEN: Final = 16
#: The largest plaintext whose ciphertext still fits one Noise message.
MAX_PLAINTEXT: Final = MAX_NOISE_MESSAGE - TAGLEN

#: Plaintext bytes per Noise message available for records. Three bytes are held back in
#: every transport message so that a REKEY record (which must come last) always fits.
RECORD_CAPACITY: Final = MAX_PLAINTEXT - 3

#: Default limit on one reassembled spack (encoded size): bounds what an untrusted peer can
#: make us buffer.
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
#: Smallest limit a peer may advertise: anything smaller could not carry ordinary messages.
MIN_MAX_MESSAGE_SIZE: Final = 1_024
#: Largest limit a peer may advertise (2**53, exact in every JSON/float-based peer).
MAX_MESSAGE_SIZE_LIMIT: Final = 2**53
#: Decoded-weight budget of one spack (SPEC "Decoded weight"): its objects may weigh at most
#: ``WEIGHT_FACTOR`` times its encoded size, plus ``WEIGHT_FLOOR``. The floor admits every
#: spack small enough for one record (its heaviest shape weighs 108 bytes per wire byte).
WEIGHT_FACTOR: Final = 8
WEIGHT_FLOOR: Final = 8 * 1024 * 1024
# Channels (SPEC "Channels"), negotiated by three handshake parameters.
#: The most channels a party may let its peer have open towards it at once.
MAX_CHANNELS_LIMIT: Final = 65_535
#: The largest channel id: ids stay well within the channel varint's 5 bytes.
MAX_CHANNEL_ID: Final = 2**31 - 1
#: The largest credit a window may hold; a grant past it is a FLOW_CONTROL_ERROR.
MAX_WINDOW: Final = 2**31 - 1
#: Smallest per-channel window a party may grant: less would make every spack a trickle.
MIN_CHANNEL_WINDOW: Final = 1_024
#: Smallest connection window: one full Noise message of records.
MIN_CONNECTION_WINDOW: Final = RECORD_CAPACITY
#: stalk's defaults: what it lets a peer open, and the credit it grants. A stream goes no
#: faster than its window per round trip of a grant (the receiver's work included):
#: measured between two processes on loopback, 1 MiB spacks on channel 0 went at 0.36x a
#: connection without channels with windows of 256 KiB / 1 MiB, 0.62x with 1 / 4 MiB and
#: 0.77x with 4 / 16 MiB (16 / 64 MiB gained nothing more). The connection's window is
#: what a peer can make us hold beside the assembly slot, as much as one spack at the
#: default max_message_size.
DEFAULT_MAX_CHANNELS: Final = 100
DEFAULT_CHANNEL_WINDOW: Final = 4 * 1024 * 1024
DEFAULT_CONNECTION_WINDOW: Final = 16 * 1024 * 1024

#: Default sender rekey policy: after this many Noise transport messages...
DEFAULT_REKEY_AFTER_MESSAGES: Final = 2**16
#: ...or this many plaintext bytes, whichever comes first (SPEC "Rekey").
DEFAULT_REKEY_AFTER_BYTES: Final = 2**30


#: Deepest container nesting in a spack (SPEC "Nesting depth"): deep enough for any real
#: message tree, shallow enough that a peer cannot make a decoder (or the application
#: walking the result) recurse without bound. Both ends must agree, so it is fixed.
MAX_DEPTH: Final = 32

# Ext codes (SPEC "Spack encoding"): part of the wire format, never renumbered. Negative
# codes are msgpack's own (timestamp = -1) and, like every code not listed, rejected.
#: A float 32 scalar (msgpack's own float 32 decodes to a Python float, losing the type).
EXT_FLOAT32: Final = 1
#: A tuple (msgpack has one array type, which decodes to a list).
EXT_TUPLE: Final = 2
#: Typed numeric arrays, one code per element type, so the receiver rebuilds the exact
#: element type without a per-element encoding; 3..15 stay free for future scalars.
EXT_ARRAY_INT8: Final = 16
EXT_ARRAY_UINT8: Final = 17
EXT_ARRAY_INT16: Final = 18
EXT_ARRAY_UINT16: Final = 19
EXT_ARRAY_INT32: Final = 20
EXT_ARRAY_UINT32: Final = 21
EXT_ARRAY_INT64: Final = 22
EXT_ARRAY_UINT64: Final = 23
EXT_ARRAY_FLOAT32: Final = 24
EXT_ARRAY_FLOAT64: Final = 25
#: Bytes per element of each typed-array ext code.
EXT_ARRAY_ITEMSIZE: Final[dict[int, int]] = {
    EXT_ARRAY_INT8: 1,
    EXT_ARRAY_UINT8: 1,
    EXT_ARRAY_INT16: 2,
    EXT_ARRAY_UINT16: 2,
    EXT_ARRAY_INT32: 4,
    EXT_ARRAY_UINT32: 4,
    EXT_ARRAY_INT64: 8,
    EXT_ARRAY_UINT64: 8,
    EXT_ARRAY_FLOAT32: 4,
    EXT_ARRAY_FLOAT64: 8,
}


class RecordKind(enum.IntEnum):
    """The kind byte of a transport record (SPEC "Records")."""

    #: A whole spack, or the last piece of a fragmented one.
    MESSAGE = 0x01
    #: A non-final piece of a spack; the next MESSAGE on the channel completes it.
    FRAGMENT = 0x02
    #: Authenticated end of this direction: ``code (u16 BE) || reason (UTF-8)``.
    CLOSE = 0x03
    #: Liveness probe; the receiver answers with PONG carrying the same payload.
    PING = 0x04
    #: Answer to PING.
    PONG = 0x05
    #: The sender rekeys its sending cipher after this Noise message (empty body).
    REKEY = 0x06
    #: First record from the party that read the last handshake message (empty body).
    READY = 0x07
    #: Channels only: ends both directions of a channel: ``code (u16 BE) || reason``.
    RESET = 0x08
    #: Channels only: more credit for the channel's data: ``uvarint(increment)``.
    WINDOW = 0x09
    #: Channels only, on channel 0: more credit for the connection's data.
    CONNECTION_WINDOW = 0x0A


class CloseCode(enum.IntEnum):
    """Reasons for a refusal (one byte) or a CLOSE record (two bytes), SPEC "Close codes".

    Codes ``0x1000``-``0xFFFF`` are free for applications (CLOSE only).
    """

    #: Normal end of the stream (never used as a refusal).
    NORMAL = 0
    #: The preamble names a version or pattern this peer does not speak.
    UNSUPPORTED = 1
    #: IK message 1 could not be decrypted: the responder does not hold the pinned key.
    DECRYPT_FAILED = 2
    #: The peer's identity is not authorized.
    NOT_AUTHORIZED = 3
    #: The responder is at a limit (connections or handshakes in progress); try later.
    BUSY = 4
    #: The peer broke the protocol.
    PROTOCOL_ERROR = 5
    #: A spack exceeded the receiver's advertised limit.
    MESSAGE_TOO_LARGE = 6
    #: The sender hit an internal error (e.g. an application handler failed).
    INTERNAL_ERROR = 7
    #: The sender is shutting down.
    GOING_AWAY = 8
    #: The peer took too long (handshake or idle timeout).
    TIMEOUT = 9
    #: A public key in a handshake message is not a canonical, usable X25519 key (low
    #: order, bit 255 set, or u >= 2^255 - 19).
    INVALID_KEY = 10
    #: The peer opened more channels than we let it have open at once.
    CHANNEL_LIMIT = 11
    #: The peer sent data beyond the credit granted, or granted credit past the maximum.
    FLOW_CONTROL_ERROR = 12
    #: The peer's certificate was refused (missing, expired, revoked, forged, for another
    #: key or name...: SPEC "Certificates"), before the connection was established.
    CERTIFICATE_REFUSED = 13


def close_code_name(code: int) -> str:
    """A close code's name for messages (``NOT_AUTHORIZED``), or ``code N`` if unknown."""
    try:
        return CloseCode(code).name
    except ValueError:
        return f"code {code}"
