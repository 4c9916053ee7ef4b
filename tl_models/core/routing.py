"""A/B traffic split and live head state, shared by the BentoML service and the Triton router.

The route table lives in one JSON file written atomically, so every worker process (and Triton's router
model) applies the same weights; readers re-check the file at most every ``poll`` seconds.

* weighted split across head names; sticky by request key: the same key gets the same head while the
  weights are unchanged (hash of the key -> a point in [0, 1) -> cumulative weights in name order);
* an explicit head (``X-TL-Head``) overrides the split;
* each head name has one live version; a swap repoints it;
* shadow heads (``"name:version" -> share``) are scored on a share of requests beside the head that answers,
  never returned (judged by agreement and feedback, see ``tl_models.bento.judge``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BadRequest, NotFound, Refused, Unavailable
from .files import atomic_write_json, file_lock


class RoutingError(BadRequest):
    """Weights or versions that make no usable route."""


class UnknownHead(NotFound):
    """A request or change that names a head the route does not have."""


class DamagedRoute(Refused):
    """A route file that is not a route: not JSON, not an object of weights/versions/revision/shadow, or a route
    that does not validate (a half-written or hand-edited file)."""


log = logging.getLogger(__name__)


class NoTraffic(Unavailable):
    """No head has a traffic weight above 0: a request without an explicit head cannot be routed."""


@dataclass(frozen=True)
class Route:
    """Weights per head name, the live version of each head, shadow heads (``"name:version" -> share`` of
    requests they are scored on) and a revision that grows on every change."""

    weights: dict[str, float] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    revision: int = 0
    shadow: dict[str, float] = field(default_factory=dict)

    def validate(self) -> Route:
        """Raise RoutingError unless every weighted head has a live version and the weights are usable."""
        for name, weight in self.weights.items():
            if name not in self.versions:
                raise RoutingError(f"weight given for head {name!r}, which has no live version")
            if not (weight >= 0 and weight != float("inf")):
                raise RoutingError(f"weight of head {name!r} must be a finite number >= 0, got {weight}")
        if self.weights and sum(self.weights.values()) <= 0:
            raise RoutingError("at least one head needs a weight above 0")
        for key, share in self.shadow.items():
            name, _, version = key.partition(":")
            if not name or not version.isdigit():
                raise RoutingError(f"shadow heads are named 'name:version', got {key!r}")
            if not 0 < share <= 1:
                raise RoutingError(f"share of shadow head {key!r} must be above 0 and at most 1, got {share}")
        return self

    def shadows(self) -> list[tuple[str, int, float]]:
        """``(name, version, share)`` of every shadow head, in name order."""
        keys = [(key.partition(":"), share) for key, share in sorted(self.shadow.items())]
        return [(name, int(version), share) for (name, _, version), share in keys]

    def choose(self, key: str | None = None, head: str | None = None) -> tuple[str, int]:
        """(head name, version) for one request: ``head`` if given, else weighted (sticky when ``key`` is given)."""
        if head is not None:
            if head not in self.versions:
                raise UnknownHead(f"unknown head {head!r}; live heads: {', '.join(sorted(self.versions)) or 'none'}")
            return head, self.versions[head]
        live = [(name, w) for name, w in sorted(self.weights.items()) if w > 0]
        if not live:
            raise NoTraffic("no head has traffic weight: set weights first")
        total = sum(w for _, w in live)
        point = _key_point(key) if key else random.random()
        threshold = 0.0
        for name, weight in live:
            threshold += weight / total
            if point < threshold:
                return name, self.versions[name]
        return live[-1][0], self.versions[live[-1][0]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Route:
        """The route of :meth:`to_dict` (a route file, or one pushed to a replica); missing parts are empty."""
        return cls(
            weights={k: float(v) for k, v in data.get("weights", {}).items()},
            versions={k: int(v) for k, v in data.get("versions", {}).items()},
            revision=int(data.get("revision", 0)),
            shadow={k: float(v) for k, v in data.get("shadow", {}).items()},
        )


def parse_weights(text: str) -> dict[str, float]:
    """``"a=90,b=10"`` -> ``{"a": 90.0, "b": 10.0}``; RoutingError for anything else."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise RoutingError(f"bad weight {item!r}: write head=weight, e.g. a=90,b=10")
    return weights


def _key_point(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def parse_route(path: Path) -> Route:
    """The validated route in the file at ``path``; :class:`DamagedRoute` naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"a JSON object is expected, got {type(data).__name__}")
        return Route.from_dict(data).validate()
    except (ValueError, TypeError, AttributeError, RoutingError) as exc:  # JSONDecodeError, UnicodeDecodeError too
        reason = exc.message if isinstance(exc, RoutingError) else f"{type(exc).__name__}: {exc}"
        raise DamagedRoute(
            f"route file {path} is damaged ({reason}): restore it from a copy, or remove it to "
            "start from the build's heads"
        ) from None


def read_route(path: str | Path) -> Route:
    """The route in the file at ``path`` now (empty when there is none): read afresh, no cache."""
    return RoutingState(path, poll=0).current()


class RoutingState:
    """The route table on disk: cached reads (re-checked every ``poll`` s), locked atomic updates.

    A damaged file (:class:`DamagedRoute`) after a good read does not stop the readers: they keep the last good
    route and :attr:`error` says what is wrong until the file is a route again; a damaged file at the first read,
    and any update while the file is damaged, raise it (the file is never overwritten)."""

    def __init__(self, path: str | Path, poll: float = 0.2):
        self.path = Path(path)
        self.poll = poll
        self.error: str | None = None
        self._cached: Route | None = None
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def current(self) -> Route:
        """The route in force (empty when no file exists yet; the last good one while the file is damaged)."""
        now = time.monotonic()
        with self._lock:
            if self._cached is not None and now - self._checked < self.poll:
                return self._cached
            self._checked = now
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                self._cached, self._stamp = Route(), None
                return self._cached
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp or self._cached is None:  # (None only before the first read)
                try:
                    route = parse_route(self.path)
                except DamagedRoute as exc:
                    if self._cached is None or self._stamp is None:  # nothing good read from this file yet
                        raise
                    if self.error is None:
                        log.error("%s; serving the last good route (revision %d)", exc.message, self._cached.revision)
                    self.error = exc.message
                else:
                    self._cached, self.error = route, None
                self._stamp = stamp
            return self._cached

    def update(
        self,
        weights: dict[str, float] | None = None,
        versions: dict[str, int] | None = None,
        retire: tuple[str, ...] = (),
        shadow: dict[str, float] | None = None,
    ) -> Route:
        """Change weights and/or live versions and/or shadow shares (a share of 0 removes that shadow head), drop
        retired heads; validated, then written atomically."""
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            self._checked = 0.0
            old = self.current()
            if self.error is not None:
                raise DamagedRoute(f"{self.error}; nothing was changed")
            new_versions = {**old.versions, **(versions or {})}
            new_weights = dict(old.weights) if weights is None else {k: float(v) for k, v in weights.items()}
            for name in retire:
                if name not in new_versions:
                    raise UnknownHead(f"cannot retire unknown head {name!r}")
                new_versions.pop(name)
                new_weights.pop(name, None)
            new_shadow = {**old.shadow, **(shadow or {})}
            new_shadow = {key: float(share) for key, share in new_shadow.items() if share != 0}
            route = Route(new_weights, new_versions, old.revision + 1, new_shadow).validate()
            atomic_write_json(self.path, route.to_dict())
            os.utime(self.path)
            self._checked = 0.0
            return self.current()
