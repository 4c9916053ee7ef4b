"""Triton model configs: the names of a build's models, the config builders, and the checks Triton makes at load
time (each config is built as a ``ModelConfig`` message of Triton's own protobuf schema and validated before it is
written)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from ..core.errors import BadRequest
from ..core.heads import PRECISIONS
from ..core.manifest import Manifest
from ..core.names import (
    CONFIG,
    EMBEDDING,
    HEAD,
    IMAGE,
    IMAGE_BYTES,
    LABELS,
    LOGITS,
    PREPROCESS,
    REQUEST_ID,
    ROUTE_FILE,
    ROUTE_HEAD,
    ROUTE_KEY,
    VERSION_ONNX,
)
from ..core.runtime import CPU_RUN_ROWS

FLAVOURS = ("python", "onnxruntime")


class TritonConfigError(BadRequest):
    """A model config Triton would reject, or a repository that cannot be written as asked."""


@dataclass
class RepositoryOptions:
    """How ``tl-models triton package`` writes the repository."""

    flavour: str = "python"
    gpu: bool = False
    tensorrt: bool = False
    max_batch_size: int = 32
    instances: int = 1
    max_queue_delay_us: int = 0  # Triton's default: batch what queued while the instance was busy, never wait
    weights: dict[str, float] | None = None
    precision: str = "fp32"

    def check(self) -> RepositoryOptions:
        if self.flavour not in FLAVOURS:
            raise TritonConfigError(f"unknown flavour {self.flavour!r}; use one of {', '.join(FLAVOURS)}")
        if self.precision not in PRECISIONS:
            raise TritonConfigError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.precision == "int8" and self.gpu:
            raise TritonConfigError(
                "int8 backbones are for CPU serving (their gate measured them on the CPU): "
                "serve fp32 or fp16 on the GPU"
            )
        if self.tensorrt and not (self.gpu and self.flavour == "onnxruntime"):
            raise TritonConfigError("the TensorRT accelerator needs --flavour onnxruntime --gpu")
        if self.max_batch_size < 1 or self.instances < 1:
            raise TritonConfigError("max batch size and instance count must be at least 1")
        if self.max_queue_delay_us < 0:
            raise TritonConfigError(f"max queue delay must be 0 or more microseconds, got {self.max_queue_delay_us}")
        return self


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
        raise TritonConfigError(
            f"build {name!r} with heads {heads} gives clashing Triton model names {clashes}: rename a head"
        )
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
            elif (
                source == "input_data_file"
                and model_dir
                and not (model_dir / "warmup" / spec.input_data_file).is_file()
            ):
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
        problems += [
            f"label file {t.label_filename!r} is missing"
            for t in config.output
            if t.label_filename and not (model_dir / t.label_filename).is_file()
        ]
        versions = (
            {int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}
            if model_dir.is_dir()
            else set()
        )
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
    return {
        "max_batch_size": options.max_batch_size,
        "dynamic_batching": {"max_queue_delay_microseconds": options.max_queue_delay_us},
        "instance_group": [{"kind": "KIND_GPU" if gpu else "KIND_CPU", "count": options.instances}],
    }


def _zero_warmup(name: str, dtype: str, dims: list[int]) -> list[dict]:
    return [{"name": "zeros", "batch_size": 1, "inputs": {name: {"data_type": dtype, "dims": dims, "zero_data": True}}}]


def _params(**values: object) -> dict:
    return {
        key: {"string_value": value if isinstance(value, str) else json.dumps(value)} for key, value in values.items()
    }


def onnx_step_config(
    model: str,
    options: RepositoryOptions,
    inp: dict,
    out: dict,
    versions: list[int],
    threads: int = 0,
    precision: str | None = None,
    spin: bool = False,
    rows: int = 0,
) -> dict:
    """Backbone or head: onnxruntime_onnx platform, or the python backend running ONNX Runtime (``threads``
    intra-op threads, 0: ONNX Runtime's default; ``spin``: they spin while waiting for work, the backbone's: faster
    passes, 1.06x the requests per second here; ``rows``: a dynamic batch runs in runs of at most that many rows,
    0: whole). ``precision`` (the backbone's) is shown as a parameter of the model's config."""
    config = {
        "name": model,
        "input": [inp],
        "output": [out],
        **_served(options, options.gpu),
        "version_policy": {"specific": {"versions": versions}},
        "model_warmup": _zero_warmup(inp["name"], inp["data_type"], inp["dims"]),
    }
    if options.flavour == "onnxruntime":
        config.update(platform="onnxruntime_onnx", default_model_filename=VERSION_ONNX)
        if options.tensorrt:
            config["optimization"] = {
                "execution_accelerators": {
                    "gpu_execution_accelerator": [
                        {
                            "name": "tensorrt",
                            "parameters": {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30)},
                        }
                    ]
                }
            }
    else:
        parameters = _params(threads=str(threads), spin="1" if spin else "0", rows=str(rows))
        config.update(backend="python", parameters=parameters)
    if precision is not None:
        config["parameters"] = {**config.get("parameters", {}), **_params(precision=precision)}
    return config


def preprocess_config(manifest: Manifest, options: RepositoryOptions) -> dict:
    """bytes -> uint8 image on CPU; warmed up with a real PNG (a zero string is not an image)."""
    return {
        "name": PREPROCESS,
        "backend": "python",
        "input": [_tensor(IMAGE_BYTES, "TYPE_STRING", [1])],
        "output": [_tensor(IMAGE, "TYPE_UINT8", list(manifest.input_size))],
        **_served(options, gpu=False),
        "parameters": _params(preprocessing=manifest.preprocessing),
        "model_warmup": [
            {
                "name": "png",
                "batch_size": 1,
                "inputs": {IMAGE_BYTES: {"data_type": "TYPE_STRING", "dims": [1], "input_data_file": IMAGE_BYTES}},
            }
        ],
    }


def ensemble_config(
    name: str, head: str, version: int, manifest: Manifest, options: RepositoryOptions, tensor: bool
) -> dict:
    """image_bytes (or image) -> [preprocess ->] backbone -> head version ``version``."""
    steps = (
        []
        if tensor
        else [
            {
                "model_name": PREPROCESS,
                "model_version": -1,
                "input_map": {IMAGE_BYTES: IMAGE_BYTES},
                "output_map": {IMAGE: IMAGE},
            }
        ]
    )
    steps += [
        {
            "model_name": backbone_model(name),
            "model_version": -1,
            "input_map": {IMAGE: IMAGE},
            "output_map": {EMBEDDING: EMBEDDING},
        },
        {
            "model_name": head_model(name, head),
            "model_version": version,
            "input_map": {EMBEDDING: EMBEDDING},
            "output_map": {LOGITS: LOGITS},
        },
    ]
    inp = (
        _tensor(IMAGE, "TYPE_UINT8", list(manifest.input_size)) if tensor else _tensor(IMAGE_BYTES, "TYPE_STRING", [1])
    )
    return {
        "name": ensemble_model(name, head, tensor),
        "platform": "ensemble",
        "max_batch_size": options.max_batch_size,
        "input": [inp],
        "output": [_tensor(LOGITS, "TYPE_FP32", [len(manifest.labels)], labels=True)],
        "ensemble_scheduling": {"step": steps},
    }


def router_config(name: str, manifest: Manifest, options: RepositoryOptions, backbone_sha256: str) -> dict:
    """The A/B router. No model_warmup: its BLS targets may not be loaded yet when it is warmed. In the python flavour
    on the CPU it runs the graphs itself: the backbone's (``backbone_sha256``) in runs of ``CPU_RUN_ROWS``, the
    heads'."""
    in_process = (
        _params(in_process="1", backbone_sha256=backbone_sha256, backbone_rows=str(CPU_RUN_ROWS))
        if options.flavour == "python" and not options.gpu
        else {}
    )
    return {
        "name": name,
        "backend": "python",
        "input": [
            _tensor(IMAGE_BYTES, "TYPE_STRING", [1]),
            _tensor(ROUTE_KEY, "TYPE_STRING", [1], optional=True),
            _tensor(ROUTE_HEAD, "TYPE_STRING", [1], optional=True),
        ],
        "output": [
            _tensor(LOGITS, "TYPE_FP32", [len(manifest.labels)], labels=True),
            _tensor(HEAD, "TYPE_STRING", [1]),
            _tensor(REQUEST_ID, "TYPE_STRING", [1]),
        ],
        **_served(options, gpu=False),
        "parameters": _params(
            route_file=ROUTE_FILE,
            poll="0.2",
            preprocessing=manifest.preprocessing,
            backbone_model=backbone_model(name),
            head_prefix=head_model(name, ""),
            precision=options.precision,
        )
        | in_process,
    }
