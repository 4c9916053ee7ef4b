"""Start a real ``tritonserver`` on a model repository: the one bundled in ``nvidia-pytriton`` or a given binary.

The bundled server (Triton 2.51, python backend only) is copied to a work dir with the python-backend stub of
the running Python X.Y; ``LD_LIBRARY_PATH`` gets pytriton's libraries and the Python LIBDIR (the stub needs
``libpython3.X.so``), ``PATH`` the running Python's ``bin`` and ``PYTHONPATH`` this project and its
site-packages, so a ``model.py`` imports numpy, onnxruntime and tl_models. Models load in explicit
model-control mode; :func:`start` returns once ``/v2/health/ready`` answers 200.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..core.errors import UserError
from ..core.process import ServerProcess, free_port, wait_ready

log = logging.getLogger(__name__)


class TritonServerError(UserError):
    """tritonserver could not be found, prepared or started, or did not become ready."""


def bundled_root() -> Path:
    """``pytriton/tritonserver`` of the installed nvidia-pytriton wheel (not imported: only located)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "nvidia-pytriton is not installed: `pip install nvidia-pytriton` "
            "(it bundles tritonserver), or pass --tritonserver PATH"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonServerError(f"no tritonserver binary under {root}")
    return root


def prepare_bundled(workdir: Path) -> Path:
    """Copy the bundled server to ``workdir/tritonserver`` with the stub for this Python; returns that dir."""
    source = bundled_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"nvidia-pytriton has no python-backend stub for Python {version} ({stub})")
    target = workdir / "tritonserver"
    if not (target / "backends" / "python" / stub.name).is_file():
        staging = Path(tempfile.mkdtemp(dir=workdir, prefix=".tritonserver-"))
        shutil.copytree(source, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("python_backend_stubs"))
        shutil.copy2(stub, staging / "backends" / "python" / stub.name)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


def server_environment(bundled: bool) -> dict[str, str]:
    """Environment for tritonserver and its python-backend stubs (see the module docstring)."""
    env = dict(os.environ)
    lib_dirs = [sysconfig.get_config_var("LIBDIR") or ""]
    if bundled:
        lib_dirs.insert(0, str(bundled_root().parent.parent / "nvidia_pytriton.libs"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in lib_dirs if d] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    project = Path(__file__).resolve().parents[2]  # the checkout holding tl_models
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    python_path = [str(project)] + list(dict.fromkeys(site)) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in python_path if p)
    return env


@dataclass
class TritonServer(ServerProcess):
    """A running tritonserver: its URLs, PID and log; ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    repo: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    workdir: Path
    exit_timeout: int = 10
    _own_workdir: bool = field(default=False, repr=False)
    what: ClassVar[str] = "tritonserver"

    @property
    def http_url(self) -> str:
        """host:port for ``tritonclient.http`` (prefix ``http://`` for curl)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the server by its PID; its python-backend stubs go with it. Returns the exit code.

        Triton drains for up to ``exit_timeout`` s (in-flight requests, open HTTP connections); past
        ``timeout`` (default: that + 20 s) the process group this launcher created is killed.
        """
        super().stop(self.exit_timeout + 20.0 if timeout is None else timeout)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode


def start(
    repo: str | Path,
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    tritonserver: str | Path | None = None,
    workdir: str | Path | None = None,
    load: tuple[str, ...] = ("*",),
    timeout: float = 180.0,
    exit_timeout: int = 10,
    extra_args: tuple[str, ...] = (),
) -> TritonServer:
    """Start tritonserver on ``repo`` (explicit model control, ``load`` models at start); wait until ready."""
    repo = Path(repo).resolve()
    if not repo.is_dir():
        raise TritonServerError(f"model repository {repo} does not exist: run `tl-models triton package` first")
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="tl-triton-")) if workdir is None else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    ports = [p or free_port() for p in (http_port, grpc_port, metrics_port)]
    if tritonserver is None:
        bundled = prepare_bundled(work)
        binary = bundled / "bin" / "tritonserver"
        backend_args = [f"--backend-directory={bundled / 'backends'}", f"--cache-directory={bundled / 'caches'}"]
    else:
        bundled, binary, backend_args = None, Path(tritonserver), []
        if not os.access(binary, os.X_OK):
            raise TritonServerError(f"{binary} is not an executable tritonserver")
    command = [
        str(binary),
        f"--model-repository={repo}",
        *backend_args,
        "--model-control-mode=explicit",
        *[f"--load-model={name}" for name in load],
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        f"--http-port={ports[0]}",
        f"--grpc-port={ports[1]}",
        f"--metrics-port={ports[2]}",
        "--exit-on-error=true",
        f"--exit-timeout-secs={exit_timeout}",
        *extra_args,
    ]
    log_path = work / "tritonserver.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=server_environment(bundled is not None),
            start_new_session=True,
        )
    server = TritonServer(
        process, log_path, repo, ports[0], ports[1], ports[2], workdir=work, exit_timeout=exit_timeout, _own_workdir=own
    )
    log.info("tritonserver pid %d on %s (HTTP %d, gRPC %d, metrics %d), log %s", server.pid, repo, *ports, log_path)
    try:
        wait_ready(
            process,
            f"http://127.0.0.1:{ports[0]}/v2/health/ready",
            timeout,
            "tritonserver",
            log_path,
            TritonServerError,
        )
        return server
    except BaseException:  # not ready, or interrupted while waiting: never leave the server behind
        server.stop()
        raise


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(repo: str | Path, announce=print, **kwargs) -> int:
    """Start (see :func:`start`), call ``announce(server)``, run until SIGINT/SIGTERM, stop the server.

    Returns 0 after a signal, else the exit code of a server that ended by itself.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server = start(repo, **kwargs)
        try:
            announce(server)
            while server.alive():
                time.sleep(0.5)
            return server.process.returncode or 1
        except KeyboardInterrupt:
            return 0
        finally:
            server.stop()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
