"""The arithmetic of `bench serve`'s verdicts (``tl_models.bench.serve.verdict``) on figures written out by hand:
ratios against the same round's ONNX Runtime, references and targets on the median of rounds, errors failing a
target whatever its value."""

from __future__ import annotations

import pytest

from tl_models.bench.serve.verdict import add_ratios, targets


def _ort(round_: int, batch: int, throughput: float, ms: float, cpu: float, sessions: int = 1) -> dict:
    return {
        "stack": "onnxruntime",
        "round": round_,
        "batch": batch,
        "throughput": throughput,
        "ms_per_batch": ms,
        "cpu_ms_per_image": cpu,
        "decode": False,
        "sessions": sessions,
    }


def _server(round_: int, clients: int, throughput: float, p50: float, cpu: float, errors: int = 0) -> dict:
    return {
        "stack": "bentoml-http",
        "precision": "fp32",
        "round": round_,
        "concurrency": clients,
        "throughput": throughput,
        "p50_ms": p50,
        "server_cpu_ms_per_request": cpu,
        "errors": errors,
    }


def _figures(errors: int = 0) -> dict:
    return {
        "in_process": [
            _ort(0, 1, 200.0, 5.0, 9.0),
            _ort(0, 32, 250.0, 128.0, 7.0, sessions=2),
            _ort(1, 1, 180.0, 5.5, 9.5),
            _ort(1, 32, 200.0, 160.0, 8.0, sessions=2),
        ],
        "servers": [
            _server(0, 1, 150.0, 7.0, 11.0),
            _server(0, 32, 200.0, 150.0, 9.0),
            _server(1, 1, 140.0, 8.5, 12.0),
            _server(1, 32, 150.0, 200.0, 10.0, errors=errors),
        ],
    }


def test_each_server_row_is_compared_with_its_own_rounds_onnx_runtime():
    figures = _figures()
    add_ratios(figures)
    top = [r for r in figures["servers"] if r["concurrency"] == 32]
    assert [r["vs_ort_best"] for r in top] == pytest.approx([200 / 250, 150 / 200])  # not the best of all rounds
    assert [r["cpu_over_ort_ms"] for r in top] == pytest.approx([9 - 7, 10 - 8])  # ORT's least CPU, same round
    lone = [r for r in figures["servers"] if r["concurrency"] == 1]
    assert [r["overhead_ms"] for r in lone] == pytest.approx([7 - 5, 8.5 - 5.5])  # p50 over the batch-1 pass
    assert [r["cpu_over_pass_ms"] for r in lone] == pytest.approx([11 - 9, 12 - 9.5])
    assert figures["ort_best"]["throughput"] == pytest.approx(225.0) and figures["ort_best"]["rounds"] == [250, 200]


def test_targets_are_judged_on_the_median_of_rounds():
    figures = _figures()
    add_ratios(figures)
    verdicts = {t["target"]: t for t in targets(figures)}
    throughput = verdicts["bentoml-http: throughput at concurrency 32 >= 0.75x raw ORT best"]
    assert throughput["value"] == pytest.approx((0.8 + 0.75) / 2) and throughput["met"]
    overhead = verdicts["bentoml-http: serving overhead at concurrency 1 <= 4.0 ms p50"]
    assert overhead["value"] == pytest.approx(2.5) and overhead["met"]
    cpu = verdicts["bentoml-http: server CPU per request at concurrency 1 <= raw ORT's least CPU per image + 3.0 ms"]
    assert cpu["rounds"] == pytest.approx([11 - 7, 12 - 8]) and cpu["value"] == pytest.approx(4.0) and not cpu["met"]


def test_an_error_fails_the_throughput_target_whatever_the_ratio():
    figures = _figures(errors=1)
    add_ratios(figures)
    throughput = next(t for t in targets(figures) if "throughput" in t["target"])
    assert throughput["value"] >= 0.75 and not throughput["met"]
