"""A TCP proxy on loopback that can partition one client from its server (test plumbing for network faults)."""

from __future__ import annotations

import asyncio
import contextlib


class PartitionableProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``; ``partition()`` stops every byte in both directions
    (connections stay open, as across a dropped network link: the client waits out its own timeouts),
    ``heal()`` cuts the stalled connections so the client reconnects."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> PartitionableProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def partition(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        self._open.set()

    async def close(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open.is_set():  # a new connection across the cut: accepted, then silence (a dropped link)
            self._writers.add(writer)
            await reader.read()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if not self._open.is_set():
                    return  # partitioned: what was sent is lost with the link
                writer.write(data)
                await writer.drain()
