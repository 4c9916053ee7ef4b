"""Triton python-backend model for one ONNX graph (backbone or head version), run by ONNX Runtime.

Copied as ``model.py`` next to ``model.onnx`` in a version directory by ``tl-models triton package --flavour
python``. The graph runs in :class:`~tl_models.triton.models.common.OnnxGraph` (parameters ``threads``, ``spin`` and
``rows``: the backbone's on the CPU runs a dynamic batch in runs of at most 2 rows, where a larger run costs more per
image). The requests of a dynamic batch run as one call; when that call fails, each request runs alone so only the
bad one gets an error response.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from tl_models.core.errors import BadRequest, ModelFault
from tl_models.core.preprocess import tensor_problem
from tl_models.triton.models.common import OnnxGraph, error_response, model_parameters


class TritonPythonModel:
    """N×input -> N×output with one ONNX Runtime session per model instance."""

    def initialize(self, args: dict) -> None:
        config, params = model_parameters(args)
        self.graph = OnnxGraph(
            Path(args["model_repository"]) / args["model_version"],
            f"{args['model_name']}:{args['model_version']}",
            threads=int(params.get("threads", "0")),
            spin=params.get("spin", "0") == "1",
            rows=int(params.get("rows", "0")),
        )
        spec = config["input"][0]
        self.input_name, self.output_name = spec["name"], config["output"][0]["name"]
        self.dtype = pb_utils.triton_string_to_numpy(spec["data_type"])
        self.dims = tuple(int(d) for d in spec["dims"])

    def _check(self, array: np.ndarray) -> str | None:
        return tensor_problem(array, f"input {self.input_name!r}", self.dims, self.dtype)

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        good: list[tuple[int, np.ndarray]] = []
        for index, request in enumerate(requests):
            array = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            problem = self._check(array)
            if problem:
                responses[index] = error_response(BadRequest(problem))
            else:
                good.append((index, array))
        if good:
            try:
                outputs: list[Any] = np.split(  # arrays, or the exceptions of failed requests below
                    self.graph.run(np.concatenate([a for _, a in good])), np.cumsum([len(a) for _, a in good])[:-1]
                )
            except Exception:  # one bad request must not fail its neighbours: run them one by one
                outputs = []
                for _, array in good:
                    try:
                        outputs.append(self.graph.run(array))
                    except Exception as exc:
                        outputs.append(exc)
            for (index, _), output in zip(good, outputs):
                responses[index] = (
                    error_response(ModelFault(f"ONNX Runtime: {output}"))
                    if isinstance(output, Exception)
                    else pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, output)])
                )
        return responses

    def finalize(self) -> None:
        del self.graph
