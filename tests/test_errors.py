"""The one error table: every domain error has one HTTP status and one Triton code, whoever raises it."""

from __future__ import annotations

import pytest

from tl_models.core import errors
from tl_models.core.preprocess import ImageError
from tl_models.core.routing import NoTraffic, Route, RoutingError, UnknownHead
from tl_models.training.data import DataError
from tl_models.training.parity import ParityError
from tl_models.triton.config import TritonConfigError


@pytest.mark.parametrize(
    "error, status, code",
    [
        (errors.BadRequest("x"), 400, "INVALID_ARG"),
        (ImageError("not an image"), 400, "INVALID_ARG"),
        (RoutingError("bad weight"), 400, "INVALID_ARG"),
        (DataError("one class"), 400, "INVALID_ARG"),
        (TritonConfigError("bad config"), 400, "INVALID_ARG"),
        (errors.Unauthorized("token"), 401, "INVALID_ARG"),
        (errors.Forbidden("outside"), 403, "INVALID_ARG"),
        (UnknownHead("zzz"), 404, "NOT_FOUND"),
        (errors.Conflict("other bytes"), 409, "ALREADY_EXISTS"),
        (errors.Refused("sha256"), 422, "INVALID_ARG"),
        (errors.BuildError("no manifest"), 422, "INVALID_ARG"),
        (NoTraffic("no weight"), 503, "UNAVAILABLE"),
        (errors.ModelFault("ORT failed"), 500, "INTERNAL"),
        (RuntimeError("a bug"), 500, "INTERNAL"),
        (ParityError("past tolerance"), 500, "INTERNAL"),  # a build-time failure, never a served answer
    ],
)
def test_each_error_has_one_status_and_one_code(error, status, code):
    assert errors.http_status(error) == status
    assert errors.triton_code(error) == code


def test_routing_raises_the_classes_the_table_maps():
    route = Route(weights={"a": 1.0}, versions={"a": 1, "b": 1})
    with pytest.raises(UnknownHead):
        route.choose(head="zzz")
    with pytest.raises(NoTraffic):
        Route(weights={}, versions={"a": 1}).choose()
    with pytest.raises(RoutingError):
        Route(weights={"c": 1.0}, versions={"a": 1}).validate()
    assert route.choose(head="b") == ("b", 1)
