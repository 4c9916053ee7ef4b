"""Fast checks of the bounds and of what the serving path may load: no pickle, weights_only torch.load,
the body-size middleware, and the BentoML settings the TL_MODELS_* variables reach."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tl_models.bento.limits import BodyLimit

REPO = Path(__file__).resolve().parents[1]
SERVING_PATH = [
    "service.py",
    *sorted(
        str(p.relative_to(REPO))
        for layer in ("core", "bento", "triton/models")
        for p in (REPO / "tl_models" / layer).glob("*.py")
        if p.stat().st_size
    ),
]


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == dotted:
            found.append(node)
    return found


def test_every_torch_load_is_weights_only():
    calls = []
    for path in sorted((REPO / "tl_models").rglob("*.py")):
        for call in _calls(ast.parse(path.read_text()), "torch.load"):
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            calls.append((path.name, call.lineno, keywords.get("weights_only")))
    assert calls, "expected the weight loading of build.py and backbones.py"
    assert all(flag == "True" for *_, flag in calls), calls


@pytest.mark.parametrize("rel", SERVING_PATH)
def test_the_serving_path_never_unpickles(rel):
    tree = ast.parse((REPO / rel).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert not imported & {"pickle", "dill", "cloudpickle", "joblib"}, imported
    for loader in ("torch.load", "pickle.load", "pickle.loads"):
        assert not _calls(tree, loader), loader
    for call in _calls(tree, "np.load"):
        assert "allow_pickle" not in {k.arg for k in call.keywords}, ast.unparse(call)


async def _through(limit: int, headers: list, chunks: list[bytes]) -> tuple[int, bytes, bytes]:
    """Send a request through BodyLimit in front of an echo app: (status, response body, body the app saw)."""
    seen, sent = bytearray(), []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            seen.extend(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    await BodyLimit(app, limit)({"type": "http", "headers": headers}, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), bytes(seen)


def test_body_limit_refuses_declared_and_streamed_bodies_over_the_bound():
    status, body, seen = asyncio.run(_through(10, [(b"content-length", b"11")], [b"x" * 11]))
    assert status == 413 and seen == b"" and "limit is 10 bytes" in json.loads(body)["error"]
    status, body, seen = asyncio.run(_through(10, [], [b"x" * 6, b"x" * 6]))  # chunked: no length declared
    assert status == 413 and seen == b""
    assert asyncio.run(_through(10, [], [b"x" * 4, b"y" * 6])) == (200, b"ok", b"xxxxyyyyyy")
    assert asyncio.run(_through(10, [(b"content-length", b"10")], [b"z" * 10])) == (200, b"ok", b"z" * 10)


def test_limit_settings_reach_the_bentoml_service():
    code = (
        "import service, json; c = service.Classifier; "
        "print(json.dumps([c.config['traffic'], [[m.__name__, o] for m, o in c.middlewares]]))"
    )
    env = {
        **os.environ,
        "TL_MODELS_BUILD": "unused",
        "TL_MODELS_PREFLIGHT": "0",
        "TL_MODELS_TIMEOUT": "7.5",
        "TL_MODELS_MAX_REQUEST_BYTES": "12345",
        "BENTOML_DO_NOT_TRACK": "true",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    traffic, middlewares = json.loads(result.stdout.strip().splitlines()[-1])
    assert traffic["timeout"] == 7.5
    assert ["BodyLimit", {"max_bytes": 12345}] in middlewares
