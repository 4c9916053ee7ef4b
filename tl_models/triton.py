"""Triton model repository for a build: configs checked against Triton's protobuf schema, atomic writes.

For a build named NAME (``manifest["name"]``) the repository holds::

    preprocess/               python: image_bytes (TYPE_STRING) -> image (uint8 3×H×W), tl_models.preprocess
    NAME_backbone/1/          image -> embedding (ONNX: onnxruntime backend, or python backend + ONNX Runtime)
    NAME_head_<head>/<v>/     embedding -> logits, one Triton version per head version (model.onnx and its
                              sha256 in model.onnx.sha256, checked before a swap loads it), labels.txt
    NAME_<head>/              ensemble image_bytes -> preprocess -> backbone -> head (pinned live version)
    NAME_<head>_tensor/       ensemble image -> backbone -> head
    NAME/                     python router (BLS): A/B split of tl_models.routing over ``NAME/route.json``;
                              preprocesses in-process, then calls backbone -> head

Every config is built as a ``ModelConfig`` message, printed as text, parsed back with ``text_format.Parse``
and checked (:func:`validate_config`) before it is written. A model or version directory is staged in a
hidden temp directory inside the repository and renamed into place, so it appears whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from .artifacts import BuildDir, atomic_write_bytes
from .export import BACKBONE_ONNX, EMBEDDING, HEAD_ONNX, IMAGE, LOGITS
from .routing import Route, RoutingState

FLAVOURS = ("python", "onnxruntime")
PREPROCESS = "preprocess"
CONFIG, LABELS, ROUTE_FILE, ONNX_FILE = "config.pbtxt", "labels.txt", "route.json", "model.onnx"
SHA256_FILE = ONNX_FILE + ".sha256"
IMAGE_BYTES, ROUTE_KEY, ROUTE_HEAD, HEAD = "image_bytes", "route_key", "route_head", "head"
MODELS_DIR = Path(__file__).parent / "triton_models"


class TritonConfigError(ValueError):
    """A model config Triton would reject, or a repository that cannot be written as asked."""


@dataclass
class RepositoryOptions:
    """How ``tl-models package triton`` writes the repository."""

    flavour: str = "python"
    gpu: bool = False
    tensorrt: bool = False
    max_batch_size: int = 32
    instances: int = 1
    max_queue_delay_us: int = 0  # Triton's default: batch what queued while the instance was busy, never wait
    weights: dict[str, float] | None = None

    def check(self) -> "RepositoryOptions":
        if self.flavour not in FLAVOURS:
            raise TritonConfigError(f"unknown flavour {self.flavour!r}; use one of {', '.join(FLAVOURS)}")
        if self.tensorrt and not (self.gpu and self.flavour == "onnxruntime"):
            raise TritonConfigError("the TensorRT accelerator needs --flavour onnxruntime --gpu")
        if self.max_batch_size < 1 or self.instances < 1:
            raise TritonConfigError("max batch size and instance count must be at least 1")
        if self.max_queue_delay_us < 0:
            raise TritonConfigError(f"max queue delay must be 0 or more microseconds, got {self.max_queue_delay_us}")
        return self


@dataclass
class Repository:
    """What was written: the repository path, the models, and the live version of each head."""

    path: Path
    name: str
    models: list[str] = field(default_factory=list)
    live: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- names


def backbone_model(name: str) -> str:
    return f"{name}_backbone"


def head_model(name: str, head: str) -> str:
    return f"{name}_head_{head}"


def ensemble_model(name: str, head: str, tensor: bool = False) -> str:
    return f"{name}_{head}_tensor" if tensor else f"{name}_{head}"


def model_names(name: str, heads: list[str]) -> list[str]:
    """Every model of a build's repository; TritonConfigError when two would share a name."""
    names = [PREPROCESS, backbone_model(name), name]
    for head in heads:
        names += [head_model(name, head), ensemble_model(name, head), ensemble_model(name, head, tensor=True)]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise TritonConfigError(f"build {name!r} with heads {heads} gives clashing Triton model names {clashes}: "
                                "rename a head")
    return names


# ---------------------------------------------------------------- config text and validation


def config_text(config: dict | mc.ModelConfig) -> str:
    """A config as Triton's text format (from a dict in ModelConfig's JSON form, or a message)."""
    if isinstance(config, dict):
        try:
            config = json_format.ParseDict(config, mc.ModelConfig())
        except json_format.ParseError as exc:
            raise TritonConfigError(f"not a ModelConfig: {exc}") from None
    return text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    """Parse config.pbtxt text with Triton's own schema."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonConfigError(f"config does not parse as inference.ModelConfig: {exc}") from None


def read_config(model_dir: Path) -> mc.ModelConfig:
    return parse_config((Path(model_dir) / CONFIG).read_text())


def _tensor_problems(config: mc.ModelConfig) -> list[str]:
    problems = []
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if not tensors:
            problems.append(f"no {kind}s")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names) or not all(names):
            problems.append(f"{kind} names must be unique and non-empty: {names}")
        for tensor in tensors:
            if tensor.data_type == mc.TYPE_INVALID:
                problems.append(f"{kind} {tensor.name!r} has no data_type")
            if not tensor.dims or any(d < -1 or d == 0 for d in tensor.dims):
                problems.append(f"{kind} {tensor.name!r} has bad dims {list(tensor.dims)}")
    return problems


def _ensemble_problems(config: mc.ModelConfig) -> list[str]:
    problems = [f"{f} is not allowed on an ensemble" for f in ("instance_group", "model_warmup") if getattr(config, f)]
    if config.HasField("optimization"):
        problems.append("optimization is not allowed on an ensemble")
    steps = config.ensemble_scheduling.step
    if not steps:
        return problems + ["ensemble has no steps"]
    known, consumed = {t.name for t in config.input}, set()
    for step in steps:
        if not step.model_name:
            problems.append("an ensemble step has no model_name")
        for tensor in step.input_map.values():
            if tensor not in known:
                problems.append(f"step {step.model_name!r} reads {tensor!r} before any step or input provides it")
            consumed.add(tensor)
        for tensor in step.output_map.values():
            if tensor in known:
                problems.append(f"ensemble tensor {tensor!r} is written more than once")
            known.add(tensor)
    problems += [f"output {t.name!r} is produced by no step" for t in config.output if t.name not in known]
    problems += [f"input {t.name!r} is read by no step" for t in config.input if t.name not in consumed]
    return problems


def _warmup_problems(config: mc.ModelConfig, model_dir: Path | None) -> list[str]:
    problems = []
    names = {t.name for t in config.input}
    required = {t.name for t in config.input if not t.optional}
    for sample in config.model_warmup:
        if not 1 <= sample.batch_size <= max(config.max_batch_size, 1):
            problems.append(f"warmup {sample.name!r}: batch_size {sample.batch_size} outside 1..max_batch_size")
        if not required <= set(sample.inputs) <= names:
            problems.append(f"warmup {sample.name!r}: inputs {sorted(sample.inputs)} do not match {sorted(names)}")
        for name, spec in sample.inputs.items():
            source = spec.WhichOneof("input_data_type")
            if source is None:
                problems.append(f"warmup {sample.name!r}: input {name!r} has no data")
            elif source == "input_data_file" and model_dir and not (model_dir / "warmup" / spec.input_data_file).is_file():
                problems.append(f"warmup {sample.name!r}: missing file warmup/{spec.input_data_file}")
    return problems


def validate_config(text: str, model_dir: str | Path | None = None, name: str | None = None) -> mc.ModelConfig:
    """Parse with Triton's schema and check what Triton checks at load time; TritonConfigError lists problems.

    With ``model_dir`` also checks the files the config names (labels, warmup data, version directories).
    """
    config = parse_config(text)
    model_dir = Path(model_dir) if model_dir is not None else None
    expected = name or (model_dir.name if model_dir else None)
    problems = []
    if not config.name or (expected and config.name != expected):
        problems.append(f"name {config.name!r} must be {expected!r}")
    if not (config.platform or config.backend):
        problems.append("neither platform nor backend is set")
    if config.max_batch_size < 0:
        problems.append("max_batch_size must be >= 0")
    if config.HasField("dynamic_batching") and config.max_batch_size == 0:
        problems.append("dynamic_batching needs max_batch_size > 0")
    problems += _tensor_problems(config)
    if config.platform == "ensemble":
        problems += _ensemble_problems(config)
    elif config.HasField("ensemble_scheduling"):
        problems.append("ensemble_scheduling on a model whose platform is not 'ensemble'")
    problems += _warmup_problems(config, model_dir)
    if model_dir is not None:
        problems += [f"label file {t.label_filename!r} is missing" for t in config.output
                     if t.label_filename and not (model_dir / t.label_filename).is_file()]
        versions = {int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()} \
            if model_dir.is_dir() else set()
        wanted = set(config.version_policy.specific.versions) if config.version_policy.HasField("specific") else set()
        problems += [f"version {v} of the version_policy has no directory" for v in sorted(wanted - versions)]
        if not versions:
            problems.append("no version directory")
    if problems:
        raise TritonConfigError(f"model {config.name or '?'}: " + "; ".join(problems))
    return config


# ---------------------------------------------------------------- config builders


def _tensor(name: str, dtype: str, dims: list[int], labels: bool = False, optional: bool = False) -> dict:
    tensor: dict = {"name": name, "data_type": dtype, "dims": dims}
    if labels:
        tensor["label_filename"] = LABELS
    if optional:
        tensor["optional"] = True
    return tensor


def _served(options: RepositoryOptions, gpu: bool) -> dict:
    """max_batch_size, dynamic batching and instance group of a non-ensemble model.

    A queue delay adds to every hop of a chain at low load (router -> preprocess -> backbone -> head cost 5.9 ms
    more at concurrency 1 with delays of 0.5-2 ms); with 0, a busy instance still gets batches of what queued."""
    return {"max_batch_size": options.max_batch_size,
            "dynamic_batching": {"max_queue_delay_microseconds": options.max_queue_delay_us},
            "instance_group": [{"kind": "KIND_GPU" if gpu else "KIND_CPU", "count": options.instances}]}


def _zero_warmup(name: str, dtype: str, dims: list[int]) -> list[dict]:
    return [{"name": "zeros", "batch_size": 1, "inputs": {name: {"data_type": dtype, "dims": dims, "zero_data": True}}}]


def _params(**values: object) -> dict:
    return {key: {"string_value": value if isinstance(value, str) else json.dumps(value)}
            for key, value in values.items()}


def onnx_step_config(model: str, options: RepositoryOptions, inp: dict, out: dict, versions: list[int],
                     threads: int = 0) -> dict:
    """Backbone or head: onnxruntime_onnx platform, or the python backend running ONNX Runtime (``threads``
    intra-op threads, 0: ONNX Runtime's default; never spinning, since the stubs share the CPU)."""
    config = {"name": model, "input": [inp], "output": [out], **_served(options, options.gpu),
              "version_policy": {"specific": {"versions": versions}},
              "model_warmup": _zero_warmup(inp["name"], inp["data_type"], inp["dims"])}
    if options.flavour == "onnxruntime":
        config.update(platform="onnxruntime_onnx", default_model_filename=ONNX_FILE)
        if options.tensorrt:
            config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [{
                "name": "tensorrt", "parameters": {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30)}}]}}
    else:
        config.update(backend="python", parameters=_params(onnx_file=ONNX_FILE, threads=str(threads), spin="0"))
    return config


def preprocess_config(manifest: dict, options: RepositoryOptions) -> dict:
    """bytes -> uint8 image on CPU; warmed up with a real PNG (a zero string is not an image)."""
    return {"name": PREPROCESS, "backend": "python",
            "input": [_tensor(IMAGE_BYTES, "TYPE_STRING", [1])],
            "output": [_tensor(IMAGE, "TYPE_UINT8", list(manifest["input_size"]))],
            **_served(options, gpu=False),
            "parameters": _params(preprocessing=manifest["preprocessing"]),
            "model_warmup": [{"name": "png", "batch_size": 1, "inputs": {IMAGE_BYTES: {
                "data_type": "TYPE_STRING", "dims": [1], "input_data_file": IMAGE_BYTES}}}]}


def ensemble_config(name: str, head: str, version: int, manifest: dict, options: RepositoryOptions,
                    tensor: bool) -> dict:
    """image_bytes (or image) -> [preprocess ->] backbone -> head version ``version``."""
    steps = [] if tensor else [{"model_name": PREPROCESS, "model_version": -1, "input_map": {IMAGE_BYTES: IMAGE_BYTES},
                                "output_map": {IMAGE: IMAGE}}]
    steps += [{"model_name": backbone_model(name), "model_version": -1, "input_map": {IMAGE: IMAGE},
               "output_map": {EMBEDDING: EMBEDDING}},
              {"model_name": head_model(name, head), "model_version": version, "input_map": {EMBEDDING: EMBEDDING},
               "output_map": {LOGITS: LOGITS}}]
    inp = _tensor(IMAGE, "TYPE_UINT8", list(manifest["input_size"])) if tensor else _tensor(IMAGE_BYTES, "TYPE_STRING", [1])
    return {"name": ensemble_model(name, head, tensor), "platform": "ensemble",
            "max_batch_size": options.max_batch_size, "input": [inp],
            "output": [_tensor(LOGITS, "TYPE_FP32", [len(manifest["labels"])], labels=True)],
            "ensemble_scheduling": {"step": steps}}


def router_config(name: str, manifest: dict, options: RepositoryOptions) -> dict:
    """The A/B router. No model_warmup: its BLS targets may not be loaded yet when it is warmed."""
    return {"name": name, "backend": "python",
            "input": [_tensor(IMAGE_BYTES, "TYPE_STRING", [1]), _tensor(ROUTE_KEY, "TYPE_STRING", [1], optional=True),
                      _tensor(ROUTE_HEAD, "TYPE_STRING", [1], optional=True)],
            "output": [_tensor(LOGITS, "TYPE_FP32", [len(manifest["labels"])], labels=True),
                       _tensor(HEAD, "TYPE_STRING", [1])],
            **_served(options, gpu=False),
            "parameters": _params(route_file=ROUTE_FILE, poll="0.2", preprocessing=manifest["preprocessing"],
                                  backbone_model=backbone_model(name), head_prefix=head_model(name, ""))}


# ---------------------------------------------------------------- atomic writing


def _write_tree(root: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> None:
    for rel in dirs:
        (root / rel).mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _same_tree(root: Path, files: dict[str, bytes]) -> bool:
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return present == set(files) and all((root / rel).read_bytes() == data for rel, data in files.items())


def _put_dir(parent: Path, name: str, files: dict[str, bytes], check=None, dirs: tuple[str, ...] = ()) -> bool:
    """Stage ``files`` in a hidden temp dir under ``parent``, check it, rename it to ``parent/name``.

    An identical existing directory is kept (returns False); a different one is swapped out.
    """
    target = parent / name
    if target.is_dir() and _same_tree(target, files):
        return False
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".staging-{name}-"))
    try:
        _write_tree(staging, files, dirs)
        if check is not None:
            check(staging)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".old-{name}-"))
            os.replace(target, old / name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def write_model(repo: Path, config: dict | mc.ModelConfig, files: dict[str, bytes] | None = None,
                versions: dict[int, dict[str, bytes]] | None = None) -> Path:
    """Write one model: a new model directory appears whole; in an existing one each version directory is
    staged and renamed, other files are replaced atomically, and the validated config is written last."""
    text = config_text(config)
    name = parse_config(text).name
    files, versions = dict(files or {}), versions or {}
    model_dir = repo / name
    if not model_dir.is_dir():
        tree = {**files, CONFIG: text.encode()}
        for version, content in versions.items():
            tree.update({f"{version}/{rel}": data for rel, data in content.items()})
        _put_dir(repo, name, tree, check=lambda staged: validate_config(text, staged, name),
                 dirs=tuple(str(v) for v in versions))
        return model_dir
    for version, content in versions.items():
        _put_dir(model_dir, str(version), content)
    for rel, data in files.items():
        _replace(model_dir / rel, data)
    validate_config(text, model_dir)
    _replace(model_dir / CONFIG, text.encode())
    return model_dir


def _replace(path: Path, data: bytes) -> None:
    """Atomically replace a file, but only when its content changes: Triton reloads models whose files are newer."""
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)


def write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    """Validate and atomically replace an existing model's config (used by swap)."""
    text = config_text(config)
    validate_config(text, model_dir)
    _replace(Path(model_dir) / CONFIG, text.encode())


# ---------------------------------------------------------------- the repository of a build


def _warmup_png(size: int) -> bytes:
    """A grey PNG as one serialized TYPE_STRING element (4-byte little-endian length, then the bytes)."""
    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, format="PNG")
    return struct.pack("<I", len(buffer.getvalue())) + buffer.getvalue()


def _labels(manifest: dict) -> bytes:
    labels = [str(label) for label in manifest["labels"]]
    if any("\n" in label for label in labels):
        raise TritonConfigError("a label contains a newline: Triton's label file is one label per line")
    return ("\n".join(labels) + "\n").encode()


def _version_files(onnx_path: Path, options: RepositoryOptions) -> dict[str, bytes]:
    data = onnx_path.read_bytes()
    files = {ONNX_FILE: data, SHA256_FILE: hashlib.sha256(data).hexdigest().encode()}  # checked by swap
    if options.flavour == "python":
        files["model.py"] = (MODELS_DIR / "onnx_model.py").read_bytes()
    return files


def _live_versions(route_path: Path, manifest: dict) -> dict[str, int]:
    """Live version per head: the route file's where it names one the build has, else the latest."""
    built: dict[str, list[int]] = {}
    for head in manifest["heads"]:
        built.setdefault(head["name"], []).append(int(head["version"]))
    routed = RoutingState(route_path).current().versions
    return {name: routed[name] if routed.get(name) in versions else max(versions) for name, versions in built.items()}


def _update_route(route_path: Path, live: dict[str, int], weights: dict[str, float] | None) -> None:
    """Keep a live route file; change it only for new heads or versions, or new weights."""
    state = RoutingState(route_path, poll=0)
    current = state.current().versions
    if weights is not None or current != {**current, **live}:
        state.update(weights=weights, versions=live)


def write_repository(build_dir: str | Path, repo: str | Path, options: RepositoryOptions | None = None) -> Repository:
    """Write (or update) the Triton entries of a build; existing version directories are kept when identical."""
    options = (options or RepositoryOptions()).check()
    build = BuildDir(build_dir)
    manifest = build.manifest()
    build.verify(manifest)
    name = manifest["name"]
    heads = sorted({head["name"] for head in manifest["heads"]})
    if not heads:
        raise TritonConfigError(f"build {build.path} has no heads: run `tl-models build` first")
    missing = [h["path"] for h in manifest["heads"] if HEAD_ONNX not in h["files"]]
    if BACKBONE_ONNX not in manifest["top_files"] or missing:
        raise TritonConfigError(f"build {build.path} is not exported to ONNX: run `tl-models export {build.path}`")
    models = model_names(name, heads)
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    _check_preprocess(repo, manifest)
    route_path = repo / name / ROUTE_FILE
    live = _live_versions(route_path, manifest)
    if options.weights is not None and set(options.weights) - set(heads):
        raise TritonConfigError(f"weights for unknown heads {sorted(set(options.weights) - set(heads))}; "
                                f"the build has {heads}")
    size, dim, classes = list(manifest["input_size"]), manifest["embedding_dim"], len(manifest["labels"])
    labels = _labels(manifest)
    for head in heads:
        versions = {int(h["version"]): _version_files(build.path / h["path"] / HEAD_ONNX, options)
                    for h in manifest["heads"] if h["name"] == head}
        write_model(repo, onnx_step_config(head_model(name, head), options, _tensor(EMBEDDING, "TYPE_FP32", [dim]),
                                           _tensor(LOGITS, "TYPE_FP32", [classes], labels=True), [live[head]],
                                           threads=1),  # a D×C matmul: a thread pool would only get in the way
                    {LABELS: labels}, versions)
    write_model(repo, onnx_step_config(backbone_model(name), options, _tensor(IMAGE, "TYPE_UINT8", size),
                                       _tensor(EMBEDDING, "TYPE_FP32", [dim]), [1]),
                versions={1: _version_files(build.path / BACKBONE_ONNX, options)})
    write_model(repo, preprocess_config(manifest, options), {f"warmup/{IMAGE_BYTES}": _warmup_png(size[-1])},
                {1: {"model.py": (MODELS_DIR / "preprocess.py").read_bytes()}})
    for head in heads:
        for tensor in (False, True):
            write_model(repo, ensemble_config(name, head, live[head], manifest, options, tensor), {LABELS: labels},
                        {1: {}})
    router_files = {LABELS: labels}
    if route_path.is_file():
        _update_route(route_path, live, options.weights)
    else:  # a new router directory appears with its route file
        weights = options.weights if options.weights is not None else {head: 1.0 for head in heads}
        router_files[ROUTE_FILE] = (json.dumps(Route(weights, live, 1).validate().to_dict(), indent=2) + "\n").encode()
    write_model(repo, router_config(name, manifest, options), router_files,
                {1: {"model.py": (MODELS_DIR / "router.py").read_bytes()}})
    return Repository(repo, name, models, live)


def _check_preprocess(repo: Path, manifest: dict) -> None:
    """``preprocess`` is shared by the builds of a repository: they must agree on preprocessing."""
    if not (repo / PREPROCESS / CONFIG).is_file():
        return
    params = read_config(repo / PREPROCESS).parameters
    if "preprocessing" in params and json.loads(params["preprocessing"].string_value) != manifest["preprocessing"]:
        raise TritonConfigError(f"{repo / PREPROCESS} serves another preprocessing "
                                f"({params['preprocessing'].string_value}): use another repository for this build")
