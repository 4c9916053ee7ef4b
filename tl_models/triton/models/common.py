"""What every python-backend model of ours shares: parsing its config once, and error responses whose code comes
from the one table of :mod:`tl_models.core.errors`."""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from tl_models.core.errors import ModelFault, UserError, triton_code


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
