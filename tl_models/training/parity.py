"""PyTorch vs ONNX Runtime parity: named tolerances, a JSON report, and an error that shows the worst difference.

Pass criterion per output (numpy ``allclose`` semantics): ``|onnx - torch| <= atol + rtol * |torch|``
everywhere, every value finite, and top-1 agreement of logits at least ``min_agreement``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..core.names import EMBEDDING, IMAGE, LOGITS
from .quantize import Gate

FP32 = {"atol": 1e-4, "rtol": 1e-3, "min_agreement": 1.0}
FP16 = {"atol": 0.0, "rtol": 0.0, "min_agreement": 0.99, "atol_of_max": 0.01}
BATCH_SIZES = (1, 7, 32)


class ParityError(AssertionError):
    """ONNX Runtime outputs differ from PyTorch past tolerance; the message names the output and the worst case."""


@dataclass(frozen=True)
class Tolerance:
    """Tolerances of one parity check."""

    atol: float = FP32["atol"]
    rtol: float = FP32["rtol"]
    min_agreement: float = FP32["min_agreement"]
    atol_of_max: float = 0.0  # adds this fraction of the largest reference magnitude to atol (fp16: 1%)


@dataclass
class OutputCheck:
    """One output at one batch size: worst differences, top-1 agreement, finiteness, verdict."""

    graph: str
    output: str
    batch: int
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float | None
    finite: bool
    reference_spread: float
    passed: bool
    worst_index: list[int] = field(default_factory=list)


def compare(
    graph: str, output: str, reference: np.ndarray, actual: np.ndarray, tolerance: Tolerance, classify: bool
) -> OutputCheck:
    """Compare one ONNX Runtime output against its PyTorch reference."""
    reference = np.asarray(reference, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if reference.shape != actual.shape:
        raise ParityError(f"{graph}/{output}: shape {actual.shape} from ONNX Runtime, {reference.shape} from PyTorch")
    finite = bool(np.isfinite(actual).all() and np.isfinite(reference).all())
    diff = np.abs(actual - reference)
    atol = tolerance.atol + tolerance.atol_of_max * float(np.abs(reference).max(initial=0.0))
    rel = diff / np.maximum(np.abs(reference), max(atol, 1e-12))
    excess = diff - (atol + tolerance.rtol * np.abs(reference))
    agreement = float((actual.argmax(1) == reference.argmax(1)).mean()) if classify else None
    passed = finite and bool((excess <= 0).all()) and (agreement is None or agreement >= tolerance.min_agreement)
    worst = np.unravel_index(int(np.nanargmax(excess)), excess.shape) if excess.size else ()
    return OutputCheck(
        graph,
        output,
        int(reference.shape[0]),
        float(np.nanmax(diff)),
        float(np.nanmax(rel)),
        agreement,
        finite,
        float(reference.std(axis=0).mean()) if len(reference) > 1 else 0.0,
        passed,
        [int(i) for i in worst],
    )


@dataclass
class ParityReport:
    """All checks of one run, with the tolerance used."""

    tolerance: Tolerance
    checks: list[OutputCheck] = field(default_factory=list)
    providers: dict[str, str] = field(default_factory=dict)
    int8: dict | None = None  # the int8 backbone, judged by its gate (quantize.int8_parity), not by tolerances

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and (self.int8 is None or self.int8["passed"])

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "tolerance": asdict(self.tolerance),
            "providers": self.providers,
            "checks": [asdict(c) for c in self.checks],
            "int8": self.int8,
        }

    def table(self) -> str:
        """Human-readable table, one row per graph/output/batch."""
        rows = [f"{'graph':<28} {'output':<10} {'batch':>5} {'max abs':>10} {'max rel':>10} {'top-1':>7}  result"]
        for c in self.checks:
            top1 = f"{c.top1_agreement:.3f}" if c.top1_agreement is not None else "-"
            verdict = "ok" if c.passed else ("NON-FINITE" if not c.finite else "FAIL")
            rows.append(
                f"{c.graph:<28} {c.output:<10} {c.batch:>5} {c.max_abs_diff:>10.2e} "
                f"{c.max_rel_diff:>10.2e} {top1:>7}  {verdict}"
            )
        rows.append(f"tolerance: {self.tolerance_text()}")
        if self.int8 is not None:
            gate = self.int8["gate"]
            rows.append(
                f"{self.int8['graph']} against fp32 ONNX Runtime on each head's val split (gate: top-1 "
                f"agreement >= {gate['min_agreement']:g}, val accuracy drop <= {gate['max_accuracy_drop']:g}):"
            )
            for key, m in self.int8["heads"].items():
                verdict = "ok" if Gate(**gate).admits({key: m}) else "FAIL"
                rows.append(
                    f"  {key:<20} agreement {m['agreement']:.4f}  val accuracy fp32 {m['fp32_accuracy']:.4f} "
                    f"int8 {m['int8_accuracy']:.4f}  drop {m['accuracy_drop']:+.4f}  {verdict}"
                )
        return "\n".join(rows)

    def raise_on_failure(self) -> None:
        """ParityError naming the failing output and its worst difference."""
        failed = [c for c in self.checks if not c.passed]
        if not failed and self.int8 is not None and not self.int8["passed"]:
            raise ParityError(
                f"{self.int8['graph']} no longer passes the gate it was admitted with: run `tl-models quantize` again"
            )
        if not failed:
            return
        worst = max(failed, key=lambda c: c.max_abs_diff if np.isfinite(c.max_abs_diff) else np.inf)
        detail = (
            "non-finite values"
            if not worst.finite
            else (
                f"max abs diff {worst.max_abs_diff:.3e} (max rel {worst.max_rel_diff:.3e}) at index {worst.worst_index}"
            )
        )
        if worst.top1_agreement is not None and worst.top1_agreement < self.tolerance.min_agreement:
            detail += f", top-1 agreement {worst.top1_agreement:.3f} < {self.tolerance.min_agreement:g}"
        raise ParityError(
            f"parity failed for {worst.graph}/{worst.output} at batch {worst.batch}: {detail} "
            f"({self.tolerance_text()}); {len(failed)} of {len(self.checks)} checks failed"
        )

    def tolerance_text(self) -> str:
        t = self.tolerance
        extra = f" + {t.atol_of_max:g} x max|reference|" if t.atol_of_max else ""
        return f"atol {t.atol:g}{extra}, rtol {t.rtol:g}, top-1 agreement >= {t.min_agreement:g}"


def parity_inputs(batch: int, input_size: list[int], images: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """uint8 batch: the given images repeated to ``batch``, else seeded random pixels (the inputs of a smaller
    batch are the first rows of a larger one's)."""
    if images is not None:
        return np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
    return np.random.default_rng(seed).integers(0, 256, (batch, *input_size), dtype=np.uint8)


def run_parity(
    backbone,
    input_size: list[int],
    backbone_onnx: str | bytes | None,
    heads: dict[str, tuple],
    tolerance: Tolerance = Tolerance(),
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    images: np.ndarray | None = None,
    providers: str | list[str] | None = None,
) -> ParityReport:
    """Check backbone.onnx (if given: a path or a graph's bytes), and per head ``label -> (torch head, head.onnx,
    fused graph: a path or its bytes)``, at each batch size.

    ``backbone`` is the PyTorch backbone module (uint8 image -> embedding); head inputs are its embeddings.
    """
    import torch

    from ..core.runtime import active_provider, create_session

    report = ParityReport(tolerance)
    # PyTorch runs once, on the largest batch: each smaller batch is its first rows (the inputs are prefixes of
    # one another), so the reference costs one batched pass instead of one per batch size
    largest = parity_inputs(max(batch_sizes), input_size, images)
    with torch.inference_mode():
        embedding = backbone(torch.from_numpy(largest)).numpy()
        logits = {label: head(torch.from_numpy(embedding)).numpy() for label, (head, _, _) in heads.items()}
    # (graph, output, its ONNX file, input name, input, reference, compare top-1?): one session at a time
    graphs = [("backbone", EMBEDDING, backbone_onnx, IMAGE, largest, embedding, False)] if backbone_onnx else []
    for label, (_, head_path, fused_path) in heads.items():
        graphs += [
            (f"{label}/head", LOGITS, head_path, EMBEDDING, embedding, logits[label], True),
            (f"{label}/fused", LOGITS, fused_path, IMAGE, largest, logits[label], True),
        ]
    for graph, output, model, name, inputs, reference, top1 in graphs:
        session = create_session(model, providers)
        report.providers[graph] = active_provider(session)
        for batch in batch_sizes:
            got = session.run(None, {name: np.ascontiguousarray(inputs[:batch])})[0]
            report.checks.append(compare(graph, output, reference[:batch], got, tolerance, top1))
        del session
    report.checks.sort(key=lambda check: batch_sizes.index(check.batch))  # batch by batch, graphs in order
    return report
