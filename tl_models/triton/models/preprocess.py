"""Triton python-backend model ``preprocess``: encoded image bytes (TYPE_STRING) -> uint8 N×3×H×W.

Copied as ``model.py`` into the model repository by ``tl-models triton package``. Decoding and resizing are
``tl_models.core.preprocess`` (the same code as training and BentoML). A request that is not an image gets its own
INVALID_ARG error response; the other requests of the batch are answered.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from tl_models.core.preprocess import DEFAULT_MAX_PIXELS, ImageError, Preprocessing, preprocess_many
from tl_models.triton.models.common import error_response, model_parameters


class TritonPythonModel:
    """bytes -> image tensor, one response per request, in order."""

    def initialize(self, args: dict) -> None:
        config, params = model_parameters(args)
        self.spec = Preprocessing.from_dict(json.loads(params["preprocessing"]))
        self.max_pixels = int(params.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            try:
                images = preprocess_many(data.reshape(-1), self.spec, self.max_pixels)
            except ImageError as exc:
                responses.append(error_response(exc))
                continue
            tensor = pb_utils.Tensor(self.output_name, images.reshape(data.shape[0], *images.shape[1:]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self) -> None:
        del self.spec
