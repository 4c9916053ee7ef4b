"""Replica discovery by DNS against a real DNS server on loopback: a small server written with dnspython's message
API answers UDP (and TCP) queries on an ephemeral port of 127.0.0.1; ``--dns-server`` points discovery at it, so
nothing here patches the resolver. No replica runs: the discovered addresses are loopback addresses where nothing
listens on the chosen port."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from tl_models.core.errors import BadRequest
from tl_models.fleet import discovery
from tl_models.fleet.discovery import parse_dns_server, replica_urls

REPO = Path(__file__).resolve().parents[1]
SERVICE = "tl-models-headless.default.svc.cluster.local."
ZONE = {
    # listed out of order, and with a repeat, as a server may give them
    (SERVICE, "A"): ["127.0.0.4", "127.0.0.2", "127.0.0.3", "127.0.0.2"],
    ("dual.default.svc.cluster.local.", "A"): ["127.0.0.5"],
    ("dual.default.svc.cluster.local.", "AAAA"): ["::1"],
    ("empty.default.svc.cluster.local.", "TXT"): ['"no pods"'],  # the name exists, with no A or AAAA record
    ("broken.default.svc.cluster.local.", "A"): [],  # SERVFAIL
}


class DnsServer:
    """An authoritative-only DNS server for ZONE on 127.0.0.1: UDP and TCP on one port, one thread each; every
    question it was asked, in ``asked``."""

    def __init__(self) -> None:
        for _ in range(20):  # an ephemeral UDP port whose number is free for TCP too
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # over a past run's TIME_WAIT
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen()
        for sock in (self.udp, self.tcp):
            sock.settimeout(0.1)
        self.asked: list[tuple[str, str, str]] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._serve_udp), threading.Thread(target=self._serve_tcp)]
        for thread in self.threads:
            thread.start()

    def answer(self, wire: bytes, transport: str) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        question = query.question[0]
        name, rdtype = question.name.to_text(), dns.rdatatype.to_text(question.rdtype)
        self.asked.append((name, rdtype, transport))
        if not any(known == name for known, _ in ZONE):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif ZONE.get((name, rdtype)) == []:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif (name, rdtype) in ZONE:
            response.answer.append(dns.rrset.from_text(question.name, 30, "IN", rdtype, *ZONE[(name, rdtype)]))
        return response.to_wire()  # NOERROR without an answer when the name has no record of that type

    def _serve_udp(self) -> None:
        while not self.stopping.is_set():
            try:
                wire, peer = self.udp.recvfrom(65535)
            except TimeoutError:
                continue
            self.udp.sendto(self.answer(wire, "udp"), peer)

    def _serve_tcp(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                (size,) = struct.unpack("!H", _read(conn, 2))
                reply = self.answer(_read(conn, size), "tcp")
                conn.sendall(struct.pack("!H", len(reply)) + reply)

    def close(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()
        self.udp.close()
        self.tcp.close()


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the client closed the connection")
        data += chunk
    return data


@pytest.fixture(scope="module")
def nameserver() -> Iterator[DnsServer]:
    running = DnsServer()
    yield running
    running.close()


def _free_port() -> int:
    """A TCP port nothing listens on (on any loopback address): the replicas' port, so every one is unreachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_dns_server_gives_the_replicas_sorted_and_once(nameserver: DnsServer) -> None:
    before = len(nameserver.asked)
    urls = replica_urls(dns=SERVICE, dns_server=f"127.0.0.1:{nameserver.port}", port=3000)
    assert urls == ["http://127.0.0.2:3000", "http://127.0.0.3:3000", "http://127.0.0.4:3000"]
    assert nameserver.asked[before:] == [(SERVICE, "A", "udp"), (SERVICE, "AAAA", "udp")]


def test_a_relative_name_is_asked_as_given_and_ipv6_goes_in_brackets(nameserver: DnsServer) -> None:
    urls = replica_urls(dns="dual.default.svc.cluster.local", dns_server=f"127.0.0.1:{nameserver.port}", port=8080)
    assert urls == ["http://127.0.0.5:8080", "http://[::1]:8080"]


def test_tcp_asks_over_tcp(nameserver: DnsServer) -> None:
    before = len(nameserver.asked)
    urls = replica_urls(dns=SERVICE, dns_server=f"tcp://127.0.0.1:{nameserver.port}", port=3000)
    assert len(urls) == 3
    assert {transport for *_, transport in nameserver.asked[before:]} == {"tcp"}


def test_fleet_status_tries_the_replicas_the_dns_server_names(nameserver: DnsServer) -> None:
    port = _free_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tl_models.cli",
            "fleet",
            "status",
            "--dns",
            SERVICE,
            "--dns-server",
            f"127.0.0.1:{nameserver.port}",
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("http://")]
    assert [row.split()[0] for row in rows] == [f"http://127.0.0.{i}:{port}" for i in (2, 3, 4)]
    assert all("unreachable" in row for row in rows), result.stdout
    assert "replicas DISAGREE" in result.stdout


def test_an_unknown_name_is_refused_naming_it(nameserver: DnsServer) -> None:
    with pytest.raises(BadRequest, match=r"'nobody-headless\.default\.svc\.cluster\.local\.' does not exist"):
        replica_urls(dns="nobody-headless.default.svc.cluster.local.", dns_server=f"127.0.0.1:{nameserver.port}")


def test_a_name_without_addresses_is_refused(nameserver: DnsServer) -> None:
    with pytest.raises(BadRequest, match="has no A or AAAA records"):
        replica_urls(dns="empty.default.svc.cluster.local.", dns_server=f"127.0.0.1:{nameserver.port}")


def test_a_server_failure_is_refused_with_its_rcode(nameserver: DnsServer) -> None:
    with pytest.raises(BadRequest, match="failed for .*: SERVFAIL"):
        replica_urls(dns="broken.default.svc.cluster.local.", dns_server=f"127.0.0.1:{nameserver.port}")


def test_a_server_that_never_answers_is_refused_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "DNS_TIMEOUT", 0.5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, so queries arrive; never read
        silent.bind(("127.0.0.1", 0))
        start = time.monotonic()
        with pytest.raises(BadRequest, match=r"did not answer within 0\.5 s .*over UDP"):
            replica_urls(dns=SERVICE, dns_server=f"127.0.0.1:{silent.getsockname()[1]}")
        assert time.monotonic() - start < 2


def test_nothing_listening_over_tcp_is_refused_at_once() -> None:
    with pytest.raises(BadRequest, match="failed for .*: .*[Rr]efused"):
        replica_urls(dns=SERVICE, dns_server=f"tcp://127.0.0.1:{_free_port()}")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("10.96.0.10", ("10.96.0.10", 53, False)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353, False)),
        ("fd00::a", ("fd00::a", 53, False)),
        ("[fd00::a]", ("fd00::a", 53, False)),
        ("[fd00::a]:5353", ("fd00::a", 5353, False)),
        ("tcp://127.0.0.1:5353", ("127.0.0.1", 5353, True)),
    ],
)
def test_dns_server_syntax(spec: str, expected: tuple[str, int, bool]) -> None:
    assert parse_dns_server(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "kube-dns.kube-system",
        "127.0.0.1:",
        "127.0.0.1:dns",
        "127.0.0.1:70000",
        "127.0.0.1:0",
        "[127.0.0.1]:53",
        "udp://127.0.0.1",
        "",
        "1.2.3",
    ],
)
def test_bad_dns_server_syntax_is_refused_before_any_query(spec: str) -> None:
    with pytest.raises(BadRequest, match="--dns-server"):
        replica_urls(dns=SERVICE, dns_server=spec)


@pytest.mark.parametrize("replicas", [None, "http://10.0.0.7:3000"])
def test_dns_server_needs_dns(replicas: str | None) -> None:
    with pytest.raises(BadRequest, match="--dns-server .* give --dns"):
        replica_urls(replicas=replicas, dns_server="127.0.0.1")


def test_bad_syntax_on_the_command_line_is_one_line_and_exit_1() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tl_models.cli", "fleet", "status", "--dns", SERVICE, "--dns-server", "kube-dns"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: --dns-server wants HOST[:PORT]") and result.stderr.count("\n") == 1


def test_without_dns_server_the_system_resolver_answers() -> None:
    """The default path: getaddrinfo (``localhost`` from /etc/hosts), each address once."""
    urls = replica_urls(dns="localhost", port=3000)
    assert "http://127.0.0.1:3000" in urls and len(urls) == len(set(urls))
