"""Fleet operations on BentoML replicas: status, and a two-phase head swap / traffic split across every replica.

The fleet's route (live version and weight per head, shadow heads) has one source of truth: a route file (in
Kubernetes the ``route.json`` of a ConfigMap every pod mounts) that each replica follows (``TL_MODELS_FLEET_ROUTE``:
read at start before the replica is ready, re-read every ``TL_MODELS_FLEET_POLL`` seconds, and on
``POST /admin/sync``). Head files come from shared storage (the build directory every replica serves, or the model
store on a shared volume), never from one replica.

A swap is two-phase:

1. every replica loads and admits the new version without routing to it (``POST /admin/load`` with
   ``live: false``); if any replica refuses or cannot be reached, the version is unloaded again on those that
   admitted it (``POST /admin/unload``), the route file is untouched and the command says which replica refused
   and why;
2. only then the route file changes (one atomic write) and every replica gets the new route and converges to it
   (``POST /admin/sync`` with the route: a mounted ConfigMap takes up to a minute or two to show a change, so
   replicas do not wait for it and never go back to an older revision); a replica unreachable now is reported and
   converges from the file when it is back.

One fleet change at a time: ``init``, ``swap`` and ``split`` hold the route file's change lock
(``route.json.change.lock`` beside it) from start to end, and a second change started meanwhile is refused, naming
the process that holds it (two swaps interleaving their phases could leave a replica admitted to a version no
route names). The system releases the lock when its holder ends, however it ends.

The choice of head for a request key is a pure function of the key and the route (:mod:`tl_models.core.routing`),
so a key gets the same head on every replica once they follow the same route.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..core.errors import UserError
from ..core.files import LockHeld, file_lock
from ..core.heads import head_source_from_build
from ..core.manifest import BuildDir
from ..core.routing import Route, RoutingState, read_route


class FleetError(UserError):
    """A fleet operation that did not happen: which replicas refused or could not be reached, and why."""


@dataclass
class Reply:
    """One replica's answer to one call: HTTP status (None: unreachable), the JSON body or the error text."""

    url: str
    status: int | None
    body: dict | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status == 200

    def reason(self) -> str:
        return self.error or f"HTTP {self.status}"


@contextmanager
def changing(route_file: str | Path) -> Iterator[None]:
    """Hold the fleet's change lock for one change; FleetError at once when another change holds it."""
    path = Path(route_file)
    try:
        with file_lock(path.with_name(path.name + ".change.lock"), wait=False):
            yield
    except LockHeld as exc:
        raise FleetError(
            f"another fleet change is in progress on {path} ({exc.message}): nothing was changed; "
            "run this one when it has finished"
        ) from None


def _call(
    url: str, method: str, path: str, token: str | None = None, body: dict | None = None, timeout: float = 120.0
) -> Reply:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, url.rstrip("/") + path, json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return Reply(url, None, None, f"unreachable: {type(exc).__name__}: {exc}")
    try:
        data = response.json()
    except ValueError:
        data = None
    data = data if isinstance(data, dict) else None
    error = None
    if response.status_code != 200:
        error = str(data.get("error")) if data and "error" in data else response.text[:300]
    return Reply(url, response.status_code, data, error)


def _each(urls: list[str], call: Callable[[str], Reply]) -> list[Reply]:
    """``call`` on every replica at once; the replies in ``urls`` order."""
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(urls)))) as pool:
        return list(pool.map(call, urls))


def _live(body: dict | None) -> dict:
    """A replica's route as ``/heads`` shows it: versions, weights, shadow shares."""
    if not body:
        return {}
    return {
        "versions": {h["name"]: h["version"] for h in body.get("heads", [])},
        "weights": {h["name"]: h["weight"] for h in body.get("heads", [])},
        "shadow": {f"{s['name']}:{s['version']}": s["share"] for s in body.get("shadow", [])},
    }


def status(urls: list[str], route_file: str | Path | None = None) -> dict:
    """Every replica's readiness, live heads, versions, weights and shadow heads, and whether it can follow the fleet
    route (``fleet_error``: what its ``/heads`` reports, e.g. a route file that is not a route); whether they agree
    with each other and with the route file (a route file that cannot be read: ``route.error``, no agreement)."""
    replies = _each(urls, lambda url: _call(url, "GET", "/heads", timeout=30))
    replicas = []
    for reply in replies:
        entry = {
            "url": reply.url,
            "reachable": reply.status is not None,
            "ready": bool(reply.body and reply.body.get("ready")),
            "error": None if reply.ok else reply.reason(),
            **_live(reply.body),
        }
        if reply.body:
            entry["fleet"] = reply.body.get("fleet")
            entry["fleet_error"] = (entry["fleet"] or {}).get("error")
        replicas.append(entry)
    routes = {json.dumps(_live(r.body), sort_keys=True) for r in replies if r.ok}
    following = not any(entry.get("fleet_error") for entry in replicas)
    figures: dict = {"replicas": replicas, "agree": len(routes) == 1 and all(r.ok for r in replies) and following}
    if route_file is not None:
        try:
            target = read_route(route_file)
        except (UserError, OSError) as exc:
            figures["route"] = {
                "file": str(route_file),
                "error": exc.message if isinstance(exc, UserError) else str(exc),
            }
            figures["agree"] = False
            return figures
        figures["route"] = {**target.to_dict(), "file": str(route_file), "error": None}
        wanted = {"versions": target.versions, "weights": target.weights, "shadow": target.shadow}
        for entry in replicas:
            entry["follows_route"] = all(entry.get(k) == v for k, v in wanted.items())
        figures["agree"] = figures["agree"] and all(e["follows_route"] for e in replicas)
    return figures


def init(route_file: str | Path, build_dir: str | Path, weights: dict[str, float] | None = None) -> Route:
    """Write the fleet's first route: the latest version of every head of the build, ``weights`` (default equal)."""
    versions = BuildDir(build_dir).manifest().latest_versions()
    state = RoutingState(route_file, poll=0)
    with changing(route_file):
        if state.path.is_file():
            raise FleetError(f"{route_file} exists already: change it with `tl-models fleet swap` or `fleet split`")
        return state.update(weights=weights or {name: 1.0 for name in versions}, versions=versions)


def _check_head(build_dir: str | Path | None, head: str, version: int) -> None:
    """When the shared build directory is given, the version must be in it (before any replica is asked)."""
    if build_dir is not None:
        head_source_from_build(build_dir, head, version)


def swap(
    urls: list[str],
    route_file: str | Path,
    head: str,
    version: int,
    token: str,
    weights: dict[str, float] | None = None,
    build_dir: str | Path | None = None,
) -> dict:
    """Make ``head`` ``version`` live on every replica, two-phase (see the module docstring); what happened."""
    with changing(route_file):
        return _swap(urls, route_file, head, version, token, weights, build_dir)


def _swap(
    urls: list[str],
    route_file: str | Path,
    head: str,
    version: int,
    token: str,
    weights: dict[str, float] | None,
    build_dir: str | Path | None,
) -> dict:
    current = read_route(route_file)
    if not current.versions:
        raise FleetError(f"no fleet route at {route_file}: write one with `tl-models fleet init`")
    Route(
        current.weights if weights is None else weights, {**current.versions, head: version}, shadow=current.shadow
    ).validate()
    _check_head(build_dir, head, version)
    start = time.perf_counter()
    report = {
        "head": head,
        "version": version,
        "old_version": current.versions.get(head),
        "phase1": prepare(urls, head, version, token),
    }
    report["phase2"] = commit(urls, route_file, token, versions={head: version}, weights=weights)
    report["seconds"] = time.perf_counter() - start
    return report


def prepare(urls: list[str], head: str, version: int, token: str) -> list[dict]:
    """Phase 1: every replica admits ``head`` ``version`` without routing to it; on any refusal it is unloaded
    where it was admitted and FleetError names the replicas that refused and why."""
    replies = _each(
        urls, lambda url: _call(url, "POST", "/admin/load", token, {"head": head, "version": version, "live": False})
    )
    refused = [r for r in replies if not r.ok]
    if refused:
        for reply in replies:
            if reply.ok and version != _live(reply.body).get("versions", {}).get(head):
                _call(reply.url, "POST", "/admin/unload", token, {"head": head, "version": version})
        raise FleetError(
            f"phase 1 refused, nothing changed (the route stays; {head}:{version} unloaded where it "
            "was admitted): " + "; ".join(f"{r.url}: {r.reason()}" for r in refused)
        )
    return [{"url": r.url, "admitted": True} for r in replies]


def commit(
    urls: list[str],
    route_file: str | Path,
    token: str,
    versions: dict[str, int] | None = None,
    weights: dict[str, float] | None = None,
) -> list[dict]:
    """Phase 2: the route file changes (the source of truth), then every replica converges to it now; a replica
    that cannot be reached or refuses is reported (it converges from the file when it is back)."""
    route = RoutingState(route_file, poll=0).update(weights=weights, versions=versions)
    replies = _each(urls, lambda url: _call(url, "POST", "/admin/sync", token, {"route": route.to_dict()}))
    return [
        {
            "url": r.url,
            "converged": r.ok and _live(r.body).get("versions") == route.versions,
            "error": None if r.ok else r.reason(),
            "revision": route.revision,
        }
        for r in replies
    ]


def split(urls: list[str], route_file: str | Path, weights: dict[str, float], token: str) -> dict:
    """New traffic weights on every replica (no new versions: nothing to admit first)."""
    start = time.perf_counter()
    with changing(route_file):
        replies = commit(urls, route_file, token, weights=weights)
    return {"weights": weights, "phase2": replies, "seconds": time.perf_counter() - start}
