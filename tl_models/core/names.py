"""One table of names: every file of a build directory and a Triton repository, every tensor, and the one rule
for head and build names (checked here and nowhere else)."""

from __future__ import annotations

import re

from .errors import BadRequest

# ---------------------------------------------------------------- a build directory
MANIFEST = "manifest.json"
BACKBONE_PT = "backbone.pt"  # backbone state_dict (frozen, or fine-tuned with --unfreeze-last)
BACKBONE_ONNX = "backbone.onnx"  # image -> embedding
BACKBONE_FP16 = "backbone.fp16.onnx"  # the same in fp16 (GPU serving), with `tl-models export --fp16`
BACKBONE_INT8 = "backbone.int8.onnx"  # static int8 QDQ (CPU serving), with `tl-models quantize` past its gate
BACKBONE_FILES = {"fp32": BACKBONE_ONNX, "int8": BACKBONE_INT8}  # the backbone graph served at each precision
HEAD_PT = "head.pt"  # per head version: head state_dict
HEAD_ONNX = "head.onnx"  # per head version: embedding -> logits
FUSED_ONNX = "fused.onnx"  # per head version, only with --fused: image -> logits in one file
FUSED_FP16 = "fused.fp16.onnx"  # the same from backbone.fp16.onnx, with --fused --fp16
PARITY_JSON = "parity.json"
PSEUDO_LABELS_JSON = "pseudo_labels.json"  # per head version built with --unlabeled: the pseudo-labels it used
EMBEDDING_REFERENCE = "embedding_reference.json"  # per head version: its training embeddings summarised (drift)
EMBEDDING_REFERENCE_KEY = "embedding_reference"  # the same inside head.onnx's metadata (travels with the head)
METADATA_PREFIX = "tl_models."  # keys of our ONNX graphs' metadata_props
HISTORY_JSON = "history.json"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"
HEADS_DIR = "heads"  # heads/<name>/<version>/
TAIL_PT = "tail.pt"  # per fine-tuned version with a tail of its own: the tail's state_dict (its last N stages)
TAIL_ONNX = "tail.onnx"  # the same version's tail: activation -> embedding


def trunk_onnx(stages: int) -> str:
    """The build's trunk for tails of ``stages`` stages: image -> activation (shared by every such version)."""
    return f"trunk-{stages}.onnx"


def frozen_tail_onnx(stages: int) -> str:
    """The build's frozen backbone's own last ``stages`` stages: activation -> embedding (the frozen heads' path
    when a trunk runs)."""
    return f"tail-{stages}.onnx"


# ---------------------------------------------------------------- tensors (ONNX graphs and Triton models)
IMAGE = "image"  # uint8 N×3×H×W RGB
EMBEDDING = "embedding"  # float32 N×D
ACTIVATION = "activation"  # float32 N×... : a trunk's output, a tail's input
LOGITS = "logits"  # float32 N×C
IMAGE_BYTES = "image_bytes"  # Triton: encoded image, BYTES
ROUTE_KEY = "route_key"  # Triton router: sticky split key (optional)
ROUTE_HEAD = "route_head"  # Triton router: force a head (optional)
HEAD = "head"  # Triton router output: "name:version"
REQUEST_ID = "request_id"  # Triton router output: one id per image (core.feedback.request_ids)

# ---------------------------------------------------------------- a Triton model repository
CONFIG = "config.pbtxt"
LABELS = "labels.txt"
ROUTE_FILE = "route.json"  # also a BentoML service's route, in its state directory
CATALOG_FILE = "heads.json"  # a BentoML service's head catalog, in its state directory beside its route
VERSION_ONNX = "model.onnx"  # the ONNX graph of one Triton model version (a backbone or one head)
VERSION_SHA256 = VERSION_ONNX + ".sha256"
VERSION_HEAD = "head.json"  # a head version's source facts (labels, backbone sha256), for admission
VERSION_BACKBONE = "backbone.json"  # the backbone version's facts: fp32 sha256, precision, int8-gated heads
PREPROCESS = "preprocess"  # the shared preprocess model
ADMIN_HEADER = "tl-models-admin"  # header with TL_MODELS_ADMIN_TOKEN for Triton's restricted model control

# ---------------------------------------------------------------- names users choose
NAME_RULE = "1 to 63 lowercase letters, digits, '_' or '-', starting with a letter or digit"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def check_name(name: object, what: str = "head name") -> str:
    """``name`` when it follows :data:`NAME_RULE`, else :class:`~tl_models.core.errors.BadRequest`.

    Head and build names become directory names, Triton model names and BentoML tags (which lowercase): one rule
    keeps them all valid and distinct, with no path parts."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadRequest(f"bad {what} {name!r}: use {NAME_RULE}")
    return name
