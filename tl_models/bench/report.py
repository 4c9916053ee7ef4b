"""What every benchmark shares: timing images/s, a two-column table, JSON figures and the serving plot."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from ..core.files import atomic_write_json


def images_per_second(run, batch: int, seconds: float) -> tuple[float, float]:
    """(images/s, ms per call) of ``run()`` over at least ``seconds`` and 3 calls, after 2 warm-up calls."""
    return side_by_side_images_per_second([run], batch, seconds)


def side_by_side_images_per_second(runs: list, batch: int, seconds: float) -> tuple[float, float]:
    """(images/s, ms per call) of the ``runs`` called back to back, each in a thread of its own, all at once, over
    at least ``seconds`` and 3 calls each (after 2 warm-up calls each)."""
    for run in runs:
        for _ in range(2):
            run()
    calls = [0] * len(runs)
    start = time.perf_counter()
    deadline = start + seconds

    def loop(index: int) -> None:
        while calls[index] < 3 or time.perf_counter() < deadline:
            runs[index]()
            calls[index] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return sum(calls) * batch / elapsed, 1000.0 * elapsed * len(runs) / sum(calls)


def format_table(title: str, rows: list[tuple[str, str]]) -> str:
    """A title line and two aligned columns."""
    width = max(len(label) for label, _ in rows)
    return "\n".join([title] + [f"  {label:<{width}}  {value:>10}" for label, value in rows])


def write_json(path: str | Path | None, figures: dict) -> None:
    """Write ``figures`` to ``path`` atomically (nothing when ``path`` is None) and say where."""
    if path is not None:
        atomic_write_json(path, figures)
        print(f"figures written to {path}")


def plot_serving(figures: dict, path: str | Path) -> None:
    """`bench serve`: throughput and p99 latency vs client concurrency, one line per server stack (the median of
    the rounds), with the raw ONNX Runtime best (in process) as a dashed line and its best decoding each image first
    as a dotted one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, p99_ax) = plt.subplots(1, 2, figsize=(10, 4))
    stacks = list(dict.fromkeys(row["stack"] for row in figures["servers"]))
    for stack in stacks:
        rows = [r for r in figures["servers"] if r["stack"] == stack]
        level = sorted({r["concurrency"] for r in rows})
        at = [[r for r in rows if r["concurrency"] == clients] for clients in level]  # one row per round
        rate_ax.plot(level, [np.median([r["throughput"] for r in point]) for point in at], marker="o", label=stack)
        p99 = [np.median([np.nan if r["p99_ms"] is None else r["p99_ms"] for r in point]) for point in at]
        p99_ax.plot(level, p99, marker="o", label=stack)
    if "ort_best" in figures:
        best = figures["ort_best"]
        rate_ax.axhline(
            best["throughput"], color="grey", linestyle="--", label=f"ONNX Runtime in process, batch {best['batch']}"
        )
    if "ort_decode_best" in figures:
        rate_ax.axhline(
            figures["ort_decode_best"]["throughput"], color="grey", linestyle=":", label="the same, decoding each image"
        )
    for ax, label in ((rate_ax, "requests/s (1 image each)"), (p99_ax, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("client concurrency")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    rate_ax.set_ylim(bottom=0)
    fig.suptitle(f"{figures['backbone']}: serving on {figures['cpu_count']} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
