"""int8 backbones behind an accuracy and a speed gate: `tl-models quantize BUILD`.

ONNX Runtime's ``quant_pre_process`` then ``quantize_static`` (QDQ) turn ``backbone.onnx`` into
``backbone.int8.onnx``, calibrated on the build's own training images. Heads stay fp32 (a D×C matmul). The gate
runs each head's latest version on the build's validation split twice, on fp32 and on int8 embeddings; a setting
passes accuracy when every head's top-1 agreement and val accuracy drop are within bounds. Every setting searched
that passes accuracy is timed against fp32 at batch 32 on this CPU, in alternation, and the fastest is chosen; it is
written only when it is at least ``min_speedup`` times fp32 (an int8 graph slower than fp32 is no product). The
record names the CPU class and ONNX Runtime it was measured on (:mod:`tl_models.core.cpu`): the servers refuse it
elsewhere until ``--verify`` has measured it there. When nothing passes, nothing is written.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.cpu import has_vnni, isa_class, this_machine
from ..core.errors import BadRequest, BuildError
from ..core.files import atomic_write_bytes
from ..core.heads import int8_gated, latest_frozen
from ..core.manifest import BuildDir, HeadEntry, Manifest, utc_now
from ..core.names import BACKBONE_INT8, BACKBONE_ONNX, EMBEDDING, HEAD_ONNX, IMAGE, LOGITS
from ..core.preprocess import Preprocessing
from ..core.runtime import create_session
from .data import load_data

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
# activation/weight integer types. u8s8 (uint8 activations, int8 weights) is what VNNI and AMX multiply natively:
# the fast one there (resnet50 b32 on a VNNI/AMX CPU: u8s8 2.7-3.0x fp32, s8s8 0.6-0.8x). Without VNNI (AVX2) the
# u8s8 kernels multiply through int16 and can saturate; ``reduce_range`` (7-bit weights) is ONNX Runtime's remedy,
# searched there. s8s8 also saturates on AVX2 (mobilenet_v2 on the digits: agreement 0.49 as s8s8, 0.86 as u8u8).
TYPES = ("u8s8", "s8s8", "u8u8")
SEARCHES = ("all", "types", "none")  # every setting, every integer type with the asked-for method, the asked-for one
SPEED_BATCH = 32  # the batch the speed gate times
SPEED_ROUNDS = 3  # timed batches of each graph, fp32 and int8 in alternation, after one warm-up each


class QuantizeRefused(Exception):
    """No calibration setting tried gave an int8 backbone within the gate (accuracy, then speed on this CPU); the
    build was left as it was."""


@dataclass(frozen=True)
class Calibration:
    """How the int8 backbone is calibrated: method, per-channel weights, how many training images."""

    method: str = "minmax"
    per_channel: bool = True  # mobilenet_v2 on the digits here: embedding cosine to fp32 0.72 per channel, 0.53 not
    images: int = 64
    types: str = "u8s8"
    reduce_range: bool = False  # 7-bit weights: ONNX Runtime's remedy for u8s8 saturation on CPUs without VNNI

    def check(self) -> Calibration:
        if self.method not in METHODS:
            raise BadRequest(f"unknown calibration method {self.method!r}; use one of {', '.join(METHODS)}")
        if not 1 <= self.images <= 1024:
            raise BadRequest(f"calibration images must be 1 to 1024, got {self.images}")
        if self.types not in TYPES:
            raise BadRequest(f"unknown integer types {self.types!r}; use one of {', '.join(TYPES)}")
        return self

    def label(self) -> str:
        """One line naming the setting, e.g. ``u8s8 minmax, per-channel on, 64 images``."""
        return (
            f"{self.types}{' reduce-range' if self.reduce_range else ''} {self.method}, per-channel "
            f"{'on' if self.per_channel else 'off'}, {self.images} images"
        )


@dataclass(frozen=True)
class Gate:
    """What an int8 backbone must keep, per head, on the validation split, and how much faster than fp32 it must
    run on this CPU."""

    min_agreement: float = 0.99
    max_accuracy_drop: float = 0.01
    min_speedup: float = 1.0  # int8 img/s over fp32 img/s at batch 32 on this CPU (older records lack it: 1.0)

    def admits(self, measured: dict[str, dict]) -> bool:
        """Whether every head's accuracy measures (from :meth:`_Judge.accuracy`) are within bounds."""
        return all(
            m["agreement"] >= self.min_agreement and m["accuracy_drop"] <= self.max_accuracy_drop
            for m in measured.values()
        )


@dataclass
class Attempt:
    """One calibration setting, what the gate measured for each head ("name:version") and, when it passed
    accuracy, its speed against fp32 on this CPU."""

    calibration: Calibration
    heads: dict[str, dict] = field(default_factory=dict)
    passed: bool = False  # accuracy
    speed: dict | None = None  # :func:`time_against_fp32`, for settings that passed accuracy
    seconds: float = 0.0

    @property
    def speedup(self) -> float:
        return self.speed["speedup"] if self.speed else 0.0

    def to_dict(self) -> dict:
        return {
            "calibration": asdict(self.calibration),
            "heads": self.heads,
            "passed": self.passed,
            "speed": self.speed,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class QuantizeReport:
    """Every attempt, in order, and the one chosen: the fastest that passed accuracy (None when none did)."""

    gate: Gate
    machine: dict = field(default_factory=this_machine)
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def chosen(self) -> Attempt | None:
        passing = [a for a in self.attempts if a.passed]
        return max(passing, key=lambda a: a.speedup) if passing else None

    def table(self) -> str:
        """The search as a table: setting, accuracy verdict, worst head's agreement and drop, img/s vs fp32."""
        gate, chosen = self.gate, self.chosen
        lines = [
            f"gate: top-1 agreement >= {gate.min_agreement:g}, val accuracy drop <= {gate.max_accuracy_drop:g} "
            f"per head; int8 >= {gate.min_speedup:g}x fp32 img/s at batch {SPEED_BATCH} on this CPU "
            f"({self.machine['isa']}, ONNX Runtime {self.machine['onnxruntime']})",
            f"  {'setting':<48} {'accuracy':<8} {'agreement':>9} {'drop':>8} {'int8 img/s':>10} "
            f"{'fp32 img/s':>10} {'vs fp32':>7}",
        ]
        for attempt in self.attempts:
            worst = min(attempt.heads.values(), key=lambda m: m["agreement"])
            drop = max(m["accuracy_drop"] for m in attempt.heads.values())
            speed = attempt.speed
            timing = (
                f"{speed['images_per_s']:>10.1f} {speed['fp32_images_per_s']:>10.1f} {speed['speedup']:>6.2f}x"
                if speed
                else f"{'-':>10} {'-':>10} {'-':>7}"
            )
            mark = " <- chosen" if attempt is chosen else ""
            lines.append(
                f"  {attempt.calibration.label():<48} {'passed' if attempt.passed else 'refused':<8} "
                f"{worst['agreement']:>9.4f} {drop:>+8.4f} {timing}{mark}"
            )
        lines.append("  (agreement: the lowest head's; drop: the largest head's)")
        return "\n".join(lines)


def candidates(asked: Calibration, search: str, isa: str | None = None) -> list[Calibration]:
    """The asked-for setting first, then the others ``search`` covers (``all``: every type, method and per-channel
    choice; ``types``: every integer type with the asked-for method; ``none``: no others). On a CPU without VNNI
    (``isa``, default this one's) u8s8 is also tried with ``reduce_range``."""
    if search not in SEARCHES:
        raise BadRequest(f"unknown search {search!r}; use one of {', '.join(SEARCHES)}")
    ranges = (False,) if has_vnni(isa or isa_class()) else (False, True)
    methods = METHODS if search == "all" else (asked.method,)
    channels = (False, True) if search == "all" else (asked.per_channel,)
    others = [
        Calibration(method, per_channel, asked.images, types, reduce_range)
        for types in (asked.types, *TYPES)
        for reduce_range in (ranges if types == "u8s8" else (False,))
        for method in methods
        for per_channel in channels
    ]
    others = list(dict.fromkeys(others))  # asked.types first, each setting once
    return [asked] + ([c for c in others if c != asked] if search != "none" else [])


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
        raise BuildError(
            f"the images under {entry.data['root']} changed since head {entry.key} was built: the gate "
            "measures on the data the heads were trained on"
        )
    fraction = entry.data.get("val_fraction", 0.2)
    train, val = data.split(fraction, entry.train["seed"])
    if (len(train), len(val)) != (entry.data["train"], entry.data["val"]):
        raise BuildError(f"cannot reproduce the train/val split of head {entry.key}: build it again")
    step = max(1, len(train) // calibration_images)
    chosen = train[::step][:calibration_images]
    return _Split(
        load_images(data.subset(chosen), preprocessing, progress=False),
        load_images(data.subset(val), preprocessing, progress=False),
        np.array([data.targets[i] for i in val]),
    )


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


@contextmanager
def _root_info_silenced() -> Iterator[None]:
    """Drops INFO records logged on the root logger itself: ONNX Runtime's quantizer writes one per tensor there
    (hundreds of "Created a copy of bias input" lines); records of named loggers pass untouched."""

    def warnings_and_above(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING

    root = logging.getLogger()
    root.addFilter(warnings_and_above)
    try:
        yield
    finally:
        root.removeFilter(warnings_and_above)


def quantize_graph(prepared: Path, images: np.ndarray, calibration: Calibration, out: Path) -> None:
    """Static int8 QDQ of a prepared image -> embedding graph, calibrated on uint8 ``images``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[calibration.method]
    kind = {"s": QuantType.QInt8, "u": QuantType.QUInt8}
    with _root_info_silenced():
        quantize_static(
            str(prepared),
            str(out),
            _Reader(images),
            quant_format=QuantFormat.QDQ,
            per_channel=calibration.per_channel,
            reduce_range=calibration.reduce_range,
            activation_type=kind[calibration.types[0]],
            weight_type=kind[calibration.types[2]],
            calibrate_method=method,
        )


def _embed(session, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate(
        [session.run([EMBEDDING], {IMAGE: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    )


def time_against_fp32(fp32, int8, images: np.ndarray, rounds: int = SPEED_ROUNDS) -> dict:
    """img/s of two backbone sessions on one batch of ``SPEED_BATCH`` of ``images`` (repeated as needed): one
    warm-up each, then ``rounds`` batches each in alternation, so that a neighbour's load hits both; the median
    batch time of each, and their ratio (``speedup``: int8 over fp32 img/s)."""
    batch = np.resize(images, (SPEED_BATCH, *images.shape[1:]))
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for round_ in range(rounds + 1):
        for name, session in (("fp32", fp32), ("int8", int8)):
            start = time.perf_counter()
            session.run([EMBEDDING], {IMAGE: batch})
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    fp32_s, int8_s = float(np.median(times["fp32"])), float(np.median(times["int8"]))
    return {
        "batch": SPEED_BATCH,
        "rounds": rounds,
        "images_per_s": round(SPEED_BATCH / int8_s, 2),
        "fp32_images_per_s": round(SPEED_BATCH / fp32_s, 2),
        "speedup": round(fp32_s / int8_s, 3),
    }


class _Judge:
    """The gate's fixed side, computed once: each head's session, its validation split and its fp32 top-1."""

    def __init__(self, build: BuildDir, heads: list[HeadEntry], splits: dict[str, _Split]):
        self.fp32 = fp32 = create_session(build.file(BACKBONE_ONNX), providers="cpu", name="backbone fp32")
        self.splits = splits
        self.heads = {
            h.key: create_session(build.file(h.rel(HEAD_ONNX)), providers="cpu", threads=1, name=f"head {h.key}")
            for h in heads
        }
        embeddings = self._per_split(lambda split: _embed(fp32, split.val))
        self.fp32_top1 = {key: self._top1(key, embeddings[id(splits[key])]) for key in self.heads}

    def _per_split(self, run) -> dict[int, np.ndarray]:
        """``run(split)`` once per distinct split (heads trained on the same images share theirs)."""
        return {id(split): run(split) for split in {id(s): s for s in self.splits.values()}.values()}

    def _top1(self, key: str, embeddings: np.ndarray) -> np.ndarray:
        return self.heads[key].run([LOGITS], {EMBEDDING: embeddings})[0].argmax(1)

    def measure(self, int8: Path, calibration: Calibration, gate: Gate) -> Attempt:
        """The gate on one int8 graph (made with ``calibration``): per head, top-1 agreement and val accuracy on fp32
        vs int8 embeddings of its val split; when every head is within bounds, its speed against fp32 on this CPU."""
        start = time.perf_counter()
        session = create_session(int8, providers="cpu", name="backbone int8")
        attempt = Attempt(calibration, self.accuracy(session))
        attempt.passed = gate.admits(attempt.heads)
        if attempt.passed:
            attempt.speed = time_against_fp32(self.fp32, session, next(iter(self.splits.values())).val)
        attempt.seconds = time.perf_counter() - start
        return attempt

    def accuracy(self, session) -> dict[str, dict]:
        """Per head: top-1 agreement and val accuracy on fp32 vs ``session``'s embeddings of its val split."""
        embeddings = self._per_split(lambda split: _embed(session, split.val))
        measured = {}
        for key, fp32 in self.fp32_top1.items():
            split = self.splits[key]
            int8_top1 = self._top1(key, embeddings[id(split)])
            fp32_accuracy = float((fp32 == split.val_targets).mean())
            int8_accuracy = float((int8_top1 == split.val_targets).mean())
            measured[key] = {
                "agreement": float((fp32 == int8_top1).mean()),
                "fp32_accuracy": fp32_accuracy,
                "int8_accuracy": int8_accuracy,
                "accuracy_drop": fp32_accuracy - int8_accuracy,
                "val_images": int(len(split.val)),
            }
        return measured


def _gated_heads(
    build: BuildDir, manifest: Manifest, calibration_images: int
) -> tuple[list[HeadEntry], dict[str, _Split]]:
    """The heads the gate measures (the latest version of each) and their images."""
    heads = latest_frozen(manifest)  # a tuned version runs its own tail, not this backbone
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
    if manifest.int8 is None:
        raise BuildError(f"{build.path} has {BACKBONE_INT8} but no int8 record: run `tl-models quantize {build.path}`")
    gate = Gate(**manifest.int8["gate"])
    heads, splits = _gated_heads(build, manifest, calibration_images=1)
    judge = _Judge(build, heads, splits)
    measured = judge.accuracy(create_session(build.file(BACKBONE_INT8), providers="cpu", name="backbone int8"))
    return {"graph": BACKBONE_INT8, "gate": asdict(gate), "heads": measured, "passed": gate.admits(measured)}


def _refusal(report: QuantizeReport, what: str) -> QuantizeRefused:
    """The gate's refusal: what failed on the first line, then the table of every attempt."""
    return QuantizeRefused(f"{what}; the build is unchanged\n{report.table()}")


def _verdict(build: BuildDir, report: QuantizeReport) -> Attempt:
    """The chosen attempt when it passed accuracy and is fast enough here; QuantizeRefused otherwise."""
    chosen, gate = report.chosen, report.gate
    if chosen is None:
        raise _refusal(report, f"no int8 backbone of {build.path} passed the accuracy gate")
    if chosen.speedup < gate.min_speedup:
        raise _refusal(
            report,
            f"the int8 backbone of {build.path} ({chosen.calibration.label()}) passes accuracy "
            f"but is {chosen.speedup:.2f}x fp32 here ({report.machine['isa']}, ONNX Runtime "
            f"{report.machine['onnxruntime']}; the gate asks >= {gate.min_speedup:g}x)",
        )
    return chosen


def quantize(
    path: str | Path,
    calibration: Calibration = Calibration(),
    gate: Gate = Gate(),
    search: str = "all",
    calibration_images: np.ndarray | None = None,
) -> QuantizeReport:
    """Write ``backbone.int8.onnx`` into the build: of the settings ``search`` covers (:func:`candidates`), the
    fastest on this CPU that passes accuracy, when it is at least ``gate.min_speedup`` times fp32; QuantizeRefused
    (the build unchanged) otherwise. ``calibration_images`` (uint8 N×3×H×W) replaces the build's training images."""
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
            graphs: dict[int, Path] = {}
            for candidate in candidates(calibration, search, report.machine["isa"]):
                start, out = time.perf_counter(), Path(tmp) / f"int8-{len(report.attempts)}.onnx"
                quantize_graph(prepared, calibrate[: candidate.images], candidate, out)
                attempt = judge.measure(out, candidate, gate)
                attempt.seconds = time.perf_counter() - start
                graphs[id(attempt)] = out
                report.attempts.append(attempt)
                log.info(
                    "int8 %s: %s%s",
                    candidate.label(),
                    "passed" if attempt.passed else "refused",
                    f", {attempt.speedup:.2f}x fp32" if attempt.speed else "",
                )
            chosen = _verdict(build, report)
            _commit(build, manifest, heads, graphs[id(chosen)], report)
    return report


def verify(path: str | Path) -> QuantizeReport:
    """`tl-models quantize BUILD --verify`: the gate again on this machine for the int8 backbone the build has (the
    stored calibration setting's graph): accuracy with the recorded bounds, then speed against fp32 here. Updates
    the record's figures and machine when it passes; QuantizeRefused, the build unchanged, when not."""
    build = BuildDir(path)
    with build.lock():
        manifest = build.verify()
        int8_gated(build, manifest)  # an int8 backbone of this backbone.onnx, measured with the latest heads
        record = manifest.int8
        assert record is not None  # int8_gated raised otherwise
        report = QuantizeReport(Gate(**record["gate"]))
        heads, splits = _gated_heads(build, manifest, calibration_images=1)
        report.attempts.append(
            _Judge(build, heads, splits).measure(
                build.file(BACKBONE_INT8), Calibration(**record["calibration"]), report.gate
            )
        )
        _verdict(build, report)
        manifest.int8 = {**record, **_figures(report), "verified": utc_now()}
        build.commit(manifest)
    return report


def _figures(report: QuantizeReport) -> dict:
    """The record's measured part: the chosen setting, every attempt, the machine it was measured on."""
    chosen = report.chosen
    assert chosen is not None and chosen.speed is not None  # _verdict passed it: accuracy, then speed
    return {
        "calibration": asdict(chosen.calibration),
        "heads": chosen.heads,
        "gate": asdict(report.gate),
        "attempts": [a.to_dict() for a in report.attempts],
        "chosen": report.attempts.index(chosen),
        "machine": {**report.machine, **chosen.speed, "measured": utc_now()},
    }


def _commit(build: BuildDir, manifest: Manifest, heads: list[HeadEntry], int8: Path, report: QuantizeReport) -> None:
    """Move the chosen int8 backbone into the build and record its settings, the search and the machine."""
    atomic_write_bytes(build.file(BACKBONE_INT8), int8.read_bytes())
    if BACKBONE_INT8 not in manifest.top_files:
        manifest.top_files.append(BACKBONE_INT8)
    gated = {h.key: manifest.files[h.rel(HEAD_ONNX)] for h in heads}  # what serves on it: core.heads.int8_gated
    manifest.int8 = {
        "file": BACKBONE_INT8,
        "backbone_sha256": manifest.backbone_sha256(),
        "gated": gated,
        **_figures(report),
    }
    build.commit(manifest, rewritten=(BACKBONE_INT8,))
