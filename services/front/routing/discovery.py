"""Where the GPU tier's replicas are: `PIPELINE_GPU_TIER_REPLICAS`, read as a source of base URLs.

A fixed list (`http://a:3000,http://b:3000`), DNS (`dns://NAME:PORT`: a headless Service's A/AAAA
records), a file (`file:///path`, one URL a line, read again when it changes) or `bentocloud`.
A malformed setting, or a source that yields nothing now, is a reason and never a crash: the front
is not ready, with it, until a refresh finds replicas (docs/architecture.md, "Routing").
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger("bentoml.service.prompt")

Resolver = Callable[[str, int], Awaitable[list[str]]]  # (name, port) -> IP addresses


class DiscoveryError(Exception):
    """The source gave no usable replica now; the message says why (for logs and /readyz)."""


def replica_url(text: str) -> str:
    """`text` as a replica's base URL (`http(s)://host[:port]`), or ValueError saying what is wrong."""
    text = text.strip()
    try:
        parts = urlsplit(text)
        port = parts.port  # raises on a port that is not a number
    except ValueError as error:
        raise ValueError(f"{text!r} is not a URL: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http(s)://host:port URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{text!r}: a replica is a base URL, without a path or query")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def replica_name(url: str) -> str:
    """The replica's label in logs and metrics: host:port."""
    return urlsplit(url).netloc


@dataclass
class FixedList:
    urls: list[str]

    async def replicas(self) -> list[str]:
        return list(self.urls)

    def __str__(self) -> str:
        return f"the fixed list {','.join(self.urls)}"


async def resolve_with_getaddrinfo(name: str, port: int) -> list[str]:
    """The A and AAAA records of `name`, in a thread of the event loop's executor (never blocking it)."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def is_temporary(error: BaseException) -> bool:
    """A lookup that may well succeed next time: no answer in time, or the resolver's EAI_AGAIN."""
    return isinstance(error, TimeoutError) or (isinstance(error, socket.gaierror) and error.errno == socket.EAI_AGAIN)


@dataclass
class DnsRecords:
    name: str
    port: int
    resolver: Resolver = resolve_with_getaddrinfo
    timeout_s: float = 5.0
    _last: list[str] = field(default_factory=list, repr=False)  # the replicas of the last answer

    async def replicas(self) -> list[str]:
        try:
            addresses = await asyncio.wait_for(self.resolver(self.name, self.port), self.timeout_s)
        except (OSError, TimeoutError) as error:
            if self._last and is_temporary(error):
                logger.warning("dns://%s:%d: lookup failed for now (%r); keeping the last answer's %d replicas",
                               self.name, self.port, error, len(self._last))
                return list(self._last)
            self._last = []
            raise DiscoveryError(f"dns://{self.name}:{self.port} does not resolve: {error!r}") from error
        if not addresses:
            self._last = []
            raise DiscoveryError(f"dns://{self.name}:{self.port} has no A or AAAA records")
        self._last = [replica_url(f"http://[{ip}]:{self.port}" if ":" in ip else f"http://{ip}:{self.port}")
                      for ip in addresses]
        return list(self._last)

    def __str__(self) -> str:
        return f"dns://{self.name}:{self.port}"


@dataclass
class UrlFile:
    path: Path
    _seen: tuple | None = field(default=None, repr=False)  # (inode, mtime, size) of the last read
    _urls: list[str] = field(default_factory=list, repr=False)

    async def replicas(self) -> list[str]:
        try:
            stat = os.stat(self.path)
        except OSError as error:
            self._seen = None
            raise DiscoveryError(f"file://{self.path} cannot be read: {error.strerror}") from error
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if version != self._seen:  # a stat per refresh; read only when it changed
            self._urls = self._read()
            self._seen = version
        if not self._urls:
            raise DiscoveryError(f"file://{self.path} lists no replica URL")
        return list(self._urls)

    def _read(self) -> list[str]:
        urls = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                urls.append(replica_url(line))
            except ValueError as error:  # the others are still served
                logger.error("file://%s line %d left out: %s", self.path, number, error)
        return list(dict.fromkeys(urls))

    def __str__(self) -> str:
        return f"file://{self.path}"


@dataclass
class BentoCloudHosts:
    """BentoCloud's runner load balancer, through BentoML's `Service.get_hosts()` ("ip:port" each).
    Not testable outside BentoCloud: kept to this one call."""

    service: object  # the LLMService class

    async def replicas(self) -> list[str]:
        try:
            hosts = await self.service.get_hosts()
        except Exception as error:
            raise DiscoveryError(f"BentoCloud gave no hosts for LLMService: {error!r}") from error
        return list(dict.fromkeys(replica_url(f"http://{host}") for host in hosts))  # one per replica, not per worker

    def __str__(self) -> str:
        return "bentocloud"


@dataclass
class Misconfigured:
    """A setting that names no usable source: no replica ever, and the reason each time."""

    reason: str

    async def replicas(self) -> list[str]:
        raise DiscoveryError(self.reason)

    def __str__(self) -> str:
        return "a malformed PIPELINE_GPU_TIER_REPLICAS"


Source = FixedList | DnsRecords | UrlFile | BentoCloudHosts | Misconfigured


def source_of(value: str, *, service: object = None, resolver: Resolver | None = None) -> Source:
    """`parse_source`, with a malformed setting logged and kept as the reason the front is not ready."""
    try:
        return parse_source(value, service=service, resolver=resolver)
    except ValueError as error:
        logger.error("%s; the front stays not ready until the setting is fixed", error)
        return Misconfigured(str(error))


def parse_source(value: str, *, service: object = None, resolver: Resolver | None = None) -> Source:
    """The discovery source `PIPELINE_GPU_TIER_REPLICAS` names; ValueError for a malformed value."""
    value = value.strip()
    where = f"PIPELINE_GPU_TIER_REPLICAS={value!r}"
    if value == "bentocloud":
        return BentoCloudHosts(service)
    if value.startswith("dns://"):
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ValueError(f"{where}: give dns://NAME:PORT (a headless Service's name and LLMService's port)")
        return DnsRecords(parts.hostname, port, **({"resolver": resolver} if resolver else {}))
    if value.startswith("file://"):
        path = value[len("file://"):]
        if not path.startswith("/"):
            raise ValueError(f"{where}: give file:///absolute/path (one replica URL a line)")
        return UrlFile(Path(path))
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{where}: an empty list; give http://host:port URLs separated by commas, "
                         "dns://NAME:PORT, file:///path or bentocloud")
    try:
        urls = [replica_url(item) for item in items]
    except ValueError as error:
        raise ValueError(f"{where}: {error}; give http://host:port URLs separated by commas, "
                         "dns://NAME:PORT, file:///path or bentocloud") from None
    return FixedList(list(dict.fromkeys(urls)))
