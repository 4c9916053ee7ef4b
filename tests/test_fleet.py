"""A fleet of real BentoML replicas on loopback: three ``bentoml serve`` processes (separate state dirs) that serve
one build directory (shared storage) and follow one route file (the ConfigMap stand-in); `tl-models fleet`
swaps and splits across all of them."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tl_models.bench.loadgen import BentoCaller, drive
from tl_models.bento import launcher
from tl_models.bento.engine import ServingConfig, ServingEngine
from tl_models.cli import main as cli_main
from tl_models.core.errors import BadRequest, UserError
from tl_models.core.heads import head_source_from_build, sources_from_build
from tl_models.core.routing import Route, RoutingState, read_route
from tl_models.fleet.bento import FleetError, commit, prepare, status, swap

from helpers import ADMIN, RELIABILITY, RELIABILITY_NOTES, TOKEN, sticky_head

pytestmark = pytest.mark.slow
KEYS = [f"user-{i}" for i in range(16)]


@dataclass
class Fleet:
    """Replicas (``bentoml serve`` processes), their environments, the route file and the shared build."""

    root: Path
    build: Path
    route_file: Path
    envs: list[dict] = field(default_factory=list)
    servers: list = field(default_factory=list)
    base: dict = field(default_factory=dict)  # the environment every replica starts from

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def env(self, index: int, build: Path | None = None) -> dict:
        """Replica ``index``: its state dir, and its own BENTOML_HOME (`bentoml serve` empties
        $BENTOML_HOME/prometheus_multiproc_dir when it starts: a shared home would reset the others' metrics)."""
        return {
            **self.base,
            "TL_MODELS_BUILD": str(build or self.build),
            "TL_MODELS_STATE_DIR": str(self.root / f"state-{index}"),
            "BENTOML_HOME": str(self.root / f"bentoml-{index}"),
        }

    def start(self, env: dict, index: int):
        return launcher.start(env, log_path=self.root / f"replica-{index}.log", timeout=600)

    def at(self, version_a: int, deployment) -> None:
        """Replicas 0-2 up and the fleet on a:``version_a`` (swapped there when it is not): what a test starts
        from, whatever the tests before it did."""
        for index, server in enumerate(self.servers[:3]):
            if not server.alive():
                self.servers[index] = self.start(self.envs[index], index)
        if self.route().versions["a"] != version_a:
            swap(self.urls, self.route_file, "a", version_a, TOKEN, build_dir=deployment.build_dir)
        assert self.route().versions == {"a": version_a, "b": 1}

    def route(self) -> Route:
        return read_route(self.route_file)

    def sync(self) -> None:
        """Every replica on the route file now (a test's finally: the next test starts from the file's route)."""
        for url in self.urls:
            response = httpx.post(f"{url}/admin/sync", json={}, headers=ADMIN, timeout=60)
            assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def fleet(deployment, tmp_path_factory):
    """Replicas 0 and 1 serve the shared build; replica 2 serves its own copy of it (a stale or damaged volume is
    then one replica's problem). The fleet route starts at a:1, b:1, equal weights."""
    root = tmp_path_factory.mktemp("fleet")
    route_file = root / "shared" / "route.json"
    RoutingState(route_file).update(weights={"a": 1, "b": 1}, versions={"a": 1, "b": 1})
    fleet = Fleet(root, deployment.build_dir, route_file)
    fleet.base = {
        **deployment.env,
        "TL_MODELS_ADMIN_TOKEN": TOKEN,
        "TL_MODELS_WORKERS": "1",
        "TL_MODELS_THREADS": "1",
        "TL_MODELS_FLEET_ROUTE": str(route_file),
        "TL_MODELS_FLEET_POLL": "1",
        "TL_MODELS_ACCESS_LOG": "0",
    }
    own = root / "replica-2-build"
    shutil.copytree(deployment.build_dir, own)
    fleet.envs = [fleet.env(0), fleet.env(1), fleet.env(2, own)]
    with ThreadPoolExecutor(3) as pool:
        fleet.servers = list(pool.map(lambda i: fleet.start(fleet.envs[i], i), range(3)))
    yield fleet
    for server in fleet.servers:
        server.stop()


def _sticky(urls: list[str], image: bytes) -> dict[str, str]:
    """The head each key gets, asserted equal on every replica."""
    seen: dict[str, str] = {}
    with httpx.Client(timeout=60) as client:
        for key in KEYS:
            heads = set()
            for url in urls:
                response = client.post(
                    f"{url}/classify", files={"image": ("x.png", image, "image/png")}, headers={"X-TL-Key": key}
                )
                assert response.status_code == 200, response.text
                heads.add(f"{response.json()['head']}:{response.json()['version']}")
            assert len(heads) == 1, (key, heads)
            seen[key] = heads.pop()
    return seen


def _load(urls: list[str], images: list[bytes], stop: threading.Event, clients: int = 6):
    """``clients`` closed-loop clients spread over the replicas until ``stop``; (records, thread)."""
    spread = itertools.cycle(urls)
    records: list = []
    thread = threading.Thread(
        target=lambda: records.extend(drive(lambda: BentoCaller(next(spread)), images, clients, stop=stop)[0])
    )
    thread.start()
    return records, thread


def test_fleet_swap_under_load_loses_nothing_and_keys_stay_sticky(fleet, deployment):
    fleet.at(1, deployment)
    image = deployment.images(1)[0]
    before = status(fleet.urls, fleet.route_file)
    assert before["agree"], before
    route = fleet.route()
    sticky = _sticky(fleet.urls, image)
    assert sticky == {k: sticky_head(route.weights, route.versions, k) for k in KEYS}
    stop = threading.Event()
    records, thread = _load(fleet.urls, deployment.images(10), stop)
    try:
        time.sleep(2)
        report = swap(
            fleet.urls, fleet.route_file, "a", 2, TOKEN, weights={"a": 3, "b": 1}, build_dir=deployment.build_dir
        )
        time.sleep(2)
    finally:
        stop.set()
        thread.join()
    failures = [r.error for r in records if r.error]
    RELIABILITY["requests during fleet swaps"] += len(records)
    RELIABILITY["failed requests during fleet swaps"] += len(failures)
    RELIABILITY_NOTES["fleet swap"] = (
        f"a:1 -> a:2 across 3 replicas under 6 clients: {report['seconds']:.2f} s, "
        f"{len(failures)} of {len(records)} requests failed"
    )
    assert not failures, failures[:3]
    assert all(r["converged"] for r in report["phase2"]), report
    after = status(fleet.urls, fleet.route_file)
    assert after["agree"] and all(r["versions"] == {"a": 2, "b": 1} for r in after["replicas"]), after
    new = fleet.route()
    assert _sticky(fleet.urls, image) == {k: sticky_head(new.weights, new.versions, k) for k in KEYS}
    answered = {r.answer["version"] for r in records if r.answer and r.answer["head"] == "a"}
    assert answered == {1, 2}, answered


def test_a_refusal_in_phase_1_leaves_every_replica_on_the_old_version(fleet, deployment):
    fleet.at(2, deployment)
    damaged = Path(fleet.envs[2]["TL_MODELS_BUILD"]) / "heads" / "a" / "1" / "head.onnx"
    good = damaged.read_bytes()
    damaged.write_bytes(good[:-64] + b"\0" * 64)
    revision = fleet.route().revision
    try:
        with pytest.raises(FleetError) as info:
            swap(fleet.urls, fleet.route_file, "a", 1, TOKEN)
    finally:
        damaged.write_bytes(good)
    message = str(info.value)
    assert fleet.urls[2] in message and "sha256" in message
    assert fleet.urls[0] not in message and fleet.urls[1] not in message
    assert fleet.route().revision == revision and fleet.route().versions["a"] == 2
    after = status(fleet.urls, fleet.route_file)
    assert after["agree"] and all(r["versions"]["a"] == 2 for r in after["replicas"])
    for url in fleet.urls[:2]:  # unloaded again where phase 1 had admitted it
        heads = httpx.get(f"{url}/heads", timeout=30).json()
        assert "a:1" not in heads["available"], heads["available"]


def test_a_replica_stopped_in_phase_2_converges_when_it_restarts(fleet, deployment):
    fleet.at(2, deployment)
    assert [r["admitted"] for r in prepare(fleet.urls, "a", 1, TOKEN)] == [True] * 3
    fleet.servers[1].stop()
    replies = commit(fleet.urls, fleet.route_file, TOKEN, versions={"a": 1})
    assert [r["converged"] for r in replies] == [True, False, True]
    assert "unreachable" in replies[1]["error"]
    others = [fleet.urls[0], fleet.urls[2]]
    stop = threading.Event()
    records, thread = _load(others, deployment.images(10), stop, clients=4)
    try:
        start = time.perf_counter()
        fleet.servers[1] = fleet.start(fleet.envs[1], 1)  # its own state dir still routes a:2
        restart = time.perf_counter() - start
    finally:
        stop.set()
        thread.join()
    held = len([r for r in records if r.error is None]) / max(
        1e-9, max(r.end for r in records) - min(r.start for r in records)
    )
    RELIABILITY_NOTES["fleet restart"] = (
        f"replica restarted and converged in {restart:.1f} s (ready = converged); "
        f"the other 2 held {held:.0f} req/s meanwhile, "
        f"{sum(r.error is not None for r in records)} failed"
    )
    assert not [r.error for r in records if r.error]
    after = status(fleet.urls, fleet.route_file)
    assert after["agree"] and all(r["versions"]["a"] == 1 for r in after["replicas"]), after
    answer = httpx.post(
        f"{fleet.urls[1]}/classify",
        files={"image": ("x.png", deployment.images(1)[0])},
        headers={"X-TL-Head": "a"},
        timeout=60,
    ).json()
    assert answer["version"] == 1


def test_a_new_replica_serves_the_fleet_route_from_its_first_request(fleet, deployment):
    route = fleet.route()
    server = fleet.start(fleet.env(3), 3)
    try:
        answer = httpx.post(
            f"{server.url}/classify",
            files={"image": ("x.png", deployment.images(1)[0])},
            headers={"X-TL-Head": "a"},
            timeout=60,
        ).json()
        assert answer["version"] == route.versions["a"]
        assert status(fleet.urls + [server.url], fleet.route_file)["agree"]
    finally:
        server.stop()


def test_a_bad_fleet_call_is_refused_before_any_replica_changes(fleet, deployment):
    revision = fleet.route().revision
    for call, match in (
        (
            lambda: swap(fleet.urls, fleet.route_file, "a", 9, TOKEN, build_dir=deployment.build_dir),
            "no version 9|not found|9",
        ),
        (
            lambda: swap(
                fleet.urls, fleet.route_file, "zz", 1, TOKEN, weights={"a": 1, "zz": 1}, build_dir=deployment.build_dir
            ),
            "zz",
        ),
        (lambda: swap(fleet.urls, fleet.route_file, "a", 1, "wrong-token"), "token"),
    ):
        with pytest.raises(UserError, match=match):
            call()
    assert fleet.route().revision == revision


def test_fleet_init_writes_the_first_route_once(deployment, tmp_path):
    """`tl-models fleet init`: the build's latest version of every head, equal weights or the given split; a second
    init is refused and leaves the file as it is."""
    route_file = tmp_path / "shared" / "route.json"
    assert cli_main(["fleet", "init", str(deployment.build_dir), "--route-file", str(route_file)]) == 0
    route = read_route(route_file)
    assert route.versions == deployment.manifest.latest_versions() == {"a": 2, "b": 1}
    assert route.weights == {"a": 1.0, "b": 1.0} and route.shadow == {}
    written = route_file.read_bytes()
    command = ["fleet", "init", str(deployment.build_dir), "--route-file", str(route_file), "--split", "a=9,b=1"]
    assert cli_main(command) == 1 and route_file.read_bytes() == written
    other = tmp_path / "other.json"
    assert cli_main([*command[:3], "--route-file", str(other), "--split", "a=9,b=1"]) == 0
    assert read_route(other).weights == {"a": 9.0, "b": 1.0}


def test_fleet_split_changes_every_replica_and_the_route_file(fleet, deployment):
    fleet.at(1, deployment)
    urls = ",".join(fleet.urls)
    try:
        command = ["fleet", "split", "--replicas", urls, "--route-file", str(fleet.route_file), "--token", TOKEN]
        assert cli_main([*command, "--split", "a=3,b=1"]) == 0
        assert fleet.route().weights == {"a": 3.0, "b": 1.0}
        after = status(fleet.urls, fleet.route_file)
        assert after["agree"] and all(r["weights"] == {"a": 3.0, "b": 1.0} for r in after["replicas"]), after
        revision = fleet.route().revision
        assert cli_main([*command, "--split", "c=1"]) == 1  # no such head: refused before any change
        assert fleet.route().revision == revision
    finally:
        RoutingState(fleet.route_file).update(weights={"a": 1, "b": 1})
        fleet.sync()


def test_replicas_follow_a_changed_route_file_by_polling_alone(fleet, deployment):
    """The route file changed as a ConfigMap update would change it (no call to any replica): every replica
    converges within a few of its polls (TL_MODELS_FLEET_POLL=1 here)."""
    fleet.at(1, deployment)
    try:
        RoutingState(fleet.route_file).update(weights={"a": 1, "b": 4})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = status(fleet.urls, fleet.route_file)
            if now["agree"] and all(r["weights"] == {"a": 1.0, "b": 4.0} for r in now["replicas"]):
                break
            time.sleep(0.5)
        assert all(r["weights"] == {"a": 1.0, "b": 4.0} for r in now["replicas"]), now
    finally:
        RoutingState(fleet.route_file).update(weights={"a": 1, "b": 1})
        fleet.sync()


def _until(condition, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def test_a_route_file_that_cannot_be_followed_shows_as_the_fleet_error_until_a_route_is_back(fleet, deployment, capsys):
    """The route file turns to garbage (truncated JSON), then names a version no replica can find: every replica
    keeps serving the route it followed, and its ``/heads`` and ``fleet status`` say it is not following the
    fleet, with why; once a good route is back, the error clears by polling alone (TL_MODELS_FLEET_POLL=1)."""
    fleet.at(1, deployment)
    good = fleet.route_file.read_bytes()
    revision = fleet.route().revision

    def errors() -> list:
        return [httpx.get(f"{url}/heads", timeout=30).json()["fleet"] for url in fleet.urls]

    try:
        fleet.route_file.write_bytes(good[: len(good) // 2])
        assert _until(lambda: all(f["error"] for f in errors())), errors()
        for state in errors():
            assert state["in_sync"] is False and state["revision"] == revision
            assert "is damaged" in state["error"] and str(fleet.route_file) in state["error"], state
        image = deployment.images(1)[0]
        for url in fleet.urls:  # still serving the route it followed
            answer = httpx.post(f"{url}/classify", files={"image": ("x.png", image, "image/png")}, timeout=30)
            assert answer.status_code == 200, answer.text
            assert (answer.json()["head"], answer.json()["version"]) in {("a", 1), ("b", 1)}
        report = status(fleet.urls, fleet.route_file)
        assert not report["agree"] and "is damaged" in report["route"]["error"]
        assert all("is damaged" in r["fleet_error"] for r in report["replicas"])
        capsys.readouterr()
        assert cli_main(["fleet", "status", "--replicas", ",".join(fleet.urls)]) == 1
        assert capsys.readouterr().out.count("not following the fleet route") == len(fleet.urls)

        unknown = Route({"a": 1.0, "b": 1.0}, {"a": 99, "b": 1}, revision=revision + 1)
        fleet.route_file.write_text(json.dumps(unknown.to_dict()))
        assert _until(lambda: all(f["error"] and "99" in f["error"] for f in errors())), errors()
        assert all(r["versions"] == {"a": 1, "b": 1} for r in status(fleet.urls)["replicas"])
    finally:
        fleet.route_file.write_bytes(good)
    assert _until(lambda: all(f["in_sync"] and f["error"] is None for f in errors())), errors()
    assert status(fleet.urls, fleet.route_file)["agree"]


def test_a_replica_down_in_phase_1_refuses_the_swap_and_changes_nothing(fleet, deployment):
    fleet.at(1, deployment)
    revision = fleet.route().revision
    fleet.servers[2].stop()
    with pytest.raises(FleetError) as info:
        swap(fleet.urls, fleet.route_file, "a", 2, TOKEN, build_dir=deployment.build_dir)
    assert fleet.urls[2] in str(info.value)
    assert fleet.route().revision == revision and fleet.route().versions["a"] == 1
    for url in fleet.urls[:2]:  # admitted in phase 1 where it could be, then unloaded again
        heads = httpx.get(f"{url}/heads", timeout=30).json()
        assert {(h["name"], h["version"]) for h in heads["heads"]} == {("a", 1), ("b", 1)}
        assert "a:2" not in heads["available"], heads["available"]


def test_a_pushed_route_wins_over_an_older_route_file(deployment, tmp_path):
    """A mounted ConfigMap shows a change a minute or two late: the route phase 2 pushes is followed at once, and
    the older file never takes a replica back."""
    route_file = tmp_path / "route.json"
    RoutingState(route_file).update(weights={"a": 1, "b": 1}, versions={"a": 1, "b": 1})
    backbone, heads = sources_from_build(deployment.build_dir)
    engine = ServingEngine(
        backbone,
        [h for h in heads if h.version == 1],
        ServingConfig(state_dir=tmp_path / "state", fleet_route=route_file, fleet_poll=3600),
        find_head=lambda name, version: head_source_from_build(deployment.build_dir, name, version),
    )
    assert engine.heads.routing.current().versions == {"a": 1, "b": 1} and engine.fleet["in_sync"]
    asyncio.run(engine.sync(Route({"a": 3.0, "b": 1.0}, {"a": 2, "b": 1}, revision=5).to_dict()))
    assert engine.heads.routing.current().versions == {"a": 2, "b": 1}
    assert engine.sync_fleet()["revision"] == 5  # the file (revision 1) is older: nothing goes back
    assert engine.heads.routing.current().versions == {"a": 2, "b": 1}
    with pytest.raises(BadRequest, match="route must be"):
        asyncio.run(engine.sync({"weights": {"a": 1}}))
    engine.close()
