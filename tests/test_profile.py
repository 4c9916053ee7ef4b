"""The summary of a py-spy profile (`bench serve --profile`): samples put in categories, innermost frame first."""

from __future__ import annotations

from pathlib import Path

import pytest

from tl_models.bench.profile import OTHER, category, summarize

RUN = "run (onnxruntime/capi/onnxruntime_inference_collection.py:266)"
HANDLER = "classify (service.py:125)"
METRICS = "inc (prometheus_client/metrics.py:313)"


def test_the_innermost_known_frame_names_the_category():
    assert category(["<module> (bentoml_cli.py:1)", HANDLER, "_run_backbone (tl_models/bento/engine.py:190)", RUN]) \
        == "ONNX Runtime"  # fmt: skip
    assert category([HANDLER, "_observed (tl_models/bento/engine.py:240)", METRICS]) == "Prometheus metrics"
    assert category(["resize (PIL/Image.py:2200)"]) == "image decode + resize"
    assert category(["helper (somewhere/else.py:3)"]) == OTHER


def test_summarize_folds_stacks_into_shares_and_top_functions(tmp_path: Path):
    raw = tmp_path / "profile.txt"
    raw.write_text(
        f'process 12:"bentoml serve";thread 0x1;{HANDLER};{RUN} 60\n'
        f'process 12:"bentoml serve";{HANDLER};{METRICS} 30\n'
        f"{HANDLER} 10\n"
        "a truncated line without a count\n"
    )
    summary = summarize(raw)
    assert summary["samples"] == 100
    assert summary["categories"] == pytest.approx({"ONNX Runtime": 0.6, "Prometheus metrics": 0.3, OTHER: 0.1})
    assert summary["top"][0] == [RUN, 0.6] and summary["raw"] == str(raw)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert summarize(empty) == {"samples": 0, "categories": {}, "top": [], "raw": str(empty)}
