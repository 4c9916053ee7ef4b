"""Live head swap on a running Triton, through the model-control API and the route file.

1. the head model's version_policy gets old + new version; ``load`` brings the new version up next to the old;
2. both ensembles of the head are repointed at the new version and reloaded (Triton keeps the old ensemble
   serving until the new one is ready);
3. the route file (``tl_models.routing``) is repointed, with new weights if given: the router follows within
   its poll interval;
4. once the old version has seen no traffic for ``drain`` seconds, the version_policy drops it and ``load``
   unloads it (in-flight requests finish first; the router retries a straggler on the new route).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tritonclient.http import InferenceServerClient
from tritonclient.utils import InferenceServerException

from .routing import Route, RoutingState
from .triton import CONFIG, ROUTE_FILE, ensemble_model, head_model, read_config, write_config

log = logging.getLogger(__name__)


class TritonSwapError(RuntimeError):
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


def _load(client: InferenceServerClient, model: str) -> None:
    try:
        client.load_model(model)
    except InferenceServerException as exc:
        raise TritonSwapError(f"Triton failed to load {model}: {exc.message()}") from None


def _set_versions(client: InferenceServerClient, model_dir: Path, versions: list[int]) -> None:
    """Write the head's version_policy and (re)load it: Triton loads added versions and unloads dropped ones."""
    config = read_config(model_dir)
    del config.version_policy.specific.versions[:]
    config.version_policy.specific.versions.extend(versions)
    write_config(model_dir, config)
    _load(client, model_dir.name)


def _inference_count(client: InferenceServerClient, model: str, version: int) -> int:
    stats = client.get_inference_statistics(model, str(version))["model_stats"]
    return sum(int(s["inference_count"]) for s in stats)


def _drain(client: InferenceServerClient, model: str, version: int, quiet: float, timeout: float) -> None:
    """Wait until ``model`` version ``version`` has answered nothing new for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    count, since = _inference_count(client, model, version), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise TritonSwapError(f"{model} version {version} still gets traffic after {timeout:.0f} s: "
                                  "left loaded; unload it once clients have moved")
        time.sleep(min(0.2, quiet))
        now = _inference_count(client, model, version)
        if now != count:
            count, since = now, time.monotonic()


def swap(url: str, repo: str | Path, name: str, head: str, version: int | None = None,
         weights: dict[str, float] | None = None, drain: float = 2.0, timeout: float = 120.0) -> SwapResult:
    """Make ``version`` (default: the highest in the repository) of ``head`` live; see the module docstring."""
    repo = Path(repo)
    model = head_model(name, head)
    model_dir = repo / model
    if not (model_dir / CONFIG).is_file():
        raise TritonSwapError(f"no model {model} in {repo}: run `tl-models package triton BUILD --repo {repo}`")
    on_disk = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    version = version if version is not None else max(on_disk, default=0)
    if version not in on_disk:
        raise TritonSwapError(f"{model} has no version {version} in {repo} (it has {on_disk}): "
                              "package the build that made it with `tl-models package triton`")
    state = RoutingState(repo / name / ROUTE_FILE, poll=0)
    if not state.path.is_file():
        raise TritonSwapError(f"no route file {state.path}: is {name!r} a build packaged into {repo}?")
    current = state.current()
    old = current.versions.get(head)
    Route(current.weights if weights is None else weights, {**current.versions, head: version}).validate()
    client = client_for(url)
    if not client.is_server_ready():
        raise TritonSwapError(f"Triton at {url} is not ready")

    _set_versions(client, model_dir, sorted({v for v in (old, version) if v is not None}))
    if not client.is_model_ready(model, str(version)):
        raise TritonSwapError(f"{model} version {version} is not ready after loading: does the server at {url} "
                              f"serve {repo.resolve()}?")
    log.info("loaded %s version %d", model, version)
    for tensor in (False, True):
        ensemble_dir = repo / ensemble_model(name, head, tensor)
        if (ensemble_dir / CONFIG).is_file():
            config = read_config(ensemble_dir)
            for step in config.ensemble_scheduling.step:
                if step.model_name == model:
                    step.model_version = version
            write_config(ensemble_dir, config)
            _load(client, ensemble_dir.name)
            log.info("repointed ensemble %s at %s version %d", ensemble_dir.name, model, version)
    route = state.update(weights=weights, versions={head: version})
    log.info("route revision %d: versions %s, weights %s", route.revision, route.versions, route.weights)
    if old is not None and old != version:
        _drain(client, model, old, quiet=max(drain, 0.5), timeout=timeout)
        _set_versions(client, model_dir, [version])
        if client.is_model_ready(model, str(old)):
            raise TritonSwapError(f"{model} version {old} is still loaded after the unload request")
        log.info("unloaded %s version %d", model, old)
    return SwapResult(head, old, version, route)
