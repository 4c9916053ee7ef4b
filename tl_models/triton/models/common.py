"""What every python-backend model of ours shares: parsing its config once, error responses whose code comes from
the one table of :mod:`tl_models.core.errors`, and one ONNX graph of a version directory run by ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from onnxruntime import InferenceSession

from tl_models.core.cpu import check_int8_machine
from tl_models.core.errors import ModelFault, UserError, triton_code
from tl_models.core.heads import read_verified
from tl_models.core.names import VERSION_BACKBONE, VERSION_ONNX, VERSION_SHA256
from tl_models.core.runtime import create_session


def model_parameters(args: dict) -> tuple[dict, dict[str, str]]:
    """``(config, {parameter: string_value})`` from the ``args`` Triton passes to ``initialize``."""
    config = json.loads(args["model_config"])
    return config, {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def error_response(exc: BaseException) -> pb_utils.InferenceResponse:
    """The error response for ``exc``: a user error or model fault with its message, anything else named as a
    fault of ``model.py``; the code from the error table."""
    message = str(exc) if isinstance(exc, (UserError, ModelFault)) else f"{type(exc).__name__}: {exc}"
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, triton_code(exc)))
    )


def check_backbone_machine(version_dir: Path) -> None:
    """Refuse a backbone version whose int8 graph was gated on another CPU class (its ``backbone.json``)."""
    facts = version_dir / VERSION_BACKBONE
    if facts.is_file():
        backbone = json.loads(facts.read_text())
        if backbone["precision"] == "int8":
            check_int8_machine(backbone.get("int8_machine"), backbone.get("origin", ""))


def read_graph(version_dir: Path, sha256: str | None = None) -> bytes:
    """The ``model.onnx`` of a version directory, checked against ``sha256`` (default: the one recorded beside it when
    it was packaged) by :func:`~tl_models.core.heads.read_verified`, as a swap's admission checks it: Refused naming
    the file when it is missing or differs (a damaged or replaced file)."""
    expected = sha256 or (version_dir / VERSION_SHA256).read_text().strip()
    return read_verified(version_dir / VERSION_ONNX, expected, "the router's graph")


class OnnxGraph:
    """The ONNX graph of a version directory (``graph``: its bytes, already read) in one ONNX Runtime session:
    ``threads`` intra-op threads (0: ONNX Runtime's default), spinning when ``spin``, a batch run in runs of at most
    ``rows`` rows (0: whole); ``session``: one made already (:func:`~tl_models.core.runtime.lane_sessions`), instead of
    ``threads`` and ``spin``. A backbone's int8 graph loads only on the CPU class its gate measured it on."""

    def __init__(
        self,
        version_dir: Path,
        label: str,
        threads: int = 0,
        spin: bool = False,
        rows: int = 0,
        graph: bytes | None = None,
        session: InferenceSession | None = None,
    ) -> None:
        check_backbone_machine(version_dir)
        model = version_dir / VERSION_ONNX if graph is None else graph
        self.session = session or create_session(model, threads=threads or None, name=label, spin=spin)
        self.rows = rows
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        pb_utils.Logger.log_info(f"{label}: ONNX Runtime providers {self.session.get_providers()}")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The graph's output for ``batch``, in runs of at most ``rows`` rows."""
        if not self.rows or len(batch) <= self.rows:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        return np.concatenate([self.run(batch[i : i + self.rows]) for i in range(0, len(batch), self.rows)])
