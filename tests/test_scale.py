"""Build at scale: streaming extraction into the sharded feature cache (bounded decoding, resume after SIGKILL,
damaged shards recomputed), the two engines, and listings (CSV, Parquet, fsspec URLs) as data."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tl_models.training.extract as extract
from tl_models.core.manifest import BuildDir
from tl_models.core.names import BACKBONE_ONNX, MANIFEST
from tl_models.training.backbones import load_backbone
from tl_models.training.data import DataError, load_data, load_listing, write_demo_dataset
from tl_models.training.export import export_backbone
from tl_models.training.extract import OrtEngine, TorchEngine, decoded_batches
from tl_models.training.features import FeatureCache
from tl_models.training.parity import Tolerance

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 real digits (60 per class) as an ImageFolder."""
    return write_demo_dataset(tmp_path_factory.mktemp("scale") / "digits", per_class=60)


@pytest.fixture(scope="module")
def backbone(offline_weights):
    return load_backbone("mobilenet_v2", "IMAGENET1K_V1")


@pytest.fixture(scope="module")
def onnx_backbone(backbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / BACKBONE_ONNX
    export_backbone(backbone.module, [3, 224, 224], path, {})
    return path


def _cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tl_models.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


# ---------------------------------------------------------------- decoding is bounded and in order


def test_decoding_runs_ahead_by_at_most_two_batches_per_worker(
    digits: Path, backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = load_data(digits)
    decoded, consumed, lock = [0], [0], threading.Lock()
    real = extract._decode_batch

    def counting(paths, preprocessing):
        out = real(paths, preprocessing)
        with lock:
            decoded[0] += 1
        return out

    monkeypatch.setattr(extract, "_decode_batch", counting)
    ahead, firsts = [], []
    for first, batch in decoded_batches(data.paths, backbone.preprocessing, [(0, 200), (300, 330)], 16, workers=2):
        consumed[0] += 1
        firsts.append((first, len(batch)))
        time.sleep(0.01)  # a slow backbone: decoding must wait for it, not pile up
        with lock:
            ahead.append(decoded[0] - consumed[0])
    assert firsts == [(s, min(16, 200 - s)) for s in range(0, 200, 16)] + [(300, 16), (316, 14)]
    assert max(ahead) <= 4, ahead  # 2 workers: at most 4 batches decoded and not yet taken
    assert decoded[0] == consumed[0] == len(firsts)


# ---------------------------------------------------------------- the sharded cache


def test_engines_agree_and_have_their_own_cache_entries(
    digits: Path, backbone, onnx_backbone: Path, tmp_path: Path
) -> None:
    data = load_data(digits).subset(range(0, 600, 6))
    cache = FeatureCache(tmp_path, shard_images=30)
    by_torch = cache.features(backbone, data, TorchEngine(backbone), progress=False)
    by_ort = cache.features(backbone, data, OrtEngine(onnx_backbone), progress=False)
    assert (by_torch.hit, by_ort.hit) == (False, False)  # another engine is another entry
    assert by_torch.shards == by_ort.shards == 4 and by_ort.embedded == 100
    assert by_ort.engine == {"engine": "onnxruntime", "device": "cpu", "precision": "fp32"}
    assert float(np.abs(by_torch.array).max()) > 1.0  # real embeddings, not zeros
    # the parity tolerance bounds the two engines' difference, as it bounds serving's
    np.testing.assert_allclose(by_ort.array, by_torch.array, atol=Tolerance().atol, rtol=Tolerance().rtol)
    again = cache.features(backbone, data, OrtEngine(onnx_backbone), progress=False)
    assert again.hit and again.embedded == 0 and np.array_equal(again.array, by_ort.array)


def test_side_by_side_sessions_give_the_one_session_embeddings_in_order(
    digits: Path, backbone, onnx_backbone: Path, tmp_path: Path
) -> None:
    data = load_data(digits).subset(range(0, 600, 4))  # 150 images
    one = OrtEngine(onnx_backbone)
    two = OrtEngine(onnx_backbone, sessions=2)
    assert (one.parallel, one.batch, two.parallel, two.batch) == (1, 32, 2, 16)
    calls: list[int] = []
    running, most, lock = [0], [0], threading.Lock()
    real = two.__call__

    class Watched:  # the engine as embed_stream sees it, counting how many batches run at once
        parallel, batch = two.parallel, two.batch

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
                calls.append(len(batch))
            try:
                time.sleep(0.02)
                return real(batch)
            finally:
                with lock:
                    running[0] -= 1

        def ident(self) -> dict:
            return two.ident()

    rows, embeddings = zip(*extract.embed_stream(Watched(), data.paths, backbone.preprocessing, [(0, 150)]))
    assert most[0] == 2 and max(calls) == 16 and sum(calls) == 150
    assert np.array_equal(np.concatenate(rows), np.arange(150))
    alone = FeatureCache(tmp_path / "one").features(backbone, data, one, progress=False).array
    # the same bytes whatever the sessions and batch size: both share one cache entry
    assert np.array_equal(np.concatenate(embeddings), alone)
    assert float(np.abs(alone).max()) > 1.0


def test_an_image_that_breaks_after_the_scan_is_named_and_committed_shards_are_kept(
    digits: Path, backbone, onnx_backbone: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "digits"
    subprocess.run(["cp", "-r", str(digits), str(folder)], check=True)
    data = load_data(folder).subset(range(0, 600, 5))  # 120 images, shards of 32
    broken = data.paths[70]  # in the third shard
    cache = FeatureCache(tmp_path / "cache", shard_images=32)
    Path(broken).write_bytes(b"not an image any more")
    with pytest.raises(DataError, match=f"image {re.escape(str(broken))} passed the scan but no longer reads"):
        cache.features(backbone, data, OrtEngine(onnx_backbone, sessions=2), progress=False)
    index = json.loads(next((tmp_path / "cache" / "features").glob("*/index.json")).read_text())
    assert [(s["start"], s["stop"]) for s in index["shards"]] == [(0, 32), (32, 64)]
    again = load_data(folder)
    assert broken not in again.paths and [p for p, _ in again.skipped] == [broken]


def test_a_damaged_or_missing_shard_is_found_by_its_sha256_and_recomputed(
    digits: Path, backbone, onnx_backbone: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = load_data(digits).subset(range(0, 600, 5))  # 120 images, 4 shards of 32 (the last one 24)
    cache = FeatureCache(tmp_path, shard_images=32)
    engine = OrtEngine(onnx_backbone)
    first = cache.features(backbone, data, engine, progress=False)
    entry = next((tmp_path / "features").glob("*/index.json")).parent
    index = json.loads((entry / "index.json").read_text())
    assert [(s["start"], s["stop"]) for s in index["shards"]] == [(0, 32), (32, 64), (64, 96), (96, 120)]
    shard = entry / index["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-8:] = b"\x00" * 8  # same size, other bytes
    shard.write_bytes(bytes(raw))
    (entry / index["shards"][3]["file"]).unlink()
    with caplog.at_level("WARNING", logger="tl_models.training.features"):
        second = cache.features(backbone, data, engine, progress=False)
    assert "sha256 mismatch" in caplog.text and "missing" in caplog.text
    assert (second.hit, second.embedded, second.shards_cached) == (False, 32 + 24, 2)
    assert np.array_equal(second.array, first.array)
    (entry / "index.json").write_text("{half a json")
    with caplog.at_level("WARNING", logger="tl_models.training.features"):
        third = cache.features(backbone, data, engine, progress=False)
    assert "not readable" in caplog.text and third.embedded == 120 and np.array_equal(third.array, first.array)


def test_a_build_killed_mid_extraction_resumes_and_ends_as_an_uninterrupted_one(
    digits: Path, offline_weights, tmp_path: Path
) -> None:
    """SIGKILL once shards are committed; the rerun embeds only what is missing (at most one shard's work is
    lost), and its manifest says what an uninterrupted build's says."""
    args = ["build", "--data", str(digits), "--weights", "IMAGENET1K_V1", "--epochs", "3", "--engine", "onnxruntime"]
    env = {"TL_MODELS_SHARD_IMAGES": "50", "TL_MODELS_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "tl_models.cli", *args, "--out", str(tmp_path / "killed")],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    committed = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        indexes = list((tmp_path / "cache" / "features").glob("*/index.json"))
        if indexes:
            try:
                committed = len(json.loads(indexes[0].read_text())["shards"])
            except ValueError:  # replaced atomically, but read between listing and opening: try again
                committed = 0
            if committed >= 3:
                process.send_signal(signal.SIGKILL)
                break
        time.sleep(0.005)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the build ended before it could be killed mid-extraction"
    assert 3 <= committed < 12
    assert not (tmp_path / "killed" / MANIFEST).exists()

    resumed = _cli(*args, "--out", str(tmp_path / "killed"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    line = resumed.stdout.splitlines()[0]
    index = json.loads(next((tmp_path / "cache" / "features").glob("*/index.json")).read_text())
    cached = int(line.split("resumed: ")[1].split(" of ")[0])
    embedded = int(line.split("shards cached, ")[1].split(" of ")[0])
    assert cached >= committed and embedded == 600 - 50 * cached, line
    assert 50 * committed + embedded <= 1.1 * 600 + 50  # at most one uncommitted shard of work lost
    assert len(index["shards"]) == 12

    whole = _cli(*args, "--out", str(tmp_path / "whole"), env={**env, "TL_MODELS_CACHE": str(tmp_path / "other")})
    assert whole.returncode == 0, whole.stderr
    assert "miss: 600 images embedded by onnxruntime on cpu, in process" in whole.stdout
    a, b = BuildDir(tmp_path / "killed").verify(), BuildDir(tmp_path / "whole").verify()
    for field in ("metrics", "train", "spec", "parity"):
        assert getattr(a.heads[0], field) == getattr(b.heads[0], field), field
    assert {k: v for k, v in a.heads[0].data.items() if k != "root"} == {
        k: v for k, v in b.heads[0].data.items() if k != "root"
    }
    assert a.files["heads/default/1/head.pt"] == b.files["heads/default/1/head.pt"]
    assert a.files[BACKBONE_ONNX] == b.files[BACKBONE_ONNX]


# ---------------------------------------------------------------- listings


def _listing(path: Path, rows: list[dict], columns: tuple[str, ...] = ("path", "label", "split")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows([{c: r.get(c, "") for c in columns} for r in rows])
    return path


def _rows(digits: Path, classes=("3", "8"), per_class: int = 10) -> list[dict]:
    rows = []
    for label in classes:
        for i, image in enumerate(sorted((digits / label).iterdir())[:per_class]):
            rows.append(
                {
                    "path": str(image.relative_to(digits.parent)),
                    "label": f"digit-{label}",
                    "split": "val" if i % 4 == 0 else "train",
                }
            )
    return rows


def test_a_csv_listing_with_a_split_column_builds_on_that_split(digits: Path, quick_build, tmp_path: Path) -> None:
    rows = _rows(digits)
    listing = _listing(digits.parent / "listing.csv", rows)
    report = quick_build(listing, tmp_path / "out")
    assert report.manifest.labels == ["digit-3", "digit-8"]
    record = report.head.data
    assert (record["train"], record["val"], record["split"]) == (14, 6, "listing")
    assert record["root"] == str(listing)
    random_split = _listing(
        tmp_path / "nosplit.csv", [{**r, "path": str(digits.parent / r["path"])} for r in rows], ("path", "label")
    )
    data = load_data(random_split)
    assert data.splits is None and data.classes == ["digit-3", "digit-8"] and len(data.paths) == 20


def test_parquet_listings_and_fsspec_urls_read_the_same_images(digits: Path, tmp_path: Path) -> None:
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(digits, per_class=4)
    by_csv = load_listing(_listing(digits.parent / "small.csv", rows))
    memory = fsspec.filesystem("memory")
    urls: list[str] = []
    for row in rows:  # the same bytes behind file:// and memory:// URLs
        source = digits.parent / row["path"]
        url = f"memory://scale-test/{row['path']}"
        memory.pipe(url, source.read_bytes())
        urls.append(url if len(urls) % 2 else source.as_uri())
    table = pa.table({"path": urls, "label": [r["label"] for r in rows], "split": [r["split"] for r in rows]})
    pq.write_table(table, tmp_path / "listing.parquet")
    by_parquet = load_data(tmp_path / "listing.parquet")
    assert by_parquet.classes == by_csv.classes and by_parquet.targets == by_csv.targets
    assert by_parquet.splits == by_csv.splits
    assert by_parquet.file_hashes() == by_csv.file_hashes()
    assert isinstance(by_parquet.paths[1], str) and by_parquet.paths[1].startswith("memory://")


def test_bad_listing_rows_are_skipped_with_their_reasons(digits: Path, tmp_path: Path) -> None:
    rows = _rows(digits, per_class=4)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = [
        {"path": "nowhere/0000.png", "label": "digit-3", "split": "train"},
        {"path": str(tmp_path / "broken.png"), "label": "digit-8", "split": "train"},
        {"path": str(digits.parent / rows[0]["path"]), "label": "", "split": "train"},
        {"path": "", "label": "digit-3", "split": "val"},
        {"path": str(digits.parent / rows[1]["path"]), "label": "digit-3", "split": "test"},
    ]
    listing = _listing(digits.parent / "with-bad.csv", rows + bad)
    data = load_listing(listing)
    assert len(data.paths) == len(rows) and len(data.skipped) == len(bad)
    reasons = " | ".join(reason for _, reason in data.skipped)
    for expected in ("No such file", "not an image", "empty label", "empty path", "neither train nor val"):
        assert expected in reasons, reasons


@pytest.mark.parametrize(
    "content, message",
    [
        ("file,class\na.png,x\n", "has no 'path' or 'label' column (columns: class, file)"),
        ("path,klass\na.png,x\n", "has no 'label' column"),
        ("", "has no 'path' or 'label' column (columns: none)"),
    ],
)
def test_a_listing_without_its_columns_is_one_line_and_writes_nothing(
    tmp_path: Path, content: str, message: str
) -> None:
    listing = tmp_path / "listing.csv"
    listing.write_text(content)
    result = _cli("build", "--data", str(listing), "--out", str(tmp_path / "out"), "--weights", "none")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="needs path,label"):
        load_listing(listing)


# ---------------------------------------------------------------- devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_one_line_error(demo_data: Path, tmp_path: Path) -> None:
    result = _cli(
        "build", "--data", str(demo_data), "--out", str(tmp_path / "out"), "--weights", "none", "--device", "cuda"
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: --device cuda: torch sees no CUDA device"), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_matches_the_cpu(digits: Path, backbone, onnx_backbone: Path, tmp_path: Path) -> None:
    data = load_data(digits).subset(range(0, 600, 10))
    cache = FeatureCache(tmp_path, shard_images=32)
    on_cpu = cache.features(backbone, data, OrtEngine(onnx_backbone), progress=False).array
    on_cuda = cache.features(backbone, data, TorchEngine(backbone, "cuda"), progress=False)
    assert on_cuda.engine["device"] == "cuda"
    np.testing.assert_allclose(on_cuda.array, on_cpu, atol=1e-3, rtol=1e-3)
