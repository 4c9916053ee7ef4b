"""In process, the ceiling: ONNX Runtime on the build's fused graph and PyTorch eager."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import numpy as np

from ...core.manifest import BuildDir
from ...core.preprocess import Preprocessing, preprocess_bytes
from ..report import side_by_side_images_per_second
from .builds import first_head
from .loopback import stack_label, stack_precision


def in_process(
    build_dir: Path,
    batches: tuple[int, ...],
    seconds: float,
    stacks: tuple[str, ...],
    progress: Callable[[str], None],
    precisions: tuple[str, ...] = ("fp32",),
    images: Sequence[bytes] = (),
) -> list[dict]:
    """Images/s and ms per batch of ONNX Runtime (the fused graph: backbone + head composed in memory, the nodes the
    servers run; once per precision) and PyTorch eager (backbone + head) per batch. ONNX Runtime twice: one session
    with ONNX Runtime's threads, and (on a machine with several cores) one single-threaded session per core side by
    side, as the BentoML service's lanes run: the best of both is the ceiling the servers are compared with. With
    ``images``, fp32 ONNX Runtime once more each way at batch 1 decoding each image first (rows with ``decode``):
    what a program of its own over ONNX Runtime does per encoded image, as the servers do."""
    import torch

    from ...core.names import BACKBONE_FILES, HEAD_ONNX
    from ...core.runtime import active_provider, available_cores, create_session
    from ...training.build_backbone import load_build_backbone
    from ...training.export import fuse
    from ...training.pipeline import load_head_module

    build = BuildDir(build_dir)
    manifest = build.manifest()
    head = first_head(manifest)
    size = tuple(manifest.input_size)
    cores = available_cores()
    runners: dict[tuple[str, int], list[Any]] = {}  # (stack, sessions) -> sessions, or the torch model
    for precision in precisions if "onnxruntime" in stacks else ():
        graph = fuse(build.file(BACKBONE_FILES[precision]), build.file(head.rel(HEAD_ONNX)), {})
        stack = stack_label("onnxruntime", precision)
        runners[(stack, 1)] = [create_session(graph)]
        if cores > 1:
            runners[(stack, cores)] = [create_session(graph, threads=1) for _ in range(cores)]
    if "torch" in stacks:
        model = torch.nn.Sequential(load_build_backbone(build, manifest).module, load_head_module(build, head)).eval()
        runners[("torch", 1)] = [model]
    spec = Preprocessing.from_dict(manifest.preprocessing)
    points = [(key, batch, False) for key in runners for batch in batches]
    if images:
        points += [(key, 1, True) for key in runners if key[0] == "onnxruntime"]
    rows = []
    for (stack, count), batch, decode in points:
        engines = runners[(stack, count)]
        way = f"{count} single-threaded sessions side by side, " if count > 1 else ""
        progress(f"[bench serve] {stack} in process: {way}{'decode + pass, ' if decode else ''}batch {batch}")
        if decode:
            # each session starts at its own image and takes them in turn
            calls = [
                partial(_decode_forward, engine, islice(cycle(images), i, None), spec)
                for i, engine in enumerate(engines)
            ]
        else:
            pixels = np.random.default_rng(batch).integers(0, 256, (batch, *size), dtype=np.uint8)
            calls = [partial(_forward, engine, pixels) for engine in engines]
        cpu, wall = time.process_time(), time.perf_counter()
        ips, ms = side_by_side_images_per_second(calls, batch, seconds)
        busy = (time.process_time() - cpu) / (time.perf_counter() - wall)  # cores kept busy
        rows.append(
            {
                "stack": stack,
                "precision": stack_precision(stack),
                "batch": batch,
                "sessions": count,
                "decode": decode,
                "throughput": ips,
                "ms_per_batch": ms,
                "cpu_ms_per_image": 1000.0 * busy / ips,
                "threads": torch.get_num_threads() if stack == "torch" else (1 if count > 1 else None),
                "provider": "torch eager" if stack == "torch" else active_provider(engines[0]),
            }
        )
    return rows


def _decode_forward(session: Any, images: Iterator[bytes], spec: Preprocessing) -> object:
    """Decode the next of ``images`` with the build's preprocessing, then one batch-1 pass."""
    return _forward(session, preprocess_bytes(next(images), spec)[None])


def _forward(engine: Any, pixels: np.ndarray) -> object:
    """One pass of an ONNX Runtime session or a torch module (PyTorch eager) over ``pixels``."""
    if hasattr(engine, "get_inputs"):
        return engine.run(None, {engine.get_inputs()[0].name: pixels})
    import torch

    with torch.inference_mode():
        return engine(torch.from_numpy(pixels))
