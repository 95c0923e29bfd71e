"""Authorities and certificates: a signed statement that a stalk key belongs to a name.

Theory of operation
-------------------
An **authority** is an Ed25519 key pair (:class:`Authority`; its public half is a
:class:`PublicAuthority`, printed ``stalk-authority:`` + 43 base64url characters). It
signs **certificates** (:class:`Certificate`): "the stalk key S is NAME, member of GROUPS,
from NOT_BEFORE until NOT_AFTER", with a serial number, the issuer's fingerprint and room
for extensions. A peer that trusts the authority (:class:`Authorities`) then needs no
pinned key and no trust on first use: the other side presents its certificate in its
encrypted handshake payload, and the certificate's subject must be the very static key
the Noise handshake authenticated (SPEC "Certificates").

Everything here is SPEC "Certificates" in code:

- one canonical encoding: a msgpack array in a fixed order, each value in msgpack's
  shortest form. Decoding re-encodes what it read and refuses anything that differs, so a
  certificate has exactly one byte string, and its signature one meaning;
- the signature is Ed25519 over a domain-separated message (``stalk certificate 1`` and a
  zero byte, then every byte of the certificate before the signature), so it can never be
  mistaken for a signature of anything else;
- verification (:meth:`Authorities.verify`) runs its checks in one stated order and
  raises one :class:`~stalk.CertificateError` subclass per failure, so a caller (and a
  test) can tell an expired certificate from a forged one;
- a **revocation list** (:class:`RevocationList`), signed the same way under its own
  domain, names serials and subject keys that an authority no longer vouches for.

The package, one job a module (this one re-exports their names):

- ``encoding``: the bounds, prefixes and signing contexts, base64url, canonical msgpack,
  field checks, and the text file forms shared by the three below;
- ``authority``: :class:`PublicAuthority` and :class:`Authority`, which signs, and its key
  files;
- ``certificate``: the certificate format, :class:`Extension` and :class:`Certificate`,
  decoded with every check of form;
- ``revocation``: :class:`RevocationList` and the :class:`RevocationFile` kept in force;
- ``trust``: :class:`Authorities` (verification), :class:`CertifiedIdentity` and
  :class:`CertificatePolicy`.

This package is part of the sans-IO core: it never looks at a clock (the caller passes
``now``, or a ``clock`` to :class:`CertificatePolicy`), and its only I/O is reading and
writing the files a person handles (:mod:`stalk._files`, as :mod:`stalk.identity` does).
"""

from __future__ import annotations

from stalk.certificates.authority import Authority, PublicAuthority
from stalk.certificates.certificate import Certificate, Extension
from stalk.certificates.encoding import (
    AUTHORITY_PREFIX,
    CERTIFICATE_PREFIX,
    DEFAULT_CLOCK_SKEW,
    MAX_CERTIFICATE_SIZE,
    REVOCATIONS_PREFIX,
    check_names,
    utc_text,
)

# The format's other bounds and signing contexts, readable here as before the split.
from stalk.certificates.encoding import CERTIFICATE_CONTEXT as CERTIFICATE_CONTEXT
from stalk.certificates.encoding import CERTIFICATE_VERSION as CERTIFICATE_VERSION
from stalk.certificates.encoding import MAX_EXTENSION_ID_LEN as MAX_EXTENSION_ID_LEN
from stalk.certificates.encoding import MAX_EXTENSION_VALUE as MAX_EXTENSION_VALUE
from stalk.certificates.encoding import MAX_EXTENSIONS as MAX_EXTENSIONS
from stalk.certificates.encoding import MAX_GROUP_LEN as MAX_GROUP_LEN
from stalk.certificates.encoding import MAX_GROUPS as MAX_GROUPS
from stalk.certificates.encoding import MAX_NAME_LEN as MAX_NAME_LEN
from stalk.certificates.encoding import MAX_REVOKED as MAX_REVOKED
from stalk.certificates.encoding import MAX_SERIAL as MAX_SERIAL
from stalk.certificates.encoding import MAX_TIME as MAX_TIME
from stalk.certificates.encoding import REVOCATIONS_CONTEXT as REVOCATIONS_CONTEXT
from stalk.certificates.encoding import REVOCATIONS_VERSION as REVOCATIONS_VERSION
from stalk.certificates.encoding import SIGNED_CACHE as SIGNED_CACHE
from stalk.certificates.encoding import _montgomery as _montgomery
from stalk.certificates.revocation import RevocationFile, RevocationList
from stalk.certificates.trust import Authorities, CertificatePolicy, CertifiedIdentity

__all__ = [
    "AUTHORITY_PREFIX",
    "CERTIFICATE_PREFIX",
    "DEFAULT_CLOCK_SKEW",
    "MAX_CERTIFICATE_SIZE",
    "REVOCATIONS_PREFIX",
    "Authorities",
    "Authority",
    "Certificate",
    "CertificatePolicy",
    "CertifiedIdentity",
    "Extension",
    "PublicAuthority",
    "RevocationFile",
    "RevocationList",
    "check_names",
    "utc_text",
]
