"""In-memory anyio byte streams for tests that need no sockets."""

from __future__ import annotations

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream
from anyio.streams.stapled import StapledByteStream


class _Send(ByteSendStream):
    def __init__(self, stream: anyio.abc.ObjectSendStream[bytes]) -> None:
        self._stream = stream

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _Receive(ByteReceiveStream):
    def __init__(self, stream: anyio.abc.ObjectReceiveStream[bytes]) -> None:
        self._stream = stream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._stream.receive()

    async def aclose(self) -> None:
        await self._stream.aclose()


def byte_stream_pair() -> tuple[StapledByteStream, StapledByteStream]:
    """Two connected byte streams (each write arrives as one chunk)."""
    a_send, b_receive = anyio.create_memory_object_stream[bytes](100)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](100)
    a = StapledByteStream(_Send(a_send), _Receive(a_receive))
    b = StapledByteStream(_Send(b_send), _Receive(b_receive))
    return a, b
