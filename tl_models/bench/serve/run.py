"""`tl-models bench serve` end to end: every part in order, the figures printed, written and plotted."""

from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ...core.manifest import BuildDir
from ..report import write_json
from .builds import default_build, first_head, int8_backbone, sample_images
from .ceiling import in_process
from .heads import check_heads_data, heads_cost
from .judging import judging_cost
from .loopback import serve_points
from .options import ServeBenchOptions
from .variants import variant_cost
from .verdict import add_ratios, format_figures, targets


def bench_serve(options: ServeBenchOptions) -> dict:
    """Run every selected stack on one build (see the module docstring); returns the figures (also printed,
    written as JSON and plotted when asked). Servers started here are stopped before it returns."""
    options.check()
    with ExitStack() as cleanup:
        if options.workdir is None:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="tl-models-bench-serve-")))
        else:
            workdir = Path(options.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        data = options.data
        if data is None:
            from ...training.data import write_demo_dataset

            data = write_demo_dataset(workdir / "data", per_class=20)
        build_dir = Path(options.build_dir) if options.build_dir else default_build(options, data, workdir)
        manifest = BuildDir(build_dir).manifest()
        precisions = ("fp32", "int8") if options.int8 else ("fp32",)
        if options.int8:
            int8_backbone(build_dir, own=options.build_dir is None, progress=options.progress)
        images = sample_images(data)
        if options.heads or options.variant:
            check_heads_data(manifest, data)  # before minutes of measurements, not after
        started: list[dict] = []
        figures: dict = {
            "benchmark": "serve",
            "build": str(build_dir),
            "backbone": manifest.backbone,
            "weights": manifest.weights,
            "head": first_head(manifest).name,
            "cpu_count": os.cpu_count(),
            "seconds": options.seconds,
            "max_requests": options.max_requests,
            "images": {"count": len(images), "mean_bytes": float(np.mean([len(i) for i in images]))},
            "heads_count": options.heads,
            "processes": options.processes,
            "servers_started": started,
        }
        figures["in_process"], figures["servers"] = [], []
        for index in range(options.rounds):
            if options.rounds > 1:
                options.progress(f"[bench serve] round {index + 1} of {options.rounds}")
            figures["in_process"] += [
                {**row, "round": index}
                for row in in_process(
                    build_dir, options.batches, options.seconds, options.stacks, options.progress, precisions, images
                )
            ]
            profile = options.profile and index == 0
            figures["servers"] += [
                {**row, "round": index}
                for row in serve_points(options, build_dir, workdir, images, started, precisions, profile)
            ]
        if options.heads:
            figures["heads_cost"] = heads_cost(build_dir, data, options.heads, images, options, workdir, started)
        if options.judging:
            figures["judging_cost"] = judging_cost(build_dir, images, options, workdir, started)
        if options.variant:
            figures["variant_cost"] = variant_cost(build_dir, data, options.variant, images, options, workdir, started)
        add_ratios(figures)
        figures["targets"] = targets(figures)
    print(format_figures(figures))
    write_json(options.json_path, figures)
    if options.plot_path is not None:
        from ..report import plot_serving

        plot_serving(figures, options.plot_path)
        print(f"plot written to {options.plot_path}")
    return figures
