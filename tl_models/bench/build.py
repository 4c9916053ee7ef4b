"""`tl-models bench build`: whole builds of N synthetic images, timed as processes, against the raw backbone.

N synthetic 256 px JPEGs (10 classes: a colour, a shape and noise each) are written once into ``--work``; each
stack then runs ``tl-models build`` on them as a child process with its own feature cache, and the figures are its
wall-clock images/s (scan, extraction, head, export, parity: everything) and the peak resident memory of its whole
process tree (sampled every 50 ms). In the same run, ONNX Runtime's raw throughput on the same ``backbone.onnx`` at
the extraction batch size is the ceiling the build is compared with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..core.errors import BadRequest
from ..core.names import BACKBONE_ONNX, IMAGE
from .report import format_table, images_per_second, write_json

# stack -> (--engine, --device) of `tl-models build`
STACKS = {"torch-cpu": ("torch", "cpu"), "ort-cpu": ("onnxruntime", "cpu"), "cuda": ("torch", "cuda")}
CLASSES = 10
SIZE = 256


def _synthetic(index: int) -> tuple[int, bytes]:
    """(class, JPEG bytes) of image ``index``: class colour background, a class shape at a random place, noise."""
    import io

    rng = np.random.default_rng(index)
    label = index % CLASSES
    hue = np.array([(37 * label) % 256, (91 * label + 60) % 256, (151 * label + 120) % 256], dtype=np.float32)
    pixels = np.clip(hue + rng.normal(0, 25, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    x, y = rng.integers(20, SIZE - 120, 2)
    box = (int(x), int(y), int(x) + 100, int(y) + 100)
    (draw.ellipse if label % 2 else draw.rectangle)(box, fill=tuple(int(255 - c) for c in hue))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return label, buffer.getvalue()


def synthetic_images(root: Path, count: int) -> Path:
    """An ImageFolder of ``count`` synthetic JPEGs under ``root/<count>`` (written once, reused after)."""
    folder = root / f"images-{count}"
    done = folder / ".complete"
    if done.is_file():
        return folder

    def write(index: int) -> None:
        label, data = _synthetic(index)
        path = folder / f"c{label}" / f"{index:07d}.jpg"
        path.write_bytes(data)

    for label in range(CLASSES):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(write, range(count), chunksize=256))
    done.write_text(str(count))
    return folder


@dataclass
class Run:
    """A child process's wall-clock seconds, peak tree RSS (bytes), exit code and output."""

    seconds: float
    peak_rss: int
    code: int
    output: str


def run_measured(command: list[str], env: dict | None = None, interval: float = 0.05) -> Run:
    """Run ``command``; sample the resident memory of it and all its descendants every ``interval`` seconds."""
    import psutil

    from ..core.process import tree_rss

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = 0
    assert process.stdout is not None  # stdout=PIPE
    with ThreadPoolExecutor(1) as reader:
        output = reader.submit(process.stdout.read)
        while process.poll() is None:
            with suppress(psutil.NoSuchProcess):
                peak = max(peak, tree_rss(process.pid))
            time.sleep(interval)
        text = output.result()
    return Run(time.perf_counter() - start, peak, process.returncode, text)


def raw_backbone_rate(model: Path, batch: int, seconds: float) -> float:
    """ONNX Runtime images/s on ``model`` at ``batch`` (random uint8 images), in this process."""
    from ..core.runtime import create_session

    session = create_session(model, "cpu", name="bench raw backbone")
    size = session.get_inputs()[0].shape[1:]
    pixels = np.random.default_rng(0).integers(0, 256, (batch, *size), dtype=np.uint8)
    return images_per_second(lambda: session.run(None, {IMAGE: pixels}), batch, seconds)[0]


def bench_build(
    images: int = 8000,
    stacks: tuple[str, ...] = ("torch-cpu", "ort-cpu"),
    work: Path | None = None,
    backbone: str = "mobilenet_v2",
    weights: str = "IMAGENET1K_V1",
    epochs: int = 10,
    seconds: float = 10.0,
    json_path: str | Path | None = None,
) -> dict:
    """Build ``images`` synthetic images once per stack; images/s and peak RSS per stack against raw ONNX Runtime
    on the same backbone graph. Stacks that need what this machine lacks (``cuda`` without a GPU) are skipped."""
    from ..core.runtime import gpu_count

    if images < 4 * CLASSES:
        raise BadRequest(f"--images must be at least {4 * CLASSES} (the bench has {CLASSES} classes)")
    unknown = [s for s in stacks if s not in STACKS]
    if unknown:
        raise BadRequest(f"unknown stack(s) {unknown}; use {', '.join(STACKS)}")
    work = Path(work or Path.home() / ".cache" / "tl-models" / "bench-build")
    started = time.perf_counter()
    data = synthetic_images(work, images)
    figures: dict = {
        "benchmark": "build",
        "images": images,
        "backbone": backbone,
        "weights": weights,
        "epochs": epochs,
        "cpu_count": os.cpu_count(),
        "generate_s": time.perf_counter() - started,
        "rows": [],
        "skipped": [],
    }
    raw_model = None
    for stack in stacks:
        engine, device = STACKS[stack]
        if device == "cuda" and gpu_count() == 0:
            figures["skipped"].append({"stack": stack, "why": "no CUDA device"})
            continue
        out, cache = work / f"out-{stack}-{images}", work / f"cache-{stack}-{images}"
        for folder in (out, cache):
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        command = [
            sys.executable,
            "-m",
            "tl_models.cli",
            "build",
            "--data",
            str(data),
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            "--backbone",
            backbone,
            "--weights",
            weights,
            "--epochs",
            str(epochs),
            "--engine",
            engine,
            "--device",
            device,
        ]
        run = run_measured(command, env={**os.environ, "TQDM_DISABLE": "1"})
        if run.code != 0:
            raise RuntimeError(f"bench build {stack}: the build failed (exit {run.code}):\n{run.output[-2000:]}")
        manifest = json.loads((out / "manifest.json").read_text())
        figures["rows"].append(
            {
                "stack": stack,
                "engine": engine,
                "device": device,
                "seconds": run.seconds,
                "images_per_s": images / run.seconds,
                "peak_rss_bytes": run.peak_rss,
                "val_accuracy": manifest["heads"][-1]["metrics"]["val_accuracy"],
            }
        )
        raw_model = raw_model or out / BACKBONE_ONNX
    if raw_model is not None:
        figures["raw_ort_batch32_images_per_s"] = raw_backbone_rate(raw_model, 32, seconds)
        for row in figures["rows"]:
            row["over_raw_ort"] = row["images_per_s"] / figures["raw_ort_batch32_images_per_s"]
    rows = [
        (
            f"{r['stack']}: {r['seconds']:.1f} s, {r['images_per_s']:.1f} img/s, peak RSS "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, val {r['val_accuracy']:.3f}",
            f"{r['over_raw_ort']:.2f}x",
        )
        for r in figures["rows"]
    ]
    if raw_model is not None:
        rows.append(("raw ONNX Runtime, batch 32 (ceiling)", f"{figures['raw_ort_batch32_images_per_s']:.1f}/s"))
    rows += [(f"{s['stack']}: skipped ({s['why']})", "-") for s in figures["skipped"]]
    print(
        format_table(
            f"bench build: {images} images, {backbone}, whole `tl-models build` / raw ONNX Runtime, "
            f"{figures['cpu_count']} CPUs",
            rows,
        )
    )
    write_json(json_path, figures)
    return figures
