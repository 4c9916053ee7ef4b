"""Live head swap on a running Triton, or on every replica of a fleet serving one shared repository, through the
model-control API (called on each replica) and the route file (in the shared repository: every router follows it).

1. the head model's version_policy gets old + new version; ``load`` brings the new version up next to the old;
2. both ensembles of the head are repointed at the new version and reloaded (Triton keeps the old ensemble
   serving until the new one is ready);
3. the route file (``tl_models.core.routing``) is repointed, with new weights if given: the router follows within
   its poll interval;
4. once the old version has seen no traffic for ``drain`` seconds, the version_policy drops it and ``load``
   unloads it (in-flight requests finish first; the router retries a straggler on the new route); the swap returns
   once every replica reports ready again (Triton reports not ready while it finishes an unload).

Before step 1 the new version goes through the admission BentoML uses too (:func:`tl_models.core.heads.admit_head`:
the sha256 recorded when it was packaged, ONNX Runtime load, tensor names, embedding size, same backbone, a test
run), so a corrupt, truncated or foreign file is refused before Triton sees it. If
step 1, 2 or 3 fails on any replica (or a replica is not reachable before it starts), every config changed so far
is put back and reloaded everywhere: the previous versions, ensembles and route stay in force (Triton keeps serving
a model whose reload failed). A replica that restarts loads the repository as it is: the new configs and route.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tritonclient.http import InferenceServerClient
from tritonclient.utils import InferenceServerException

from ..core.errors import UserError
from ..core.heads import HeadSource, admit_head
from ..core.names import (
    ADMIN_HEADER,
    CONFIG,
    ROUTE_FILE,
    VERSION_BACKBONE,
    VERSION_HEAD,
    VERSION_ONNX,
    VERSION_SHA256,
)
from ..core.routing import Route, RoutingState, read_route
from .config import backbone_model, ensemble_model, head_model, read_config
from .repository import write_config

log = logging.getLogger(__name__)
# seconds a replica that is up may stay not ready (finishing a model load or unload) before a change is refused
READY_WAIT = 10.0


class TritonSwapError(UserError):
    """A swap that cannot start or did not complete; the message says which step."""


@dataclass
class SwapResult:
    """What a swap did."""

    head: str
    old_version: int | None
    new_version: int
    route: Route


def client_for(url: str) -> InferenceServerClient:
    """A tritonclient.http client for ``host:port`` or ``http://host:port``."""
    return InferenceServerClient(url.split("://", 1)[-1].rstrip("/"), network_timeout=120.0)


def _admin_headers() -> dict[str, str] | None:
    """The header Triton's restricted model-control API wants (``--http-restricted-api``, as `tl-models deploy
    render` configures it) when TL_MODELS_ADMIN_TOKEN is set; a server without the restriction ignores it."""
    token = os.environ.get("TL_MODELS_ADMIN_TOKEN")
    return {ADMIN_HEADER: token} if token else None


class Replicas:
    """Every tritonserver that serves one shared model repository (one, or a fleet's pods): model control calls
    go to each; the first that fails names its replica."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self.clients = [client_for(url) for url in urls]

    def check_ready(self, wait: float = READY_WAIT) -> Replicas:
        """TritonSwapError naming each replica that cannot be reached or is not ready (nothing was changed). A
        replica that is up but not ready is asked again for up to ``wait`` seconds: Triton reports not ready
        while it finishes loading or unloading a model, e.g. just after the previous swap returned."""
        problems = self.unready(wait)
        if problems:
            raise TritonSwapError("refused before any change: " + "; ".join(problems))
        return self

    def unready(self, wait: float = READY_WAIT) -> list[str]:
        """Each replica that cannot be reached, or is still not ready after up to ``wait`` seconds, and why."""
        deadline = time.monotonic() + wait
        while True:
            problems, waiting = [], False
            for url, client in zip(self.urls, self.clients):
                try:
                    if not client.is_server_ready():
                        problems.append(f"{url}: not ready")
                        waiting = True
                except (OSError, InferenceServerException) as exc:
                    problems.append(f"{url}: cannot reach Triton ({exc})")
            if not problems or not waiting or time.monotonic() >= deadline:
                return problems
            time.sleep(0.1)

    def load(self, model: str) -> None:
        """(Re)load ``model`` from the repository on every replica, all at once."""

        def one(url: str) -> str | None:
            client = client_for(url)  # tritonclient.http clients are gevent-based: one per thread
            try:
                client.load_model(model, headers=_admin_headers())
            except (OSError, InferenceServerException) as exc:
                message = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
                return f"Triton at {url} failed to load {model}: {message}"
            finally:
                client.close()
            return None

        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            errors = [e for e in pool.map(one, self.urls) if e]
        if errors:
            raise TritonSwapError("; ".join(errors))

    def not_ready(self, model: str, version: int) -> list[str]:
        """The replicas where ``model`` ``version`` is not ready."""
        return [url for url, client in zip(self.urls, self.clients) if not client.is_model_ready(model, str(version))]

    def inference_count(self, model: str, version: int) -> int:
        """Inferences of ``model`` ``version`` summed over the replicas."""
        total = 0
        for client in self.clients:
            stats = client.get_inference_statistics(model, str(version))["model_stats"]
            total += sum(int(s["inference_count"]) for s in stats)
        return total


def _load(client: Replicas, model: str) -> None:
    """A forward step's (re)load on every replica (the rollback reloads through :meth:`Replicas.load` directly)."""
    client.load(model)


def _reconfigure(client: Replicas, model_dir: Path, change: Callable, undo: list) -> None:
    """Apply ``change`` to a model's config, write it and (re)load the model; the original config goes on
    ``undo`` first, so a failure at any point can be rolled back by :func:`_roll_back`."""
    config = read_config(model_dir)
    original = type(config)()
    original.CopyFrom(config)
    undo.append((model_dir, original))
    change(config)
    write_config(model_dir, config)
    _load(client, model_dir.name)


def _set_versions(client: Replicas, model_dir: Path, versions: list[int], undo: list) -> None:
    """The head's version_policy becomes ``versions``: Triton loads added versions and unloads dropped ones."""

    def change(config) -> None:
        del config.version_policy.specific.versions[:]
        config.version_policy.specific.versions.extend(versions)

    _reconfigure(client, model_dir, change, undo)


def _roll_back(client: Replicas, undo: list) -> None:
    """Put back the configs on ``undo`` (latest first) and reload their models on every replica; log what cannot
    be restored."""
    for model_dir, config in reversed(undo):
        try:
            write_config(model_dir, config)
            client.load(model_dir.name)
            log.info("rolled back %s", model_dir.name)
        except Exception as exc:  # keep restoring the others; the message names what is left
            log.error("could not roll back %s: %s", model_dir.name, exc)


def _admit(repo: Path, name: str, version_dir: Path) -> None:
    """The version must pass the head admission both servers share (sha256 recorded at packaging, ONNX Runtime
    load, names, the backbone's embedding size and sha256, a test run): Triton must never be asked to load a broken
    version (a failed version stays in its repository index and keeps strict readiness false until a restart)."""
    facts, recorded = version_dir / VERSION_HEAD, version_dir / VERSION_SHA256
    backbone_facts = repo / backbone_model(name) / "1" / VERSION_BACKBONE
    if not (facts.is_file() and recorded.is_file() and backbone_facts.is_file()):
        raise TritonSwapError(
            f"{version_dir} lacks {VERSION_HEAD} / {VERSION_SHA256}, or its backbone "
            f"{VERSION_BACKBONE}: package its build again with `tl-models triton package`"
        )
    source = HeadSource.from_dict(
        json.loads(facts.read_text()), path=str(version_dir / VERSION_ONNX), sha256=recorded.read_text().strip()
    )
    backbone = json.loads(backbone_facts.read_text())
    gated = None if backbone["gated"] is None else frozenset(backbone["gated"])
    embedding_dim = int(read_config(repo / backbone_model(name)).output[0].dims[0])
    try:
        admit_head(source, embedding_dim, backbone["sha256"], providers="cpu", gated=gated)
    except UserError as exc:
        raise TritonSwapError(f"{exc.message}: refused; the live version keeps serving") from None


def _settle(client: Replicas) -> None:
    """Return once every replica reports ready again after an unload (Triton reports not ready while it finishes
    one), so that the next change or ``status`` finds the fleet settled; a warning after ``READY_WAIT``."""
    problems = client.unready()
    if problems:
        log.warning("done, but not every replica is ready again: %s", "; ".join(problems))


def _drain(client: Replicas, model: str, version: int, quiet: float, timeout: float) -> None:
    """Wait until ``model`` version ``version`` has answered nothing new for ``quiet`` seconds on any replica."""
    deadline = time.monotonic() + timeout
    count, since = client.inference_count(model, version), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise TritonSwapError(
                f"{model} version {version} still gets traffic after {timeout:.0f} s: "
                "left loaded; unload it once clients have moved"
            )
        time.sleep(min(0.2, quiet))
        now = client.inference_count(model, version)
        if now != count:
            count, since = now, time.monotonic()


def _target(repo: Path, name: str, head: str, version: int | None) -> tuple[Path, int, RoutingState]:
    """The head's model folder, the version (default: the highest in the repository) and the route state;
    TritonSwapError when any is missing."""
    model = head_model(name, head)
    model_dir = repo / model
    if not (model_dir / CONFIG).is_file():
        raise TritonSwapError(f"no model {model} in {repo}: run `tl-models triton package BUILD --repo {repo}`")
    on_disk = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    version = version if version is not None else max(on_disk, default=0)
    if version not in on_disk:
        raise TritonSwapError(
            f"{model} has no version {version} in {repo} (it has {on_disk}): "
            "package the build that made it with `tl-models triton package`"
        )
    state = RoutingState(repo / name / ROUTE_FILE, poll=0)
    if not state.path.is_file():
        raise TritonSwapError(f"no route file {state.path}: is {name!r} a build packaged into {repo}?")
    return model_dir, version, state


def _url_list(url: str | list[str]) -> list[str]:
    """``url``: one URL, a comma-separated list, or a list."""
    return [u.strip() for u in url.split(",") if u.strip()] if isinstance(url, str) else list(url)


def _connect(url: str | list[str]) -> Replicas:
    """Every replica (:func:`_url_list`), each reachable and ready; else TritonSwapError naming those that are
    not."""
    urls = _url_list(url)
    if not urls:
        raise TritonSwapError("give at least one Triton URL")
    return Replicas(urls).check_ready()


def _in_use(repo: Path, name: str, head: str, route: Route) -> list[int]:
    """The versions of ``head`` that must stay loaded: the live one, those that shadow, those its ensembles call."""
    used = {route.versions[head]} if head in route.versions else set()
    used |= {v for n, v, _ in route.shadows() if n == head}
    model = head_model(name, head)
    for tensor in (False, True):
        ensemble_dir = repo / ensemble_model(name, head, tensor)
        if (ensemble_dir / CONFIG).is_file():
            used |= {
                step.model_version
                for step in read_config(ensemble_dir).ensemble_scheduling.step
                if step.model_name == model and step.model_version > 0
            }
    return sorted(used)


def swap(
    url: str | list[str],
    repo: str | Path,
    name: str,
    head: str,
    version: int | None = None,
    weights: dict[str, float] | None = None,
    drain: float = 2.0,
    timeout: float = 120.0,
) -> SwapResult:
    """Make ``version`` (default: the highest in the repository) of ``head`` live on every replica that serves
    ``repo`` (``url``: one or several); see the module docstring."""
    repo = Path(repo)
    model_dir, version, state = _target(repo, name, head, version)
    model = model_dir.name
    current = state.current()
    old = current.versions.get(head)
    Route(current.weights if weights is None else weights, {**current.versions, head: version}).validate()
    _admit(repo, name, model_dir / str(version))
    client = _connect(url)

    undo: list = []
    try:
        route = _repoint(client, repo, name, head, model, model_dir, old, version, state, weights, undo)
    except BaseException:
        _roll_back(client, undo)
        _settle(client)  # the rolled-back version's unload leaves Triton not ready for a moment, as a swap's does
        raise
    if old is not None and old != version and old not in _in_use(repo, name, head, route):  # a shadow stays
        _drain(client, model, old, quiet=max(drain, 0.5), timeout=timeout)
        _set_versions(client, model_dir, _in_use(repo, name, head, route), [])
        if len(client.not_ready(model, old)) < len(client.urls):
            raise TritonSwapError(f"{model} version {old} is still loaded after the unload request")
        log.info("unloaded %s version %d", model, old)
        _settle(client)
    return SwapResult(head, old, version, route)


def _repoint(
    client: Replicas,
    repo: Path,
    name: str,
    head: str,
    model: str,
    model_dir: Path,
    old: int | None,
    version: int,
    state: RoutingState,
    weights: dict[str, float] | None,
    undo: list,
) -> Route:
    """Steps 1-3: load the new version next to the old, repoint the ensembles, then the route."""
    _set_versions(client, model_dir, sorted({*_in_use(repo, name, head, state.current()), version}), undo)
    if client.not_ready(model, version):
        raise TritonSwapError(
            f"{model} version {version} is not ready on {', '.join(client.not_ready(model, version))}"
            f" after loading: does every server serve {repo.resolve()}?"
        )
    log.info("loaded %s version %d", model, version)
    for tensor in (False, True):
        ensemble_dir = repo / ensemble_model(name, head, tensor)
        if (ensemble_dir / CONFIG).is_file():

            def repoint(config) -> None:
                for step in config.ensemble_scheduling.step:
                    if step.model_name == model:
                        step.model_version = version

            _reconfigure(client, ensemble_dir, repoint, undo)
            log.info("repointed ensemble %s at %s version %d", ensemble_dir.name, model, version)
    route = state.update(weights=weights, versions={head: version})
    log.info("route revision %d: versions %s, weights %s", route.revision, route.versions, route.weights)
    return route


def shadow(
    url: str | list[str],
    repo: str | Path,
    name: str,
    head: str,
    version: int | None = None,
    share: float = 1.0,
    drain: float = 2.0,
    timeout: float = 120.0,
) -> Route:
    """Have the router score ``head`` ``version`` beside every answer on ``share`` (0..1] of requests, never
    returned: admitted like a swap, loaded next to the versions in use, then named in the route. ``share`` 0 stops
    it (``version`` None: every shadow version of ``head``): out of the route first, then unloaded once drained
    (unless the route still uses it)."""
    repo = Path(repo)
    if share == 0:
        return _unshadow(url, repo, name, head, version, drain, timeout)
    model_dir, version, state = _target(repo, name, head, version)
    current = state.current()
    Route(current.weights, current.versions, shadow={**current.shadow, f"{head}:{version}": share}).validate()
    _admit(repo, name, model_dir / str(version))
    client = _connect(url)
    undo: list = []
    try:
        _set_versions(client, model_dir, sorted({*_in_use(repo, name, head, current), version}), undo)
        if client.not_ready(model_dir.name, version):
            raise TritonSwapError(
                f"{model_dir.name} version {version} is not ready on "
                f"{', '.join(client.not_ready(model_dir.name, version))} after loading"
            )
        route = state.update(shadow={f"{head}:{version}": share})
    except BaseException:
        _roll_back(client, undo)
        raise
    log.info("route revision %d: %s:%d shadows %.0f%% of requests", route.revision, head, version, share * 100)
    return route


def _unshadow(
    url: str | list[str], repo: Path, name: str, head: str, version: int | None, drain: float, timeout: float
) -> Route:
    model_dir, _, state = _target(repo, name, head, version)
    keys = [f"{head}:{v}" for n, v, _ in state.current().shadows() if n == head and version in (None, v)]
    if not keys:
        raise TritonSwapError(f"{head}{'' if version is None else f':{version}'} is not a shadow head of {name!r}")
    client = _connect(url)
    route = state.update(shadow={key: 0 for key in keys})
    needed = _in_use(repo, name, head, route)
    unused = [v for v in (int(key.partition(":")[2]) for key in keys) if v not in needed]
    for old in unused:
        _drain(client, model_dir.name, old, quiet=max(drain, 0.5), timeout=timeout)
    if unused and needed:
        _set_versions(client, model_dir, needed, [])
        _settle(client)
    return route


def status(url: str | list[str], repo: str | Path, name: str) -> dict:
    """Every replica serving ``repo``: readiness and the loaded versions of the build's head models (from its
    repository index), beside the shared route; ``agree`` when every replica is ready and has loaded the versions
    the route uses, and only those."""
    repo = Path(repo)
    urls = _url_list(url)
    route = read_route(repo / name / ROUTE_FILE)
    if not route.versions:
        raise TritonSwapError(f"no route file {repo / name / ROUTE_FILE}: is {name!r} a build packaged into {repo}?")
    prefix = head_model(name, "")
    wanted = {
        head: _in_use(repo, name, head, route)
        for head in sorted({*route.versions, *(n for n, _, _ in route.shadows())})
    }
    replicas = []
    for replica in urls:
        client = client_for(replica)
        entry: dict = {"url": replica, "ready": False, "loaded": {}, "error": None}
        try:
            entry["ready"] = client.is_server_ready()
            for model in client.get_model_repository_index(headers=_admin_headers()):
                if model.get("name", "").startswith(prefix) and model.get("state") == "READY":
                    head = model["name"][len(prefix) :]
                    entry["loaded"].setdefault(head, []).append(int(model["version"]))
        except (OSError, InferenceServerException) as exc:
            entry["error"] = str(exc)
        finally:
            client.close()
        entry["loaded"] = {head: sorted(versions) for head, versions in sorted(entry["loaded"].items())}
        entry["agrees"] = entry["ready"] and all(entry["loaded"].get(h) == v for h, v in wanted.items())
        replicas.append(entry)
    return {
        "route": route.to_dict(),
        "wanted": wanted,
        "replicas": replicas,
        "agree": all(r["agrees"] for r in replicas),
    }
