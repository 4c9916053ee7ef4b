"""ONNX export of a build: ``backbone.onnx`` (image -> embedding), per head ``head.onnx`` (embedding -> logits),
and the fused graph (image -> logits), composed in memory for parity and written as ``fused.onnx`` on request.

Images enter as uint8 RGB N×3×H×W; normalisation is inside the graph. Every graph has a dynamic batch axis,
explicit input/output names, one file (no external data), passes ``onnx.checker`` (full check) and carries
labels, preprocessing and head id in ``metadata_props``. The fused graph is the backbone and head graphs
composed with ``onnx.compose`` (the same nodes, no second trace of the backbone). A fine-tuned version's path is
a trunk (image -> activation), a tail (activation -> embedding) and its head, chained the same way
(``training.tails``). Weights (``backbone.pt``, ``head.pt``, ``tail.pt``) are written with :func:`atomic_save_torch`.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import onnx
import torch
from onnx import compose

from ..core.files import atomic_write_bytes
from ..core.manifest import HeadEntry, Manifest
from ..core.names import ACTIVATION, EMBEDDING, IMAGE, LOGITS, METADATA_PREFIX

log = logging.getLogger(__name__)

OPSET = 20


def _trace(
    module: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str, exporter: str = "torchscript"
) -> onnx.ModelProto:
    """Export with the TorchScript exporter (fast, deterministic) or the dynamo one (what TorchScript can't do)."""
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            buffer = io.BytesIO()
            torch.onnx.export(
                module,
                (example,),
                buffer,  # type: ignore[arg-type]  # stub says path only; the TorchScript exporter writes file objects
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
            return onnx.load_from_string(buffer.getvalue())
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        assert program is not None  # the dynamo exporter always returns its ONNXProgram
        return program.model_proto


def _finish(model: onnx.ModelProto, path: Path | None, metadata: dict[str, object]) -> bytes:
    """Add metadata, run the full checker; write atomically as one file when ``path`` is given; the bytes."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    if path is not None:
        atomic_write_bytes(path, data)
        log.info("wrote %s", path)
    return data


def export_backbone(
    module: torch.nn.Module, input_size: list[int], path: str | Path, metadata: dict, exporter: str = "torchscript"
) -> None:
    """image uint8 N×3×H×W -> embedding float32 N×D (``exporter`` from the backbone's registry entry)."""
    example = torch.randint(0, 256, (2, *input_size), dtype=torch.uint8)
    _finish(_trace(module, example, IMAGE, EMBEDDING, exporter), Path(path), {**metadata, "graph": "backbone"})


def export_trunk(
    module: torch.nn.Module, input_size: list[int], path: str | Path, metadata: dict, exporter: str = "torchscript"
) -> None:
    """A cut backbone's trunk: image uint8 N×3×H×W -> activation float32 (``training.cut``)."""
    example = torch.randint(0, 256, (2, *input_size), dtype=torch.uint8)
    _finish(_trace(module, example, IMAGE, ACTIVATION, exporter), Path(path), {**metadata, "graph": "trunk"})


def export_tail(
    module: torch.nn.Module,
    activation: tuple[int, ...] | list[int],
    path: str | Path,
    metadata: dict,
    exporter: str = "torchscript",
) -> None:
    """A cut backbone's tail: activation float32 N×``activation`` -> embedding float32 N×D."""
    example = torch.randn(2, *activation)
    _finish(_trace(module, example, ACTIVATION, EMBEDDING, exporter), Path(path), {**metadata, "graph": "tail"})


def export_head(head: torch.nn.Module, embedding_dim: int, path: str | Path, metadata: dict) -> None:
    """embedding float32 N×D -> logits float32 N×C."""
    example = torch.randn(2, embedding_dim)
    _finish(_trace(head, example, EMBEDDING, LOGITS), Path(path), {**metadata, "graph": "head"})


def fuse(backbone_path: str | Path, head_path: str | Path, metadata: dict, path: str | Path | None = None) -> bytes:
    """Compose a backbone and a head graph into one image -> logits graph (the same nodes); its bytes, also
    written to ``path`` when given (it holds a copy of the backbone: write it only where one file is wanted)."""
    return chain([backbone_path, head_path], {**metadata, "graph": "fused"}, path)


def chain(graphs: list[str | Path | bytes], metadata: dict, path: str | Path | None = None) -> bytes:
    """Compose graphs, each one's only output into the next one's only input (a trunk, a tail, a head: image ->
    logits), into one graph with the first's input and the last's output names; its bytes, also written to ``path``
    when given."""
    models = [onnx.load_from_string(g) if isinstance(g, bytes) else onnx.load(str(g)) for g in graphs]
    composed = models[0]
    del composed.metadata_props[:]
    for index, model in enumerate(models[1:], start=1):
        output, wanted = composed.graph.output[0].name, model.graph.output[0].name
        model = compose.add_prefix(model, prefix=f"g{index}/")
        del model.metadata_props[:]
        composed.ir_version = model.ir_version = max(composed.ir_version, model.ir_version)
        composed = compose.merge_models(composed, model, io_map=[(output, model.graph.input[0].name)])
        prefixed = f"g{index}/{wanted}"
        composed.graph.output[0].name = wanted
        for node in composed.graph.node:
            node.output[:] = [wanted if o == prefixed else o for o in node.output]
    return _finish(composed, Path(path) if path is not None else None, {"graph": "chain", **metadata})


def to_fp16(source: str | Path, path: str | Path, metadata: dict) -> None:
    """fp16 copy of a graph for GPU serving: weights and compute in fp16, inputs and outputs keep their types."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    _finish(model, Path(path), {**read_metadata(source), **metadata, "precision": "fp16"})


def build_metadata(manifest: Manifest, head: HeadEntry | None = None) -> dict:
    """metadata_props of a build's graphs: backbone, weights, preprocessing, labels and (for heads) head id."""
    meta = {
        "backbone": manifest.backbone,
        "weights": manifest.weights,
        "preprocessing": manifest.preprocessing,
        "labels": manifest.labels,
    }
    if head is not None:
        meta["head"] = head.key
    return meta


def read_metadata(path: str | Path) -> dict[str, object]:
    """The ``tl_models.*`` metadata of an ONNX file, JSON values decoded."""
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for entry in model.metadata_props:
        if entry.key.startswith(METADATA_PREFIX):
            key = entry.key.removeprefix(METADATA_PREFIX)
            try:
                out[key] = json.loads(entry.value)
            except json.JSONDecodeError:
                out[key] = entry.value
    return out


def atomic_save_torch(path: str | Path, obj: object) -> None:
    """Atomically ``torch.save`` an object (state_dicts only: they load back with weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
