"""Finding a fleet's replicas: a list of URLs, or the addresses behind a Kubernetes headless Service's DNS name.

The name is resolved by the system resolver (``getaddrinfo``: the pod's ``/etc/resolv.conf``, its search domains
included), or, with ``dns_server``, by asking that DNS server directly (dnspython): e.g. the cluster DNS from
outside the cluster, or a test server on a port of its own, which the system resolver cannot be pointed at.
"""

from __future__ import annotations

import ipaddress
import re
import socket

import dns.exception
import dns.resolver

from ..core.errors import BadRequest

DNS_TIMEOUT = 3.0  # seconds the DNS server has to answer one question (A, then AAAA)
DNS_SERVER_HELP = "HOST[:PORT], HOST an IP address, e.g. 10.96.0.10, 127.0.0.1:5353, [fd00::a]:53, tcp://127.0.0.1:5353"


def replica_urls(
    replicas: str | None = None, dns: str | None = None, port: int = 3000, dns_server: str | None = None
) -> list[str]:
    """``http://host:port`` of every replica: from ``replicas`` ("URL,URL,..."), or every address the DNS name
    of a headless Service resolves to (one A record per ready pod, e.g. ``NAME-headless.NAMESPACE.svc``), sorted,
    each once. ``dns_server`` ("HOST[:PORT]", optionally ``tcp://``): ask that server for the name's A and AAAA
    records instead of the system resolver (the name as given: no search domains)."""
    if dns_server is not None and not dns:
        raise BadRequest("--dns-server is the server that --dns asks: give --dns HEADLESS-SERVICE-NAME with it")
    if bool(replicas) == bool(dns):
        raise BadRequest("give the replicas: --replicas URL,URL,... or --dns HEADLESS-SERVICE-NAME")
    if replicas:
        urls = [u.strip().rstrip("/") for u in replicas.split(",") if u.strip()]
        bad = [u for u in urls if not u.startswith(("http://", "https://"))]
        if bad or not urls:
            raise BadRequest(f"replica URLs need a scheme, e.g. http://10.0.0.7:3000; got {bad or replicas!r}")
        return urls
    assert dns  # one of the two, checked above
    if dns_server is not None:
        addresses = _ask(dns_server, dns)
    else:
        try:
            addresses = {str(info[4][0]) for info in socket.getaddrinfo(dns, port, proto=socket.IPPROTO_TCP)}
        except socket.gaierror as exc:
            raise BadRequest(f"cannot resolve {dns!r}: {exc}") from None
    return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in sorted(addresses)]


def parse_dns_server(spec: str) -> tuple[str, int, bool]:
    """``(address, port, over TCP)`` of a ``--dns-server`` value; BadRequest naming the syntax otherwise."""
    text = spec.strip()
    tcp = text.startswith("tcp://")
    text = text.removeprefix("tcp://")
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::([^:]*))?", text)
    if bracketed:  # [IPv6] or [IPv6]:PORT
        host, port = bracketed[1], bracketed[2]
    elif text.count(":") == 1:  # IPv4:PORT
        host, port = text.split(":")
    else:  # IPv4, or IPv6 without a port
        host, port = text, None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or (bracketed and address.version != 6) or (port is not None and not port.isdecimal()):
        raise BadRequest(f"--dns-server wants {DNS_SERVER_HELP}; got {spec!r}")
    number = int(port or 53)
    if not 0 < number < 65536:
        raise BadRequest(f"--dns-server: {number} is not a port (1-65535); got {spec!r}")
    return str(address), number, tcp


def _ask(server: str, name: str) -> set[str]:
    """The A and AAAA addresses ``server`` gives for ``name``; one-line BadRequest when it cannot say."""
    host, port, tcp = parse_dns_server(server)
    where = f"DNS server {server}"
    resolver = dns.resolver.Resolver(configure=False)  # not /etc/resolv.conf: that server only, no search domains
    resolver.nameservers = [host]
    resolver.port = port
    resolver.timeout = resolver.lifetime = DNS_TIMEOUT
    addresses: set[str] = set()
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(name, rdtype, tcp=tcp, search=False)
        except dns.resolver.NXDOMAIN:
            raise BadRequest(
                f"{name!r} does not exist (NXDOMAIN from {where}; the name is asked as given, without search "
                "domains: e.g. NAME-headless.NAMESPACE.svc.cluster.local)"
            ) from None
        except dns.resolver.NoAnswer:
            continue  # the name exists without records of this type
        except dns.exception.Timeout:
            raise BadRequest(
                f"{where} did not answer within {DNS_TIMEOUT:g} s (asked for {name!r} over {'TCP' if tcp else 'UDP'})"
            ) from None
        except dns.resolver.NoNameservers as exc:  # an error answer (SERVFAIL, REFUSED), or TCP refused
            raise BadRequest(f"{where} failed for {name!r}: {_reason(exc)}") from None
        except dns.exception.DNSException as exc:  # e.g. a name that is not a DNS name
            raise BadRequest(f"cannot ask {where} for {name!r}: {exc}") from None
        addresses.update(rdata.to_text() for rdata in answer)
    if not addresses:
        raise BadRequest(f"{name!r} has no A or AAAA records at {where}: no ready pod behind the Service?")
    return addresses


def _reason(exc: dns.resolver.NoNameservers) -> str:
    """What the one server said, without dnspython's preamble (``Server Do53:... answered ...``)."""
    errors = exc.kwargs.get("errors") or []
    return "; ".join(str(error[3]) for error in errors) or str(exc)
