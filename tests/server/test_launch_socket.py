"""The server's pre-bound listening socket gives every accepted connection Nagle's algorithm off
(``TCP_NODELAY``), as a socket asyncio binds itself would: with it on, a token event written
while the previous one is unacknowledged waits for the client's delayed ACK."""

from __future__ import annotations

import asyncio
import socket

from truffula.server.launch import bind_socket


def test_accepted_connections_have_nagle_off() -> None:
    async def main() -> int:
        sock = bind_socket("127.0.0.1", 0)
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            nodelay = await asyncio.wait_for(accepted, 5)
            writer.close()
        return nodelay

    assert asyncio.run(main()) == 1
