"""What `tl-models bench serve` takes (:class:`ServeBenchOptions`), its stacks and targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ...core.errors import UserError
from ...core.manifest import BuildDir
from .. import profile as profiler

IN_PROCESS = ("onnxruntime", "torch")
SERVERS = ("bentoml-http", "bentoml-body", "triton-http", "triton-grpc")  # bentoml-body: POST /classify/body
STACKS = IN_PROCESS + SERVERS
TARGETS = {  # the serving overhead issue's: throughput and overhead against raw ONNX Runtime, CPU above it
    "throughput_ratio": 0.75,
    "overhead_ms": 4.0,
    "cpu_over_ort_ms": 3.0,
    "heads_memory": 1.10,
    "swap_s": 1.0,
    "recording_ratio": 0.97,
    "judging_ratio": 0.95,
}
JUDGING_LOG_SHARE = 0.1
MODES = ("off", "on", "judged")  # of the judging part: recorder off, on (default), shadow head + log


class BenchServeError(UserError):
    """A setting that cannot be benchmarked (bad option, build unusable for the heads part)."""


@dataclass
class ServeBenchOptions:
    """What `tl-models bench serve` takes; :meth:`check` rejects bad values with a clear message."""

    build_dir: Path | None = None
    backbone: str = "mobilenet_v2"
    weights: str = "IMAGENET1K_V1"
    data: Path | None = None
    stacks: tuple[str, ...] = STACKS
    batches: tuple[int, ...] = (1, 8, 32)
    concurrency: tuple[int, ...] = (1, 8, 32)
    seconds: float = 5.0
    max_requests: int = 5000
    heads: int = 10
    bento_url: str | None = None
    triton_http_url: str | None = None
    triton_grpc_url: str | None = None
    triton_model: str | None = None
    workdir: Path | None = None
    start_timeout: float = 600.0
    json_path: Path | None = None
    plot_path: Path | None = None
    int8: bool = False
    judging: bool = False
    variant: int = 0  # fine-tune this many last stages into a head on the build's trunk and measure it; 0: skip
    profile: bool = False  # py-spy samples each server started here at the top concurrency (first round)
    rounds: int = 1  # in-process and server points measured this many times in turn; targets on the median
    processes: int | None = None  # BentoML workers and Triton router instances of the servers started here
    progress: Callable[[str], None] = field(default=lambda line: print(line, flush=True), repr=False)

    def check(self) -> ServeBenchOptions:
        unknown = [s for s in self.stacks if s not in STACKS]
        if unknown or not self.stacks:
            raise BenchServeError(f"unknown stack(s) {unknown or '(none given)'}; choose from {', '.join(STACKS)}")
        for what, values in (("batch", self.batches), ("concurrency", self.concurrency)):
            if not values or min(values) < 1:
                raise BenchServeError(f"every {what} must be at least 1, got {list(values)}")
        if self.seconds <= 0 or self.max_requests < 1:
            raise BenchServeError(f"seconds must be > 0 and max requests >= 1, got {self.seconds}, {self.max_requests}")
        if self.rounds < 1 or (self.processes is not None and self.processes < 1):
            raise BenchServeError(f"rounds and processes must be at least 1, got {self.rounds}, {self.processes}")
        if self.variant < 0:
            raise BenchServeError(f"variant takes a number of stages to fine-tune (0: skip), got {self.variant}")
        if self.heads == 1 or self.heads < 0:
            raise BenchServeError(f"heads must be 0 (skip the heads part) or at least 2, got {self.heads}")
        if self.build_dir is not None and not BuildDir(self.build_dir).exists():
            raise BenchServeError(f"{self.build_dir} is not a build directory (no manifest.json)")
        if self.profile and profiler.available() is None:
            raise BenchServeError("--profile samples the servers with py-spy: pip install py-spy")
        return self
