"""Ephemeral keys made ahead of need (:func:`stalk._noise.prepare_ephemeral`).

A handshake waiting for its peer's message makes the next handshake's ephemeral key, so
that the next one does not make it while its own peer waits. What must hold: every key is
taken by one handshake only, never twice; a key made ahead is the one the next handshake
sends; a forked child never takes its parent's.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import stalk
from helpers import serving
from stalk import _noise
from stalk.identity import Identity
from stalk.session import Role, Session

#: Message 1 on the wire: the preamble (8 bytes), the frame header (2), then ``e``.
_E = slice(10, 42)


def _message_1_key() -> bytes:
    """The ephemeral public key a new initiator's first message carries."""
    return bytes(Session(Role.INITIATOR, Identity.generate()).data_to_send()[_E])


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def test_the_next_handshake_sends_the_key_made_ahead_and_the_one_after_a_new_one() -> None:
    _noise._SPARE.clear()
    _noise.prepare_ephemeral()
    spare = _public(_noise._SPARE[0])
    _noise.prepare_ephemeral()  # one is waiting already: nothing more is made
    assert _public(_noise._SPARE[0]) == spare
    assert _message_1_key() == spare
    assert not _noise._SPARE
    assert _message_1_key() != spare


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_forked_child_never_takes_its_parents_key() -> None:
    _noise.prepare_ephemeral()
    spare = _noise._SPARE[0]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it holds a key made ahead, and leave
        os.write(write_end, b"held" if _noise._SPARE else b"none")
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as child:
        assert child.read() == b"none"
    assert _noise._SPARE[0] is spare  # the parent's is still there, for it alone


@pytest.mark.parametrize("pattern", ["XX", "IK"])
async def test_connections_take_keys_made_while_handshakes_waited(
    anyio_backend: str, pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[tuple[bytes, bool]] = []  # each key taken, and whether it was made ahead
    new_ephemeral = _noise._new_ephemeral

    def recording() -> X25519PrivateKey:
        ahead = bool(_noise._SPARE)
        key = new_ephemeral()
        taken.append((_public(key), ahead))
        return key

    monkeypatch.setattr(_noise, "_new_ephemeral", recording)
    _noise._SPARE.clear()
    async with serving() as (host, port, identity):
        for _ in range(5):
            peer = identity.public if pattern == "IK" else None
            async with await stalk.connect(host, port, peer) as conn:
                await conn.send(stalk.Spack("ping"))
                assert await conn.receive() == stalk.Spack("ping")
    keys = [key for key, _ in taken]
    assert len(keys) == 10  # one per party per handshake...
    assert len(set(keys)) == 10  # ...never one twice
    assert sum(ahead for _, ahead in taken) >= 5  # made while a handshake waited
