"""A generation response ends its connection when the service has several workers, so a
kept-alive client's next request goes to whichever worker accepts it first; other routes keep
theirs.

The real middleware (services/connection.py) on the front's generation paths, served by uvicorn
(what BentoML runs), and a client on a raw socket that sends its next request on the same
connection.
"""

from __future__ import annotations

import asyncio

import pytest
import uvicorn

from harness import free_port
from services.connection import SpreadConnections
from services.front.admission import GENERATION_PATHS


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await receive()
    body = b'{"ok":true}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def request(path: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: front\r\nContent-Type: application/json\r\n"
            f"Content-Length: 2\r\n\r\n{{}}").encode()


async def two_requests_on_one_connection(port: int, first: str) -> tuple[bytes, bytes]:
    """The first response's head, and what the same connection gives for a second request (b"": closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request(first))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        await asyncio.wait_for(reader.readexactly(length), 10)
        try:
            writer.write(request("/v1/models"))
            await writer.drain()
            second = await asyncio.wait_for(reader.read(64), 10)
        except ConnectionError:
            second = b""
        return head, second
    finally:
        writer.close()


def serve_and_ask(served, first: str) -> tuple[bytes, bytes]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(served, host="127.0.0.1", port=port, lifespan="off", log_config=None))

    async def main():
        serving = asyncio.create_task(server.serve())
        deadline = asyncio.get_running_loop().time() + 10
        while not server.started:
            assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
            assert not serving.done(), serving
            await asyncio.sleep(0.01)
        try:
            return await two_requests_on_one_connection(port, first)
        finally:
            server.should_exit = True
            await serving

    return asyncio.run(main())


@pytest.mark.parametrize("path", sorted(GENERATION_PATHS))
def test_a_generation_response_ends_its_connection(path):
    head, second = serve_and_ask(SpreadConnections(app, paths=GENERATION_PATHS), path)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in head.lower()
    assert second == b"", "the server answered a second request on the connection"


def test_other_routes_keep_their_connection():
    head, second = serve_and_ask(SpreadConnections(app, paths=GENERATION_PATHS), "/v1/models")
    assert b"connection: close" not in head.lower()
    assert second.startswith(b"HTTP/1.1 200")


def test_without_the_middleware_a_generation_keeps_its_connection():
    """What the middleware changes: uvicorn alone keeps the connection alive."""
    head, second = serve_and_ask(app, "/v1/chat/completions")
    assert b"connection: close" not in head.lower()
    assert second.startswith(b"HTTP/1.1 200")
