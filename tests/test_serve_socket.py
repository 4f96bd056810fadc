"""mi-serve's listening socket: the connections it accepts send without Nagle's delay (TCP_NODELAY), so a
kept-alive connection (a browser's) does not wait for the client's delayed ACK between a response's
headers and its body. asyncio, under uvicorn, sets TCP_NODELAY only on sockets made as TCP."""
from __future__ import annotations

import asyncio
import socket

from retrieval.serve_cli import _listen


def test_connections_accepted_on_mi_serves_socket_have_tcp_nodelay():
    async def accepted_nodelay() -> int:
        listener = _listen("127.0.0.1", 0)
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_connection(_reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connection, sock=listener)
        _reader, writer = await asyncio.open_connection(*listener.getsockname())
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(accepted_nodelay()) != 0
