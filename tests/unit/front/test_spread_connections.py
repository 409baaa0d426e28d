"""A generation response ends its connection when the front has several workers, so a kept-alive
client's next request goes to whichever worker accepts it first; other routes keep theirs.

The real admission middleware in front of a stand-in app, served by uvicorn (what BentoML runs),
and a client on a raw socket that sends its next request on the same connection.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvicorn

from services.front.admission import AdmissionMiddleware
from services.front.inflight import SequenceBudget


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
    """The first response, and what the same connection gives for a second request (b"": closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request(first))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
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


def serve_and_ask(close_after_generation: bool, first: str) -> tuple[bytes, bytes]:
    middleware = AdmissionMiddleware(app, max_body_bytes=4096, budget=SequenceBudget(4, per_request=4), tier=None,
                                     timeout_s=30, max_streams_per_request=1,
                                     close_after_generation=close_after_generation)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(middleware, host="127.0.0.1", port=port, lifespan="off", log_config=None))

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


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate"])
def test_a_generation_response_ends_its_connection(path):
    head, second = serve_and_ask(True, path)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in head.lower()
    assert second == b"", "the server answered a second request on the connection"


def test_other_routes_keep_their_connection():
    head, second = serve_and_ask(True, "/v1/models")
    assert b"connection: close" not in head.lower()
    assert second.startswith(b"HTTP/1.1 200")


def test_with_one_worker_a_generation_keeps_its_connection():
    head, second = serve_and_ask(False, "/v1/chat/completions")
    assert b"connection: close" not in head.lower()
    assert second.startswith(b"HTTP/1.1 200")
