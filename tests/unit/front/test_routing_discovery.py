"""Finding the GPU tier's replicas (services/front/routing/discovery.py): each source, and each
bad input refused at start-up or reported as a reason (no network: DNS through an injected resolver)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from services.front.routing.discovery import (
    DiscoveryError,
    DnsRecords,
    FixedList,
    Misconfigured,
    UrlFile,
    parse_source,
    replica_name,
    source_of,
)


def replicas(source) -> list[str]:
    return asyncio.run(source.replicas())


def test_a_fixed_list_is_read_at_start():
    source = parse_source(" http://a:3000, https://b.example:8443/ ,http://a:3000,http://[fd00::1]:3000")
    assert isinstance(source, FixedList)
    assert replicas(source) == ["http://a:3000", "https://b.example:8443", "http://[fd00::1]:3000"]
    assert [replica_name(url) for url in replicas(source)] == ["a:3000", "b.example:8443", "[fd00::1]:3000"]


@pytest.mark.parametrize(("value", "says"), [
    ("", "an empty list"),
    (" , ", "an empty list"),
    ("a:3000", "is not an http(s)://host:port URL"),
    ("http://a:30x0", "is not a URL"),
    ("http://a:3000/v1", "without a path"),
    ("ftp://a:21", "is not an http(s)://host:port URL"),
    ("http://a:3000,nonsense", "'nonsense' is not an http(s)"),
    ("dns://llm-headless", "dns://NAME:PORT"),
    ("dns://:3000", "dns://NAME:PORT"),
    ("file://relative/list", "file:///absolute/path"),
])
def test_a_malformed_setting_is_refused_at_start_with_what_to_give(value, says):
    with pytest.raises(ValueError, match="PIPELINE_GPU_TIER_REPLICAS") as refused:
        parse_source(value)
    assert says in str(refused.value)


def test_a_malformed_setting_leaves_the_front_not_ready_rather_than_stopped(caplog):
    """What the front uses: the malformed value is logged once, and each refresh gives its reason."""
    source = source_of("http://a:3000,nonsense")
    assert isinstance(source, Misconfigured)
    assert "'nonsense' is not an http(s)" in caplog.text
    for _ in range(2):
        with pytest.raises(DiscoveryError, match="PIPELINE_GPU_TIER_REPLICAS"):
            replicas(source)
    assert isinstance(source_of("http://a:3000"), FixedList)


def test_a_dns_lookup_that_fails_for_now_keeps_the_last_answer():
    """EAI_AGAIN or a lookup past its timeout keep the last replicas; a name that is gone, or no
    earlier answer, is a reason."""
    answers: list = [["10.0.0.1"], socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
                     TimeoutError(), socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
                     socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")]

    async def resolver(name: str, port: int) -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    source = DnsRecords("llm-headless", 3000, resolver=resolver)
    assert replicas(source) == ["http://10.0.0.1:3000"]
    assert replicas(source) == ["http://10.0.0.1:3000"]  # EAI_AGAIN
    assert replicas(source) == ["http://10.0.0.1:3000"]  # timeout
    with pytest.raises(DiscoveryError, match="does not resolve"):
        replicas(source)  # the name is gone
    with pytest.raises(DiscoveryError, match="does not resolve"):
        replicas(source)  # a temporary failure, but no answer to keep since


def test_dns_gives_every_a_and_aaaa_record_at_the_port():
    asked = []

    async def resolver(name: str, port: int) -> list[str]:
        asked.append((name, port))
        return ["10.0.0.2", "10.0.0.1", "fd00::7"]

    source = parse_source("dns://llm-headless.default.svc:3000", resolver=resolver)
    assert isinstance(source, DnsRecords)
    assert replicas(source) == ["http://10.0.0.2:3000", "http://10.0.0.1:3000", "http://[fd00::7]:3000"]
    assert asked == [("llm-headless.default.svc", 3000)]


def test_a_name_that_does_not_resolve_or_has_no_records_is_a_reason():
    async def unknown(name, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def empty(name, port):
        return []

    with pytest.raises(DiscoveryError, match="dns://nowhere:3000 does not resolve"):
        replicas(DnsRecords("nowhere", 3000, resolver=unknown))
    with pytest.raises(DiscoveryError, match="no A or AAAA records"):
        replicas(DnsRecords("nowhere", 3000, resolver=empty))


def test_the_real_resolver_runs_off_the_event_loop():
    """localhost resolves through getaddrinfo in the loop's executor."""
    assert "http://127.0.0.1:3000" in replicas(DnsRecords("localhost", 3000))


def test_a_file_is_read_again_when_it_changes(tmp_path: Path):
    listing = tmp_path / "replicas"
    listing.write_text("# the GPU tier\nhttp://a:3000\n\nhttp://b:3000  # the second\n")
    source = parse_source(f"file://{listing}")
    assert isinstance(source, UrlFile)
    assert replicas(source) == ["http://a:3000", "http://b:3000"]
    listing.write_text("http://a:3000\nhttp://b:3000\nhttp://c:3000\n")
    assert replicas(source) == ["http://a:3000", "http://b:3000", "http://c:3000"]


def test_a_file_that_is_missing_empty_or_malformed_is_a_reason(tmp_path: Path, caplog):
    listing = tmp_path / "replicas"
    source = UrlFile(listing)
    with pytest.raises(DiscoveryError, match="cannot be read: No such file"):
        replicas(source)
    listing.write_text("\n# nothing yet\n")
    with pytest.raises(DiscoveryError, match="lists no replica URL"):
        replicas(source)
    listing.write_text("a:3000\nhttp://b:3000\n")  # a bad line is left out, with a log line; the rest serve
    assert replicas(source) == ["http://b:3000"]
    assert "line 1 left out" in caplog.text
    listing.write_text("http//c:3000\n")
    with pytest.raises(DiscoveryError, match="lists no replica URL"):
        replicas(source)
