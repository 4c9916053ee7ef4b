"""Two tritonserver replicas on one shared model repository (the shared volume stand-in): `tl-models triton swap`
with both URLs loads on each, repoints the shared ensembles and route, and refuses up front when a replica is down;
a restarted replica serves the repository as it is."""

from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.http as httpclient

from tl_models.bench.loadgen import drive
from tl_models.cli import main as cli_main
from tl_models.core.routing import RoutingState, read_route
from tl_models.triton.config import RepositoryOptions
from tl_models.triton.launcher import start as start_triton
from tl_models.triton.repository import write_repository
from tl_models.triton.swap import TritonSwapError, swap

from helpers import RELIABILITY, RELIABILITY_NOTES, bytes_input

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(served, tmp_path_factory):
    """A repository of the Triton build (heads a with versions 1 and 2, one of them live, and b) served by two
    tritonservers."""
    root = tmp_path_factory.mktemp("triton-fleet")
    repo = write_repository(
        served["build"], root / "repo", RepositoryOptions(flavour="python", weights={"a": 1, "b": 1})
    ).path
    with ThreadPoolExecutor(2) as pool:
        servers = list(
            pool.map(lambda i: start_triton(repo, workdir=root / f"tritonserver-{i}", timeout=600), range(2))
        )
    state = {"root": root, "repo": repo, "servers": servers, "name": served["name"]}
    yield state
    for server in state["servers"]:
        server.stop()


class Router:
    """One client of the router on one replica, forcing head ``a``; the answer is "a:<version>"."""

    def __init__(self, url: str, name: str):
        self.client, self.name = httpclient.InferenceServerClient(url), name
        self.outputs = [httpclient.InferRequestedOutput("head")]

    def __call__(self, image: bytes) -> str:
        inputs = [bytes_input(httpclient, [image]), bytes_input(httpclient, [b"a"], "route_head")]
        return self.client.infer(self.name, inputs, outputs=self.outputs).as_numpy("head")[0, 0].decode()

    def close(self) -> None:
        self.client.close()


def _urls(pair: dict) -> list[str]:
    return [f"http://{s.http_url}" for s in pair["servers"]]


def _sticky(pair: dict, image: bytes) -> list[str]:
    """The head each of 12 keys gets, asserted equal on both replicas."""
    heads: list[str] = []
    for key in (f"user-{i}" for i in range(12)):
        answers = set()
        for server in pair["servers"]:
            client = httpclient.InferenceServerClient(server.http_url)
            inputs = [bytes_input(httpclient, [image]), bytes_input(httpclient, [key.encode()], "route_key")]
            answers.add(
                client.infer(pair["name"], inputs, outputs=[httpclient.InferRequestedOutput("head")])
                .as_numpy("head")[0, 0]
                .decode()
                .split(":")[0]
            )
            client.close()
        assert len(answers) == 1, (key, answers)
        heads += answers
    return heads


def test_swap_on_both_replicas_under_load(pair, images, tmp_path):
    name, urls = pair["name"], _urls(pair)
    old = read_route(pair["repo"] / name / "route.json").versions["a"]
    new = 3 - old
    before = _sticky(pair, images[0])
    spread = itertools.cycle(s.http_url for s in pair["servers"])
    stop, records = threading.Event(), []
    runner = threading.Thread(
        target=lambda: records.extend(drive(lambda: Router(next(spread), name), images, 4, stop=stop)[0])
    )
    runner.start()
    try:
        time.sleep(2)
        start = time.perf_counter()
        code = cli_main(
            [
                "triton",
                "swap",
                "--url",
                ",".join(urls),
                "--repo",
                str(pair["repo"]),
                "--build",
                name,
                "--head",
                "a",
                "--version",
                str(new),
                "--drain",
                "1",
            ]
        )
        seconds = time.perf_counter() - start
        time.sleep(1)
    finally:
        stop.set()
        runner.join()
    failures = [r.error for r in records if r.error]
    RELIABILITY["requests during fleet swaps"] += len(records)
    RELIABILITY["failed requests during fleet swaps"] += len(failures)
    RELIABILITY_NOTES["triton fleet swap"] = (
        f"a:{old} -> a:{new} on 2 tritonservers under 4 clients: {seconds:.2f} s "
        f"(drain 1 s), {len(failures)} of {len(records)} requests failed"
    )
    assert code == 0 and not failures, failures[:3]
    assert {r.answer for r in records} == {f"a:{old}", f"a:{new}"}
    for server in pair["servers"]:
        client = httpclient.InferenceServerClient(server.http_url)
        assert client.is_model_ready(f"{name}_head_a", str(new)) and not client.is_model_ready(
            f"{name}_head_a", str(old)
        )
    assert _sticky(pair, images[0]) == before  # weights unchanged: every key keeps its head name
    report = tmp_path / "status.json"
    assert (
        cli_main(
            [
                "triton",
                "status",
                "--url",
                ",".join(urls),
                "--repo",
                str(pair["repo"]),
                "--build",
                name,
                "--json",
                str(report),
            ]
        )
        == 0
    )
    figures = json.loads(report.read_text())
    assert [r["loaded"]["a"] for r in figures["replicas"]] == [[new], [new]] and figures["agree"]


def test_a_replica_down_refuses_the_swap_before_any_change(pair, images):
    name, repo = pair["name"], pair["repo"]
    state = RoutingState(repo / name / "route.json", poll=0)
    revision, config = state.current().revision, (repo / f"{name}_head_a" / "config.pbtxt").read_text()
    down = pair["servers"][1]
    down.stop()
    try:
        with pytest.raises(TritonSwapError, match="refused before any change") as info:
            swap(_urls(pair), repo, name, "a", 3 - state.current().versions["a"])
        assert down.http_url in str(info.value) and pair["servers"][0].http_url not in str(info.value)
        assert (
            cli_main(["triton", "status", "--url", ",".join(_urls(pair)), "--repo", str(repo), "--build", name]) == 1
        )  # the replica that is down disagrees
        assert state.current().revision == revision
        assert (repo / f"{name}_head_a" / "config.pbtxt").read_text() == config
    finally:  # the pair is whole again for whatever test runs next
        start = time.perf_counter()
        pair["servers"][1] = start_triton(repo, workdir=pair["root"] / "tritonserver-1b", timeout=600)
        ready = time.perf_counter() - start
    RELIABILITY_NOTES["triton fleet restart"] = f"a restarted tritonserver was ready in {ready:.1f} s"
    restarted = Router(pair["servers"][1].http_url, name)
    assert restarted(images[0]) == f"a:{state.current().versions['a']}"  # the repository as it is now
    restarted.close()
