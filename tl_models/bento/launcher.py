"""Start a real ``bentoml serve service:Classifier`` process on a build and stop it by its PID.

Used by `tl-models bento serve` (in the foreground), by the benchmarks and by the tests. The service reads its
settings from ``TL_MODELS_*`` environment variables (see service.py); :func:`service_environment` sets them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..core.errors import UserError
from ..core.process import ServerProcess, free_port, wait_ready

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[2]  # the source checkout: service.py, bentofile.yaml


class BentoServerError(UserError):
    """The BentoML service could not be started or did not become ready."""


@dataclass
class BentoServer(ServerProcess):
    """A running ``bentoml serve``: its URL, PID and log; ``stop()`` ends it and its workers."""

    port: int
    what: ClassVar[str] = "bentoml serve"
    group: ClassVar[bool] = True  # the arbiter and its workers

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def service_environment(
    build_dir: str | Path | None = None,
    bento: str | None = None,
    workers: int | None = None,
    weights: str | None = None,
    state_dir: str | Path | None = None,
    precision: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """This process's environment plus the service's ``TL_MODELS_*`` settings (unset ones are left alone)."""
    settings = {
        "TL_MODELS_BUILD": build_dir and Path(build_dir).resolve(),
        "TL_MODELS_BENTO": bento,
        "TL_MODELS_WORKERS": workers,
        "TL_MODELS_WEIGHTS": weights,
        "TL_MODELS_STATE_DIR": state_dir and Path(state_dir).resolve(),
        "TL_MODELS_PRECISION": precision,
    }
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(extra or {})}
    env.update({name: str(value) for name, value in settings.items() if value is not None})
    return env


def serve_command(host: str, port: int) -> list[str]:
    """``python -m bentoml serve service:Classifier`` on ``host:port``, from this source checkout."""
    if not (PROJECT / "service.py").is_file():
        raise BentoServerError(f"service.py not found in {PROJECT}: run from a source checkout")
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service:Classifier",
        "--host",
        host,
        "--port",
        str(port),
        "--working-dir",
        str(PROJECT),
    ]


def start(
    env: dict[str, str], port: int | None = None, log_path: str | Path | None = None, timeout: float = 300.0
) -> BentoServer:
    """Start ``bentoml serve`` with ``env`` (see :func:`service_environment`) on 127.0.0.1; wait for ``/readyz``."""
    port = port or free_port()
    log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="tl-bento-")) / "serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            serve_command("127.0.0.1", port),
            cwd=PROJECT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = BentoServer(process, log_path, port)
    log.info("bentoml serve pid %d on %s, log %s", server.pid, server.url, log_path)
    try:
        wait_ready(process, f"{server.url}/readyz", timeout, "bentoml serve", log_path, BentoServerError)
        return server
    except BaseException:  # not ready, or interrupted while waiting: never leave the server behind
        server.stop()
        raise
