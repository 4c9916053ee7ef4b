"""The heads of a BentoML worker: admitted head sessions, the shared route, the head catalog, and the admin
operations that change them (load, weights, retire, shadow). Every change is serialised across workers by the catalog's
lock; every head enters only through :func:`tl_models.core.heads.admit_head`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..core.errors import BadRequest, BuildError, Conflict, NotFound, Unavailable, UserError
from ..core.files import atomic_write_bytes, file_sha256
from ..core.heads import BackboneSource, HeadSource, LoadedHead, TailSource, admit_head, read_verified
from ..core.identity import check_backbone, same_backbone
from ..core.manifest import latest_versions
from ..core.names import CATALOG_FILE, HEAD_ONNX, HEADS_DIR, ROUTE_FILE
from ..core.routing import Route, RoutingState, parse_route, read_route
from .catalog import HeadCatalog

log = logging.getLogger(__name__)


def check_state(state_dir: Path, backbone: BackboneSource, heads: Sequence[HeadSource]) -> None:
    """BuildError or Refused (one line naming the file) unless a worker could start on ``state_dir``: its head
    catalog is readable and made for this backbone, its route file is a route, and every routed head version is in
    the build or the catalog (the build's heads were made for this backbone: the store and the build directory
    give no others) and passes its sha256 check."""
    catalog = HeadCatalog(state_dir / CATALOG_FILE)
    try:
        entries = catalog.entries()
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"head catalog {catalog.path} is damaged ({type(exc).__name__}: {exc})") from None
    foreign = sorted(
        key for key, source in entries.items() if not same_backbone(source.backbone_sha256, backbone.sha256)
    )
    if foreign:
        check_backbone(
            f"state directory {state_dir}",
            entries[foreign[0]].backbone_sha256,
            backbone.sha256,
            f"build {backbone.build!r}",
            f"point TL_MODELS_STATE_DIR elsewhere (its heads {', '.join(foreign)} are that backbone's)",
        )
    sources = {**entries, **{source.key: source for source in heads}}  # bootstrap records the build's heads
    route_file = state_dir / ROUTE_FILE
    route = parse_route(route_file) if route_file.exists() else Route(versions=latest_versions(heads))
    for key in [f"{name}:{version}" for name, version in route.versions.items()]:
        source = sources.get(key)
        if source is None:
            raise BuildError(f"head {key} is routed by {route_file} but is neither in the build nor in {catalog.path}")
        read_verified(source.path, source.sha256, f"head {key}")


class HeadRegistry:
    """``(name, version) -> LoadedHead`` for one worker, over a route and a catalog shared by all workers."""

    def __init__(
        self,
        state_dir: Path,
        embedding_dim: int,
        backbone: BackboneSource,
        providers: str | None = None,
        route_poll: float = 0.0,
        on_tail: Callable[[TailSource, str], None] | None = None,
        tail_threads: int | None = None,
    ):
        self.state_dir = state_dir
        self.on_tail = on_tail  # a tuned version's cut, before it is admitted (the worker's trunk: one cut)
        self.tail_threads = tail_threads
        self.embedding_dim = embedding_dim
        self.backbone = backbone
        self.providers = providers
        self.catalog = HeadCatalog(state_dir / CATALOG_FILE)
        self.routing = RoutingState(state_dir / ROUTE_FILE, poll=route_poll)
        self._loaded: dict[tuple[str, int], LoadedHead] = {}
        self._lock = threading.Lock()
        self._revision = -1

    def bootstrap(self, heads: Sequence[HeadSource], weights: dict[str, float] | None, build: str) -> Route:
        """Record the declared heads, create the route (latest version of each head) if none exists, load the
        routed heads; BuildError when a routed head cannot be loaded."""
        if not heads and not self.routing.path.exists():
            raise BuildError(f"no heads to serve for build {build!r}")
        with self.catalog.locked():
            self.catalog.put(heads)
            if not self.routing.path.exists():
                latest = latest_versions(heads)
                self.routing.update(weights=weights or {name: 1.0 for name in latest}, versions=latest)
        route = self.routing.current()
        try:
            for name, version in route.versions.items():
                self.head(name, version)
        except UserError as exc:
            raise BuildError(
                f"cannot load the routed heads from {self.state_dir}: {exc.message} "
                "(remove that state directory or point TL_MODELS_STATE_DIR elsewhere)"
            ) from None
        self._revision = route.revision
        return route

    def _admit(self, source: HeadSource, data: bytes | None = None) -> LoadedHead:
        if source.tail is not None and self.on_tail is not None:
            self.on_tail(source.tail, f"head {source.key}")
        return admit_head(
            source,
            self.embedding_dim,
            self.backbone.sha256,
            self.providers,
            data,
            self.backbone.gated,
            self.tail_threads,
        )

    def loaded(self) -> list[LoadedHead]:
        return list(self._loaded.values())

    def head(self, name: str, version: int) -> LoadedHead:
        """The loaded head version, admitting it from the catalog first if this worker has not yet (blocking)."""
        head = self._loaded.get((name, version))
        if head is not None:
            return head
        with self._lock:
            head = self._loaded.get((name, version))
            if head is None:
                source = self.catalog.get(name, version)
                if source is None:
                    raise Unavailable(
                        f"head {name}:{version} is routed but missing from the head catalog {self.catalog.path}"
                    )
                head = self._admit(source)
                self._loaded[(name, version)] = head
                log.info("loaded head %s from %s", source.key, source.origin)
        return head

    def cached(self, name: str, version: int) -> LoadedHead | None:
        """The loaded head version, or None when this worker has not loaded it yet."""
        return self._loaded.get((name, version))

    def follow(self, route: Route) -> None:
        """Drop head versions a newer route no longer names, live or shadow (requests in flight keep their
        reference)."""
        if route.revision == self._revision:
            return
        with self._lock:
            for key in [
                k for k in self._loaded if route.versions.get(k[0]) != k[1] and f"{k[0]}:{k[1]}" not in route.shadow
            ]:
                del self._loaded[key]
            self._revision = route.revision

    # -- admin (each call runs under the catalog lock: changes from all workers are serialised)

    def set_weights(self, weights: dict[str, float]) -> None:
        """Replace the traffic weights (every named head must be live)."""
        with self.catalog.locked():
            self._update_route(weights=weights)

    def load(self, source: HeadSource, live: bool = True, weight: float | None = None) -> None:
        """Admit a head version, record it in the catalog and (``live``) route its name to it; the old version
        of that name is dropped only after the route points at the new one."""
        data = read_verified(source.path, source.sha256, f"head {source.key}")
        head = self._admit(source, data)
        with self.catalog.locked():
            source = self._enter(head, data)
            if live:
                route = read_route(self.routing.path)  # fresh read: no cached weights
                weights = None
                if weight is not None or source.name not in route.weights:
                    default = 0.0 if any(w > 0 for w in route.weights.values()) else 1.0
                    weights = {**route.weights, source.name: default if weight is None else weight}
                self._update_route(versions={source.name: source.version}, weights=weights)
        log.info("head %s loaded from %s%s", source.key, source.origin, " and live" if live else "")

    def shadow(self, source: HeadSource, share: float) -> None:
        """Admit a head version and score it beside every answer on ``share`` (0..1] of requests, never returning
        it (a live name's other version may shadow it)."""
        if not 0 < share <= 1:
            raise BadRequest(f"share must be above 0 and at most 1 (0 removes a shadow head), got {share}")
        data = read_verified(source.path, source.sha256, f"head {source.key}")
        head = self._admit(source, data)
        with self.catalog.locked():
            source = self._enter(head, data)
            self._update_route(shadow={source.key: share})
        log.info("head %s shadows %.0f%% of requests", source.key, share * 100)

    def unshadow(self, name: str, version: int | None = None) -> list[str]:
        """Stop shadowing ``name`` (one version, or all); the keys removed (NotFound when none)."""
        with self.catalog.locked():
            route = read_route(self.routing.path)
            keys = [f"{n}:{v}" for n, v, _ in route.shadows() if n == name and version in (None, v)]
            if not keys:
                raise NotFound(
                    f"{name}{'' if version is None else f':{version}'} is not a shadow head; shadow "
                    f"heads: {', '.join(sorted(route.shadow)) or 'none'}"
                )
            self._update_route(shadow={key: 0 for key in keys})
        return keys

    def unload(self, name: str, version: int) -> None:
        """Forget a head version the route does not use (admitted by ``load(live=False)``, e.g. phase 1 of a fleet
        swap that another replica refused): out of the catalog and this worker's sessions; Conflict if routed."""
        key = f"{name}:{version}"
        with self.catalog.locked():
            route = read_route(self.routing.path)
            if route.versions.get(name) == version or key in route.shadow:
                raise Conflict(f"head {key} is in the route (live or shadow): swap or retire it first")
            if self.catalog.get(name, version) is None:
                raise NotFound(f"head {key} is not loaded here")
            self.catalog.remove(key)
            with self._lock:
                self._loaded.pop((name, version), None)
        log.info("head %s unloaded", key)

    def converge(self, target: Route, find: Callable[[str, int], HeadSource]) -> bool:
        """Make the route equal ``target`` (live versions, weights, shadow heads): versions it names that are not
        in the catalog are found with ``find`` and admitted first, then the route changes in one update. True when
        it changed; a version that fails admission raises and leaves the route as it was."""
        needed = sorted({*target.versions.items(), *((n, v) for n, v, _ in target.shadows())})
        for name, version in needed:
            if self.catalog.get(name, version) is None:
                source = find(name, version)
                data = read_verified(source.path, source.sha256, f"head {source.key}")
                head = self._admit(source, data)
                with self.catalog.locked():
                    self._enter(head, data)
        with self.catalog.locked():
            local = read_route(self.routing.path)
            if (local.weights, local.versions, local.shadow) == (target.weights, target.versions, target.shadow):
                return False
            self._update_route(
                weights=target.weights,
                versions=target.versions,
                retire=tuple(n for n in local.versions if n not in target.versions),
                shadow={**{key: 0 for key in local.shadow}, **target.shadow},
            )
        log.info("route converged to the fleet's: versions %s, weights %s", target.versions, target.weights)
        return True

    def _enter(self, head: LoadedHead, data: bytes) -> HeadSource:
        """Record an admitted head in the catalog (under its lock) and this worker's loaded heads; Conflict when
        the catalog knows that version with other bytes."""
        source = head.source
        known = self.catalog.get(source.name, source.version)
        if known is not None and known.sha256 != source.sha256:
            raise Conflict(
                f"head {source.key} is already known with another {HEAD_ONNX} (from {known.origin}); "
                "give the new head a new version"
            )
        if source.origin.startswith("build:"):
            head.source = source = self._stash(source, data)
        self.catalog.put([source])
        with self._lock:
            self._loaded[(source.name, source.version)] = head
        return source

    def retire(self, name: str) -> None:
        """Take a head out of the route (weights and live version); its requests go to the other heads."""
        with self.catalog.locked():
            route = read_route(self.routing.path)
            if name not in route.versions:
                raise NotFound(
                    f"cannot retire unknown head {name!r}; live heads: {', '.join(sorted(route.versions)) or 'none'}"
                )
            if not any(w > 0 for n, w in route.weights.items() if n != name):
                raise Conflict(
                    f"retiring {name!r} would leave no head with traffic weight: give another head a weight first"
                )
            self._update_route(retire=(name,))

    def _update_route(self, **changes) -> Route:
        route = self.routing.update(**changes)
        self.follow(route)
        return route

    def _stash(self, source: HeadSource, data: bytes) -> HeadSource:
        """Copy a build directory's head.onnx into the state directory, so every worker loads the same bytes
        even if the build directory changes later."""
        target = self.state_dir / HEADS_DIR / source.name / str(source.version) / HEAD_ONNX
        if not target.is_file() or file_sha256(target) != source.sha256:
            atomic_write_bytes(target, data)
        return HeadSource.from_dict(source.to_dict(), path=str(target))
