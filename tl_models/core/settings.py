"""Every ``TL_MODELS_*`` environment variable, in one table: name, default, scope and meaning.

This is documentation with a guard, not configuration: the modules that read a variable keep reading it
themselves (``os.environ.get`` where it is used). ``tests/test_settings.py`` checks that every variable the code
names is a row here, that every row is still named somewhere, that a default the code spells as a literal is the
one written here, and that ``docs/reference/environment.md`` is :func:`render` of this table. After adding or
changing a row, regenerate the page::

    .venv/bin/python -m tl_models.core.settings > docs/reference/environment.md

Torch-free and dependency-free: it is part of ``core``.
"""

from __future__ import annotations

from typing import NamedTuple


class Setting(NamedTuple):
    """One environment variable: its name, its default (as a person reads it), where it acts, what it does."""

    name: str
    default: str
    scope: str
    doc: str


# Scopes, in the order the page lists them: what reads the variable.
SCOPES = {
    "build": "`tl-models build` (and `demo`, `bench build`): feature extraction and its cache",
    "onnxruntime": "every ONNX Runtime session made through `tl_models.core.runtime` (builds, parity, both servers, "
    "benchmarks)",
    "bento": "the BentoML service (`tl-models bento serve`, `bentoml serve service:Classifier`)",
    "limits": "bounds of the BentoML service (see [Limits](../limits.md))",
    "judging": "judging heads on live traffic, BentoML (see [Judging heads](../judging.md))",
    "fleet": "replicas following one route (see [Run on Kubernetes](../kubernetes-fleet.md)); the admin token also "
    "drives `tl-models triton swap`, `triton shadow` and `tl-models fleet`",
    "tests": "the test suite only",
}

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "TL_MODELS_CACHE",
        "`~/.cache/tl-models`",
        "build",
        "Folder of the sharded feature cache (`--cache-dir` overrides it).",
    ),
    Setting(
        "TL_MODELS_DECODE_WORKERS",
        "the CPU count (`0` or unset)",
        "build",
        "Threads that decode and check images (the scan, extraction).",
    ),
    Setting(
        "TL_MODELS_EXTRACT_SESSIONS",
        "the CPU count, at most 4 (`0` or unset)",
        "build",
        "ONNX Runtime sessions CPU extraction runs side by side, each with an equal share of the cores and "
        "`32 / sessions` images a batch (at least 8).",
    ),
    Setting("TL_MODELS_SHARD_IMAGES", "`4096`", "build", "Images per feature cache shard (`shard-NNNNNN.npy`)."),
    Setting(
        "TL_MODELS_PROVIDERS",
        "what the machine has: TensorRT > CUDA > CPU",
        "onnxruntime",
        "Execution providers to ask for, comma-separated, best first: `tensorrt`, `cuda`, `cpu`.",
    ),
    Setting(
        "TL_MODELS_THREADS",
        "ONNX Runtime's own (`0` or unset)",
        "onnxruntime",
        "Intra-op threads of a session whose caller gives no number (CPU extraction with several sessions "
        "gives each its share of the cores).",
    ),
    Setting(
        "TL_MODELS_BENTO",
        "the only build in the BentoML store",
        "bento",
        "Build of the model store to serve, when the store holds several.",
    ),
    Setting(
        "TL_MODELS_BUILD",
        "unset: serve from the model store",
        "bento",
        "Build directory to serve instead of the store (a fleet's shared build).",
    ),
    Setting(
        "TL_MODELS_PRECISION",
        "`fp32`",
        "bento",
        "`fp32`, or `int8`: the backbone `tl-models quantize` wrote past its accuracy gate.",
    ),
    Setting(
        "TL_MODELS_STATE_DIR",
        "`$BENTOML_HOME/tl-models/<build>-<sha>` (`-int8` for int8)",
        "bento",
        "Route, head catalog and `feedback.sqlite`, shared by the workers.",
    ),
    Setting(
        "TL_MODELS_WEIGHTS",
        "unset: equal weights",
        "bento",
        "Initial A/B split (`a=90,b=10`) when no route exists yet.",
    ),
    Setting("TL_MODELS_WORKERS", "`1`", "bento", "BentoML worker processes."),
    Setting(
        "TL_MODELS_SPIN",
        "`1`",
        "bento",
        "`1`: the solo session's ONNX Runtime threads (a lone request's pass on every core, which runs only with no "
        "other pass on the machine) spin while waiting for work during a run (faster passes; on a 2-core Xeon, "
        "mobilenet_v2 batch 1 took 3.0 instead of 4.3 ms); `0`: they sleep.",
    ),
    Setting(
        "TL_MODELS_LANES",
        "one per core of the worker (CPU); 1 on a GPU",
        "bento",
        "Backbone passes that run side by side, each on a single-threaded session of its own; a request that finds "
        "the worker idle runs on a session with every core of the machine instead. `1` with one worker: one session "
        "for everything.",
    ),
    Setting(
        "TL_MODELS_MAX_BATCH",
        "`2` on the CPU, `16` on a GPU",
        "bento",
        "Most images in one shared backbone pass (on the CPU, per lane); queued requests join the next pass.",
    ),
    Setting("TL_MODELS_TOP_K", "`5`", "bento", "Predictions per image when the request gives no `top_k`."),
    Setting("TL_MODELS_ROUTE_POLL", "`0`: every request", "bento", "Seconds between checks of the route file."),
    Setting(
        "TL_MODELS_ACCESS_LOG", "`1`", "bento", "`0`: no log line per request (`/metrics` still counts every request)."
    ),
    Setting(
        "TL_MODELS_TRACING",
        "`0`: off",
        "bento",
        "`1` keeps BentoML's OpenTelemetry spans on every request (configure an exporter through BentoML's "
        "`tracing` settings); off, no span is made (they cost CPU on every request even when never sampled).",
    ),
    Setting(
        "TL_MODELS_PREFLIGHT",
        "`1`: on",
        "bento",
        "`0` skips the start check of `service.py` (backbone and routed heads' sha256, the state directory, the route "
        "files), for tools that import it without serving it; with it, a service that cannot start exits once with "
        "one line instead of BentoML restarting its workers.",
    ),
    Setting(
        "TL_MODELS_ADMIN_TOKEN",
        "unset: admin endpoints off (401)",
        "bento",
        "Bearer token of `/admin/*` (also accepted by `/feedback`); sent by `tl-models fleet` and, as header "
        "`tl-models-admin`, by `tl-models triton swap` and `shadow`; the Secret `tl-models deploy render` writes.",
    ),
    Setting(
        "TL_MODELS_FEEDBACK_TOKEN",
        "unset: only the admin token",
        "bento",
        "Bearer token of `POST /feedback`, for the systems that know the truth, without admin rights.",
    ),
    Setting(
        "TL_MODELS_MAX_REQUEST_BYTES",
        "`16777216` (16 MiB)",
        "limits",
        "Largest request body; past it 413 `request body too large`.",
    ),
    Setting("TL_MODELS_TIMEOUT", "`60`", "limits", "Request time in seconds (BentoML `traffic.timeout`; then 504)."),
    Setting(
        "TL_MODELS_MAX_PIXELS",
        "`40000000` (40 Mpixel)",
        "limits",
        "Largest image, checked from its header before decoding; past it 400 `image too large`.",
    ),
    Setting("TL_MODELS_MAX_TENSOR_BATCH", "`256`", "limits", "Most images in one `/predict` tensor."),
    Setting(
        "TL_MODELS_BUILD_ROOTS",
        "the service's working directory",
        "limits",
        "`:`-separated folders `/admin/load` may load a `build_dir` from; others are 403.",
    ),
    Setting(
        "TL_MODELS_RECORD",
        "`1`: on",
        "judging",
        "`0` turns the recorder off: answers keep their request ids and shadow heads are still scored, but nothing "
        "is written to the feedback store (`POST /feedback` answers 422), drift is not computed and nothing is "
        "logged.",
    ),
    Setting("TL_MODELS_LOG_SHARE", "`0`: off", "judging", "Share (0..1) of answered images in the embedding log."),
    Setting("TL_MODELS_LOG_DIR", "`$TL_MODELS_STATE_DIR/embedding-log`", "judging", "Folder of the embedding log."),
    Setting(
        "TL_MODELS_LOG_FLUSH",
        "`10`",
        "judging",
        "Seconds between embedding log shards (or 4096 records, whichever comes first).",
    ),
    Setting("TL_MODELS_LOG_MAX_MB", "`1024`", "judging", "Size of the embedding log past which the oldest shards go."),
    Setting(
        "TL_MODELS_JUDGE_QUEUE",
        "`10000`",
        "judging",
        "Records waiting for the recorder thread; a record past it is dropped and counted, the request never waits.",
    ),
    Setting("TL_MODELS_DRIFT_WINDOW", "`256`", "judging", "Served embeddings in a head's drift window."),
    Setting(
        "TL_MODELS_DRIFT_THRESHOLD",
        "`0.5`",
        "judging",
        "Drift (in units of the training spread) past which a head is reported `drifted`.",
    ),
    Setting("TL_MODELS_FEEDBACK_WINDOW", "`1000`", "judging", "Last labelled requests a head's accuracy counts."),
    Setting("TL_MODELS_RETENTION_DAYS", "`7`", "judging", "Days `feedback.sqlite` keeps a request."),
    Setting(
        "TL_MODELS_FLEET_ROUTE",
        "unset: not in a fleet",
        "fleet",
        "The fleet's route file this replica follows (read at start, before it is ready).",
    ),
    Setting("TL_MODELS_FLEET_POLL", "`5`", "fleet", "Seconds between re-reads of the fleet's route file."),
    Setting(
        "TL_MODELS_SOAK_SECONDS",
        "`60`",
        "tests",
        "Length of each server's soak test (shorten it for local runs; CI keeps 60).",
    ),
)

HEADER = """# Environment variables

Every `TL_MODELS_*` variable the code reads. Generated from `tl_models/core/settings.py`
(`python -m tl_models.core.settings > docs/reference/environment.md`); `tests/test_settings.py` fails when the code
reads a variable that is not here, when a row is no longer read, or when this page differs from the table.
"""


def _cell(text: str) -> str:
    """``text`` as a Markdown table cell; a ``|`` would split the cell (escaping it breaks inside a code span)."""
    if "|" in text:
        raise ValueError(f"no '|' in a settings table cell: {text!r}")
    return text


def render(settings: tuple[Setting, ...] = SETTINGS) -> str:
    """The reference page: the scopes, then one table of every setting, grouped by scope in :data:`SCOPES` order."""
    lines = [HEADER, "| scope | what reads it |", "| --- | --- |"]
    lines += [f"| {scope} | {_cell(what)} |" for scope, what in SCOPES.items()]
    lines += ["", "| variable | scope | default | what it does |", "| --- | --- | --- | --- |"]
    order = list(SCOPES)
    for s in sorted(settings, key=lambda s: order.index(s.scope)):
        lines.append(f"| `{s.name}` | {s.scope} | {_cell(s.default)} | {_cell(s.doc)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
