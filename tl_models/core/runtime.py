"""ONNX Runtime sessions: the one factory for every session in the project.

Provider order is TensorRT > CUDA > CPU where a GPU is visible, overridable with ``providers=`` or
``TL_MODELS_PROVIDERS`` (comma list of ``tensorrt``, ``cuda``, ``cpu``). The providers a session actually
got are logged, and a fallback from a requested GPU provider to CPU is a warning, never silent.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnxruntime as ort

from .errors import BadRequest

log = logging.getLogger(__name__)

ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# Most images per ONNX Runtime run of a served backbone on the CPU, where a larger run costs more per image (2-core AMX
# Xeon, mobilenet_v2: one session, 7.9-8.5 CPU-ms per image in runs of 32, 6.7-7.0 in runs of 2; two single-threaded
# sessions side by side: 6.2 at 1, 6.5 at 2, 7.0 at 4, 8.1 at 16). Two rather than one: about the same cost per image
# here, and half as many runs, each with a fixed cost of its own. A GPU takes the whole batch.
CPU_RUN_ROWS = 2


@functools.cache
def gpu_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver or GPU); no torch needed."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except OSError:
        return 0


def _tensorrt_loadable() -> bool:
    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def resolve_providers(requested: str | list[str] | None = None) -> list[str]:
    """Providers to ask for, best first: explicit request, else TL_MODELS_PROVIDERS, else what this machine has."""
    requested = requested if requested is not None else os.environ.get("TL_MODELS_PROVIDERS")
    if requested:
        names = requested.split(",") if isinstance(requested, str) else list(requested)
        providers = []
        for name in (n.strip() for n in names if n.strip()):
            provider = ALIASES.get(name.lower(), name)
            if provider not in ALIASES.values():
                raise BadRequest(f"unknown execution provider {name!r}; use tensorrt, cuda or cpu")
            providers.append(provider)
        return providers if "CPUExecutionProvider" in providers else providers + ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    providers = []
    if gpu_count() > 0:
        if "TensorrtExecutionProvider" in available and _tensorrt_loadable():
            providers.append("TensorrtExecutionProvider")
        if "CUDAExecutionProvider" in available:
            providers.append("CUDAExecutionProvider")
    return providers + ["CPUExecutionProvider"]


def available_cores() -> int:
    """The CPUs this process may run on (its affinity: a container's or ``taskset``'s limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def create_session(
    model: str | Path | bytes,
    providers: str | list[str] | None = None,
    threads: int | None = None,
    name: str | None = None,
    spin: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession with full graph optimisation; logs the providers it really got.

    ``spin=True`` lets the intra-op threads busy-wait for work during a run and stops them when the run ends
    (``session.force_spinning_stop``): ONNX Runtime's default spins on after the run, which a server pays
    for between requests (2-core AMX Xeon, mobilenet_v2 batch 1 with 2 ms between passes: 3.8 ms a pass either
    way, 7.5 instead of 9.6-10.3 CPU-ms; back to back the same). ``spin=False`` stops the busy-waiting: a server's
    sessions share the CPU with its HTTP/gRPC handling and with each other, where a spinning thread only takes a
    core from the one working.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads if threads is not None else int(os.environ.get("TL_MODELS_THREADS", "0"))
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    wanted = resolve_providers(providers)
    label = name or (Path(model).name if not isinstance(model, bytes) else "<bytes>")
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, sess_options=options, providers=wanted)
    got = session.get_providers()
    if wanted[0] in GPU_PROVIDERS and got[0] not in GPU_PROVIDERS:
        log.warning("ONNX Runtime session %s: asked for %s, fell back to %s", label, wanted, got)
    else:
        log.info("ONNX Runtime session %s: providers %s", label, got)
    return session


def lane_sessions(
    model: str | Path | bytes,
    lanes: int,
    threads: int | None,
    providers: str | list[str] | None = None,
    spin: bool = True,
    name: str | None = None,
    shared: bool = False,
) -> tuple[list[ort.InferenceSession], ort.InferenceSession | None]:
    """A backbone's sessions for serving on the CPU: ``lanes`` sessions that run passes side by side, each with an
    equal share of ``threads`` (None: this process's cores; not spinning: they share the cores), and a solo session
    with all ``threads`` (None: ONNX Runtime's default, which pins its threads to the cores), spinning when
    ``spin``, for a pass that runs alone (None where a lane has every thread already). One lane: that one session,
    ``threads`` and ``spin`` its own. ``shared`` (a worker among several on the machine): the lanes keep to
    ``threads``, the worker's share, and the solo session takes every core (ONNX Runtime's default): a lone request
    still gets the whole machine.

    Side by side, single-threaded sessions give the most images per second; one session with every core gives a
    lone image the shortest pass (2-core AMX Xeon, mobilenet_v2 batch 1: two single-threaded sessions 382.7 img/s
    against one session's 325.6; a lone pass 3.1 ms on two threads, 5.7 ms on one)."""
    solo_threads = None if shared else threads
    solo_cores = available_cores() if shared else threads or available_cores()
    if lanes <= 1 and not shared:
        return [create_session(model, providers, threads, name, spin)], None
    per_lane = max(1, (threads or available_cores()) // lanes)
    sessions = [create_session(model, providers, per_lane, name, spin=False) for _ in range(lanes)]
    return sessions, create_session(model, providers, solo_threads, name, spin) if solo_cores > per_lane else None


class CoreLock:
    """The machine's cores between the backbone passes of every serving process on it (BentoML workers, Triton
    router instances, a fleet's replicas): lanes' passes run side by side, each holding the lock shared; a solo
    pass (one session with every core, for a lone request) runs only on an idle machine and alone, holding it
    exclusive. A lane that would start during a solo pass waits for it (one batch-1 pass) instead of slowing it: a
    multi-threaded pass whose threads lose a core to another pass waits on the slowest at every operator.

    One handle per thread that runs passes (an advisory ``flock`` is its open file's); the file is in the temporary
    directory (``path``: another), one per user, and the kernel lets go of a dead process's hold."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path or Path(tempfile.gettempdir()) / f"tl-models-cores-{os.getuid()}.lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def solo(self) -> bool:
        """Take the cores for one solo pass if no pass runs on the machine; never waits."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    @contextmanager
    def lane(self) -> Iterator[None]:
        """A lane's pass holds its share of the cores inside this block, entered once no solo pass runs."""
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        """The solo pass ended."""
        fcntl.flock(self._fd, fcntl.LOCK_UN)


def active_provider(session: ort.InferenceSession) -> str:
    """The provider that runs the session's nodes first (what a report should show)."""
    provider: str = session.get_providers()[0]
    return provider
