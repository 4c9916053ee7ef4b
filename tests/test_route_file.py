"""A damaged route file (not JSON, not a route, a route that does not validate): refused at the first read, the
last good route kept afterwards with the error reported, never overwritten by an update."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tl_models.core.routing import DamagedRoute, RoutingState, read_route

DAMAGED: dict[str, str | bytes] = {
    "half-written": '{"weights": {"a": 1.0}, "versions": {"a"',
    "not an object": "[1, 2, 3]",
    "not a number": '{"weights": {"a": "heavy"}, "versions": {"a": 1}}',
    "weight without a version": '{"weights": {"b": 1.0}, "versions": {"a": 1}}',
    "bad shadow share": '{"weights": {"a": 1.0}, "versions": {"a": 1}, "shadow": {"a:2": 7}}',
    "not UTF-8": b'{"weights": {"\xff": 1}}',
}


def _write(path: Path, text: str | bytes) -> None:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)  # a new stamp even within the clock's resolution


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_a_damaged_file_at_the_first_read_names_the_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "route.json"
    _write(path, DAMAGED[kind])
    with pytest.raises(DamagedRoute, match=rf"route file {path} is damaged \(.+\): restore it"):
        read_route(path)


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_readers_keep_the_last_good_route_and_updates_change_nothing(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "route.json"
    state = RoutingState(path, poll=0)
    good = state.update(weights={"a": 1.0}, versions={"a": 1})
    assert state.error is None
    _write(path, DAMAGED[kind])
    damaged = path.read_bytes()
    assert state.current() == good
    assert state.error is not None and str(path) in state.error
    with pytest.raises(DamagedRoute, match="nothing was changed"):
        state.update(weights={"a": 2.0})
    assert path.read_bytes() == damaged  # never overwritten
    _write(path, '{"weights": {"a": 3.0}, "versions": {"a": 2}, "revision": 9}')
    assert state.current().versions == {"a": 2} and state.error is None  # repaired: followed again
    assert state.update(weights={"a": 1.0}).revision == 10
