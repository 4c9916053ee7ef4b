"""Finding a fleet's replicas: a list of URLs, or the addresses behind a Kubernetes headless Service's DNS name."""

from __future__ import annotations

import socket

from ..core.errors import BadRequest


def replica_urls(replicas: str | None = None, dns: str | None = None, port: int = 3000) -> list[str]:
    """``http://host:port`` of every replica: from ``replicas`` ("URL,URL,..."), or every address the DNS name
    of a headless Service resolves to (one A record per ready pod, e.g. ``NAME-headless.NAMESPACE.svc``)."""
    if bool(replicas) == bool(dns):
        raise BadRequest("give the replicas: --replicas URL,URL,... or --dns HEADLESS-SERVICE-NAME")
    if replicas:
        urls = [u.strip().rstrip("/") for u in replicas.split(",") if u.strip()]
        bad = [u for u in urls if not u.startswith(("http://", "https://"))]
        if bad or not urls:
            raise BadRequest(f"replica URLs need a scheme, e.g. http://10.0.0.7:3000; got {bad or replicas!r}")
        return urls
    try:
        addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(dns, port, proto=socket.IPPROTO_TCP)})
    except socket.gaierror as exc:
        raise BadRequest(f"cannot resolve {dns!r}: {exc}") from None
    return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses]
