"""HTTP/1.1 requests written byte for byte: header values no client library would send, bodies sent in chunks
that stop wherever the test wants."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit


def _head(url: str, method: str, headers: list[tuple[bytes, bytes]]) -> tuple[str, int, bytes]:
    u = urlsplit(url)
    assert u.hostname is not None and u.port is not None
    target = f"{u.path}{'?' + u.query if u.query else ''}"
    lines = [f"{method} {target} HTTP/1.1".encode(), f"Host: {u.netloc}".encode(), b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    return u.hostname, u.port, b"\r\n".join(lines) + b"\r\n\r\n"


def _answer(raw: bytes) -> tuple[int, Any]:
    status = int(raw.split(b" ", 2)[1])
    payload = raw.partition(b"\r\n\r\n")[2]
    return status, json.loads(payload) if payload.startswith(b"{") else payload


async def raw_request(url: str, method: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> tuple[int, Any]:
    """One request with a Content-Length; (status, decoded JSON answer or the raw bytes)."""
    host, port, head = _head(url, method, [*headers, (b"Content-Length", str(len(body)).encode())])
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + body)
        await writer.drain()
        return _answer(await asyncio.wait_for(reader.read(), 10))
    finally:
        writer.close()


async def chunked_without_end(url: str, method: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes],
                              timeout_s: float = 5.0) -> tuple[int, Any] | None:  # fmt: skip
    """A chunked body that never ends: the answer the server gives meanwhile, or None if it waits for more."""
    host, port, head = _head(url, method, [*headers, (b"Transfer-Encoding", b"chunked")])
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head)
        for chunk in chunks:
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
        try:
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
        except TimeoutError:
            return None
        length = next((int(line.split(b":", 1)[1]) for line in first.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
        return _answer(first + await asyncio.wait_for(reader.readexactly(length), timeout_s))
    finally:
        writer.close()
