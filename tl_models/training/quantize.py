"""int8 backbones behind an accuracy gate: `tl-models quantize BUILD`.

ONNX Runtime's ``quant_pre_process`` then ``quantize_static`` (QDQ, S8S8) turn ``backbone.onnx`` into
``backbone.int8.onnx``, calibrated on the build's own training images. Heads stay fp32 (a D×C matmul). The gate
runs each head's latest version on the build's validation split twice, on fp32 and on int8 embeddings, and
accepts only when every head's top-1 agreement and val accuracy drop are within bounds. When the asked-for
calibration fails the gate, the other settings are tried in turn; when none passes, nothing is written.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import BadRequest, BuildError
from ..core.files import atomic_write_bytes
from ..core.manifest import BuildDir, HeadEntry, Manifest
from ..core.names import BACKBONE_INT8, BACKBONE_ONNX, EMBEDDING, HEAD_ONNX, IMAGE, LOGITS
from ..core.preprocess import Preprocessing
from ..core.runtime import create_session
from .data import load_data

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
# activation and weight integer types: s8s8 for CPUs with VNNI/AMX; u8u8 where they lack it (AVX2 only), since ONNX
# Runtime's s8 kernels there multiply through int16 and saturate (mobilenet_v2 on the digits, AVX2: top-1 agreement
# with fp32 0.49 as s8s8, 0.86 as u8u8)
TYPES = ("s8s8", "u8u8")


class QuantizeRefused(Exception):
    """No calibration setting tried gave an int8 backbone within the gate; the build was left as it was."""


@dataclass(frozen=True)
class Calibration:
    """How the int8 backbone is calibrated: method, per-channel weights, how many training images."""

    method: str = "minmax"
    per_channel: bool = True  # mobilenet_v2 on the digits here: embedding cosine to fp32 0.72 per channel, 0.53 not
    images: int = 64
    types: str = "s8s8"

    def check(self) -> "Calibration":
        if self.method not in METHODS:
            raise BadRequest(f"unknown calibration method {self.method!r}; use one of {', '.join(METHODS)}")
        if not 1 <= self.images <= 1024:
            raise BadRequest(f"calibration images must be 1 to 1024, got {self.images}")
        if self.types not in TYPES:
            raise BadRequest(f"unknown integer types {self.types!r}; use one of {', '.join(TYPES)}")
        return self

    def label(self) -> str:
        return f"{self.types} {self.method}, per-channel {'on' if self.per_channel else 'off'}, {self.images} images"


@dataclass(frozen=True)
class Gate:
    """What an int8 backbone must keep, per head, on the validation split."""

    min_agreement: float = 0.99
    max_accuracy_drop: float = 0.01

    def admits(self, measured: dict[str, dict]) -> bool:
        """Whether every head's measures (from :meth:`_Judge.measure`) are within bounds."""
        return all(m["agreement"] >= self.min_agreement and m["accuracy_drop"] <= self.max_accuracy_drop
                   for m in measured.values())


@dataclass
class Attempt:
    """One calibration setting and what the gate measured for each head ("name:version")."""

    calibration: Calibration
    heads: dict[str, dict] = field(default_factory=dict)
    passed: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"calibration": asdict(self.calibration), "heads": self.heads, "passed": self.passed,
                "seconds": round(self.seconds, 2)}


@dataclass
class QuantizeReport:
    """Every attempt, in order; the last one passed when the int8 backbone was written."""

    gate: Gate
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def passed(self) -> Attempt | None:
        return next((a for a in self.attempts if a.passed), None)

    def table(self) -> str:
        lines = [f"gate: top-1 agreement >= {self.gate.min_agreement:g}, val accuracy drop <= "
                 f"{self.gate.max_accuracy_drop:g} per head"]
        for attempt in self.attempts:
            lines.append(f"  {attempt.calibration.label()}: {'passed' if attempt.passed else 'refused'} "
                         f"({attempt.seconds:.1f} s)")
            for key, m in attempt.heads.items():
                lines.append(f"    {key:<20} agreement {m['agreement']:.4f}  val accuracy fp32 {m['fp32_accuracy']:.4f}"
                             f" int8 {m['int8_accuracy']:.4f}  drop {m['accuracy_drop']:+.4f}")
        return "\n".join(lines)


def candidates(asked: Calibration, search: bool) -> list[Calibration]:
    """The asked-for setting first, then (with ``search``) the others this command offers."""
    others = [Calibration(method, per_channel, asked.images, types) for types in (asked.types, *TYPES)
              for method in METHODS for per_channel in (False, True)]
    others = list(dict.fromkeys(others))  # asked.types first, each setting once
    return [asked] + ([c for c in others if c != asked] if search else [])


@dataclass
class _Split:
    """The images the gate and the calibration use: one data set's train (calibration) and val (gate) images."""

    train: np.ndarray
    val: np.ndarray
    val_targets: np.ndarray


def _data_key(entry: HeadEntry) -> tuple:
    """What decides a head's train/val images: its data set and how its build split it."""
    return entry.data["root"], entry.data["content_hash"], entry.data.get("val_fraction"), entry.train["seed"]


def _split_of(entry: HeadEntry, preprocessing: Preprocessing, calibration_images: int) -> _Split:
    """The head's own data, split as its build split it (seed and val fraction from its entry)."""
    from .features import load_images  # torch: imported here so that the CLI can catch QuantizeRefused without it

    data = load_data(entry.data["root"])
    if data.content_hash() != entry.data["content_hash"]:
        raise BuildError(f"the images under {entry.data['root']} changed since head {entry.key} was built: the gate "
                         "measures on the data the heads were trained on")
    fraction = entry.data.get("val_fraction", 0.2)
    train, val = data.split(fraction, entry.train["seed"])
    if (len(train), len(val)) != (entry.data["train"], entry.data["val"]):
        raise BuildError(f"cannot reproduce the train/val split of head {entry.key}: build it again")
    step = max(1, len(train) // calibration_images)
    chosen = train[::step][:calibration_images]
    return _Split(load_images(data.subset(chosen), preprocessing, progress=False),
                  load_images(data.subset(val), preprocessing, progress=False),
                  np.array([data.targets[i] for i in val]))


class _Reader:
    """A calibration data reader for ONNX Runtime: one image per call."""

    def __init__(self, images: np.ndarray):
        self._rows = iter(images)

    def get_next(self) -> dict | None:
        row = next(self._rows, None)
        return None if row is None else {IMAGE: row[None]}


def prepare(source: Path, out: Path) -> None:
    """ONNX Runtime's pre-processing for quantisation (shape inference, graph optimisation), once per graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(source), str(out))


def quantize_graph(prepared: Path, images: np.ndarray, calibration: Calibration, out: Path) -> None:
    """Static int8 QDQ of a prepared image -> embedding graph, calibrated on uint8 ``images``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibration.method]
    kind = {"s8s8": QuantType.QInt8, "u8u8": QuantType.QUInt8}[calibration.types]
    quantize_static(str(prepared), str(out), _Reader(images), quant_format=QuantFormat.QDQ,
                    per_channel=calibration.per_channel, activation_type=kind, weight_type=kind,
                    calibrate_method=method)


def _embed(session, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([session.run([EMBEDDING], {IMAGE: images[i:i + batch]})[0]
                           for i in range(0, len(images), batch)])


class _Judge:
    """The gate's fixed side, computed once: each head's session, its validation split and its fp32 top-1."""

    def __init__(self, build: BuildDir, heads: list[HeadEntry], splits: dict[str, _Split]):
        fp32 = create_session(build.file(BACKBONE_ONNX), providers="cpu", name="backbone fp32")
        self.splits = splits
        self.heads = {h.key: create_session(build.file(h.rel(HEAD_ONNX)), providers="cpu", threads=1,
                                            name=f"head {h.key}") for h in heads}
        embeddings = self._per_split(lambda split: _embed(fp32, split.val))
        self.fp32_top1 = {key: self._top1(key, embeddings[id(splits[key])]) for key in self.heads}

    def _per_split(self, run) -> dict[int, np.ndarray]:
        """``run(split)`` once per distinct split (heads trained on the same images share theirs)."""
        return {id(split): run(split) for split in {id(s): s for s in self.splits.values()}.values()}

    def _top1(self, key: str, embeddings: np.ndarray) -> np.ndarray:
        return self.heads[key].run([LOGITS], {EMBEDDING: embeddings})[0].argmax(1)

    def measure(self, int8: Path) -> dict[str, dict]:
        """Per head: top-1 agreement and val accuracy on fp32 vs int8 embeddings of its val split."""
        session = create_session(int8, providers="cpu", name="backbone int8")
        embeddings = self._per_split(lambda split: _embed(session, split.val))
        measured = {}
        for key, fp32 in self.fp32_top1.items():
            split = self.splits[key]
            int8_top1 = self._top1(key, embeddings[id(split)])
            fp32_accuracy = float((fp32 == split.val_targets).mean())
            int8_accuracy = float((int8_top1 == split.val_targets).mean())
            measured[key] = {"agreement": float((fp32 == int8_top1).mean()), "fp32_accuracy": fp32_accuracy,
                             "int8_accuracy": int8_accuracy, "accuracy_drop": fp32_accuracy - int8_accuracy,
                             "val_images": int(len(split.val))}
        return measured


def _gated_heads(build: BuildDir, manifest: Manifest, calibration_images: int) -> tuple[list[HeadEntry],
                                                                                     dict[str, _Split]]:
    """The heads the gate measures (the latest version of each) and their images."""
    heads = [manifest.head(name, version) for name, version in sorted(manifest.latest_versions().items())]
    missing = [h.key for h in heads if h.rel(HEAD_ONNX) not in manifest.files]
    if missing:
        raise BuildError(f"heads {missing} of {build.path} have no {HEAD_ONNX}: run `tl-models export` first")
    preprocessing = Preprocessing.from_dict(manifest.preprocessing)
    by_data: dict[tuple, _Split] = {}  # heads trained on the same images and split share one load
    for head in heads:
        if _data_key(head) not in by_data:
            by_data[_data_key(head)] = _split_of(head, preprocessing, calibration_images)
    return heads, {h.key: by_data[_data_key(h)] for h in heads}


def int8_parity(build: BuildDir, manifest: Manifest) -> dict:
    """`tl-models parity` of the int8 backbone: the gate's measures (agreement with fp32 ONNX Runtime, val accuracy
    drop) of the file as it is now, against the bounds it was admitted with."""
    gate = Gate(**manifest.int8["gate"])
    heads, splits = _gated_heads(build, manifest, calibration_images=1)
    measured = _Judge(build, heads, splits).measure(build.file(BACKBONE_INT8))
    return {"graph": BACKBONE_INT8, "gate": asdict(gate), "heads": measured, "passed": gate.admits(measured)}


def quantize(path: str | Path, calibration: Calibration = Calibration(), gate: Gate = Gate(), search: bool = True,
             calibration_images: np.ndarray | None = None) -> QuantizeReport:
    """Write ``backbone.int8.onnx`` into the build when a calibration passes the gate; QuantizeRefused (the build
    unchanged) when none does. ``calibration_images`` (uint8 N×3×H×W) replaces the build's training images."""
    calibration = calibration.check()
    build = BuildDir(path)
    report = QuantizeReport(gate)
    with build.lock():
        manifest = build.verify()
        if BACKBONE_ONNX not in manifest.files:
            raise BuildError(f"{build.path} has no {BACKBONE_ONNX}: run `tl-models export {build.path}` first")
        heads, splits = _gated_heads(build, manifest, calibration.images)
        calibrate = calibration_images if calibration_images is not None else splits[heads[0].key].train
        judge = _Judge(build, heads, splits)
        with tempfile.TemporaryDirectory(prefix="tl-quantize-") as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            prepare(build.file(BACKBONE_ONNX), prepared)
            for candidate in candidates(calibration, search):
                start, out = time.perf_counter(), Path(tmp) / f"int8-{len(report.attempts)}.onnx"
                quantize_graph(prepared, calibrate[:candidate.images], candidate, out)
                attempt = Attempt(candidate, judge.measure(out))
                attempt.passed = gate.admits(attempt.heads)
                attempt.seconds = time.perf_counter() - start
                report.attempts.append(attempt)
                log.info("int8 calibration %s: %s", candidate.label(), "passed" if attempt.passed else "refused")
                if attempt.passed:
                    _commit(build, manifest, heads, out, report)
                    return report
    raise QuantizeRefused(f"no int8 backbone of {build.path} passed the gate; the build is unchanged\n{report.table()}")


def _commit(build: BuildDir, manifest: Manifest, heads: list[HeadEntry], int8: Path, report: QuantizeReport) -> None:
    """Move the passing int8 backbone into the build and record its settings and the gate's figures."""
    atomic_write_bytes(build.file(BACKBONE_INT8), int8.read_bytes())
    if BACKBONE_INT8 not in manifest.top_files:
        manifest.top_files.append(BACKBONE_INT8)
    gated = {h.key: manifest.files[h.rel(HEAD_ONNX)] for h in heads}  # what serves on it: core.heads.int8_gated
    manifest.int8 = {"file": BACKBONE_INT8, "backbone_sha256": manifest.backbone_sha256(), "gated": gated,
                     "calibration": asdict(report.passed.calibration), "gate": asdict(report.gate),
                     "attempts": [a.to_dict() for a in report.attempts]}
    build.commit(manifest, rewritten=(BACKBONE_INT8,))
