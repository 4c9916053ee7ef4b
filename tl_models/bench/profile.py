"""Where a server's CPU goes under load: py-spy samples its process tree while `bench serve --profile` drives it.

py-spy (``pip install py-spy``; in the dev extra) records the Python stacks of every process of the tree at a
fixed rate, idle threads left out, so the samples are CPU time. Each sample is put in the first category that
one of its frames matches, innermost frame first: a Prometheus call made from the request handler counts as
metrics, ONNX Runtime's ``run`` as ONNX Runtime. The raw profile (folded stacks: ``frame;frame;... count``) is
kept beside the figures for flame graph tools (speedscope, ``flamegraph.pl``); the summary goes into the figures.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# (category, substrings of a frame "function (file:line)"), matched innermost frame first; the first match wins
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ONNX Runtime", ("onnxruntime",)),
    ("image decode + resize", ("PIL/", "core/preprocess.py")),
    ("multipart / body parsing", ("multipart", "formparsers", "python_multipart", "_bentoml_sdk/io_models")),
    ("Prometheus metrics", ("prometheus_client",)),
    ("judging + recorder", ("bento/judge.py", "core/feedback.py", "core/embedding_log.py", "core/drift.py")),
    ("routing + heads", ("core/routing.py", "bento/registry.py", "core/heads.py")),
    ("batcher", ("bento/batching.py",)),
    ("JSON", ("json/",)),
    ("HTTP server + framework", ("uvicorn", "h11", "httptools", "starlette", "anyio", "bentoml", "_bentoml")),
    ("Triton python backend", ("triton_python_backend_utils", "triton/models/")),
    ("asyncio + threads", ("asyncio/", "threading.py", "concurrent/", "queue.py", "selectors.py")),
)
OTHER = "other"


def available() -> str | None:
    """The py-spy executable (beside this Python's, else on PATH), or None when it is not installed."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """Start sampling ``pid`` and its children for ``seconds`` into ``out`` (folded stacks); wait on the result."""
    duration = str(max(1, round(seconds)))
    command = [available() or "py-spy", "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate"]
    command += ["200", "--duration", duration, "--format", "raw", "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def category(frames: list[str]) -> str:
    """The category of one sample's frames (root first)."""
    for frame in reversed(frames):
        for name, patterns in CATEGORIES:
            if any(p in frame for p in patterns):
                return name
    return OTHER


def summarize(raw: Path, top: int = 12) -> dict:
    """Samples, the share of each category and the functions with the most samples of their own (innermost)."""
    categories: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        categories[category(frames)] += int(count)
        leaves[frames[-1]] += int(count)
    total = sum(categories.values())
    return {
        "samples": total,
        "categories": {name: n / total for name, n in categories.most_common()} if total else {},
        "top": [[frame, n / total] for frame, n in leaves.most_common(top)] if total else [],
        "raw": str(raw),
    }


def finish(process: subprocess.Popen, raw: Path, timeout: float) -> dict:
    """Wait for a :func:`record` run; its :func:`summarize`, or ``{"error": ...}`` when py-spy could not sample."""
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    if process.returncode != 0 or not raw.is_file():
        message = err.decode(errors="replace").strip().splitlines()
        return {"error": message[-1] if message else f"py-spy exited with {process.returncode}"}
    return summarize(raw)
