"""`tl-models report`: how the heads did on served traffic, as a table, JSON and a PNG.

From an embedding log (``--log``): per head, the records it was scored on, top-1 agreement with the head that
answered, accuracy on the records with feedback, and per time slice the drift of the served embeddings from each
head's training embeddings (references read from ``--build``; slices of at least 32 records) and each head's
accuracy. From a running service (``--url``): its ``GET /heads`` (live and shadow heads, agreement, feedback
accuracy, drift) as the same kind of table.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np

from .core.drift import DRIFT_THRESHOLD, MIN_WINDOW, EmbeddingReference
from .core.embedding_log import FROZEN_PATH, EmbeddingLog
from .core.errors import BadRequest
from .core.manifest import BuildDir
from .core.names import EMBEDDING_REFERENCE


def _references(build: Path | None, heads: list[str]) -> dict[str, tuple[EmbeddingReference, str]]:
    """The embedding references of ``heads`` ("name:version") found in the build directory, each with the log
    ``path`` of the embeddings it is compared with (a fine-tuned version's own, else the frozen backbone's)."""
    if build is None:
        return {}
    build_dir = BuildDir(build)
    return {
        entry.key: (
            EmbeddingReference.from_dict(json.loads(build_dir.file(entry.rel(EMBEDDING_REFERENCE)).read_text())),
            FROZEN_PATH if entry.tail is None else entry.key,
        )
        for entry in build_dir.verify().heads
        if entry.key in heads and EMBEDDING_REFERENCE in entry.files
    }


def log_report(log: EmbeddingLog, build: Path | None = None, slices: int = 10) -> dict:
    """Per head and per time slice (equal record counts) figures of an embedding log."""
    if slices < 1:
        raise BadRequest(f"--slices must be at least 1, got {slices}")
    columns = log.columns
    order = np.argsort(columns["time"], kind="stable")
    embeddings = columns["embedding"][order]
    times, answered = columns["time"][order], [str(h) for h in columns["head"][order]]
    paths = np.asarray([str(path) for path in columns["path"][order]])
    predictions = [json.loads(str(p)) for p in columns["predictions"][order]]
    labels = [log.labels.get(str(r)) for r in columns["request_id"][order]]
    top1 = [{key: top[0][0] for key, top in p.items() if top} for p in predictions]
    heads = sorted({key for p in top1 for key in p})
    references = _references(build, heads)

    def judge(rows: range | list[int]) -> dict[str, dict]:
        figures = {}
        for key in heads:
            scored = [i for i in rows if key in top1[i]]
            beside = [i for i in scored if answered[i] != key and answered[i] in top1[i]]
            labelled = [i for i in scored if labels[i] is not None]
            figures[key] = {
                "scored": len(scored),
                "answered": sum(answered[i] == key for i in scored),
                "agreement": float(np.mean([top1[i][key] == top1[i][answered[i]] for i in beside])) if beside else None,
                "labelled": len(labelled),
                "accuracy": float(np.mean([top1[i][key] == labels[i] for i in labelled])) if labelled else None,
            }
        return figures

    timeline = []
    for chunk in np.array_split(np.arange(len(times)), min(slices, len(times))):
        rows = chunk.tolist()
        drift = {}
        for key, (reference, path) in references.items():
            own = chunk[paths[chunk] == path]  # a head against its own path's embeddings
            if len(own) >= MIN_WINDOW:  # fewer: sampling noise dominates
                drift[key] = reference.drift(embeddings[own].mean(axis=0))
        timeline.append(
            {
                "start": float(times[chunk[0]]),
                "end": float(times[chunk[-1]]),
                "records": len(rows),
                "drift": drift,
                "heads": judge(rows),
            }
        )
    return {
        "source": "log",
        "facts": log.facts,
        "records": len(times),
        "labelled": sum(x is not None for x in labels),
        "threshold": DRIFT_THRESHOLD,
        "heads": judge(range(len(times))),
        "timeline": timeline,
    }


def read_service(url: str, timeout: float = 30.0) -> dict:
    """:func:`service_report` of the BentoML service at ``url`` (its ``GET /heads``); :class:`BadRequest` when it
    cannot be reached or does not answer 200."""
    try:
        response = httpx.get(url.rstrip("/") + "/heads", timeout=timeout)
    except httpx.HTTPError as exc:
        raise BadRequest(f"cannot reach {url}: {exc}") from None
    if response.status_code != 200:
        raise BadRequest(f"{url}/heads answered {response.status_code}: {response.text[:200]}")
    return service_report(response.json())


def service_report(status: dict) -> dict:
    """The judging figures of a service's ``GET /heads`` answer, per live and shadow head."""
    heads = {}
    for entry in status.get("heads", []):
        heads[f"{entry['name']}:{entry['version']}"] = {
            "role": "live",
            "share": entry.get("share"),
            "requests": entry.get("requests"),
            "agreement": None,
            "labelled": entry.get("feedback", {}).get("labelled"),
            "accuracy": entry.get("feedback", {}).get("accuracy"),
            "drift": entry.get("drift"),
        }
    for entry in status.get("shadow", []):
        heads[f"{entry['name']}:{entry['version']}"] = {
            "role": "shadow",
            "share": entry.get("share"),
            "requests": entry.get("scored"),
            "agreement": entry.get("agreement"),
            "labelled": entry.get("feedback", {}).get("labelled"),
            "accuracy": entry.get("feedback", {}).get("accuracy"),
            "drift": entry.get("drift"),
            "added_ms_per_image": entry.get("added_ms_per_image"),
        }
    drift = status.get("drift", {})
    return {
        "source": "service",
        "build": status.get("build"),
        "heads": heads,
        "threshold": drift.get("threshold", DRIFT_THRESHOLD),
        "recorder": status.get("recorder"),
    }


def _cell(value: object, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if percent else f"{value:.3f}"
    return str(value)


def table(report: dict) -> str:
    """The per-head table (and, for a log, the drift per time slice)."""
    if report["source"] == "service":
        header = ["head", "role", "share", "requests", "agreement", "labelled", "accuracy", "drift"]
        rows = [
            [
                key,
                h["role"],
                _cell(h["share"], True),
                _cell(h["requests"]),
                _cell(h["agreement"], True),
                _cell(h["labelled"]),
                _cell(h["accuracy"], True),
                _cell(h["drift"]),
            ]
            for key, h in report["heads"].items()
        ]
    else:
        header = ["head", "scored", "answered", "agreement", "labelled", "accuracy"]
        rows = [
            [
                key,
                _cell(h["scored"]),
                _cell(h["answered"]),
                _cell(h["agreement"], True),
                _cell(h["labelled"]),
                _cell(h["accuracy"], True),
            ]
            for key, h in report["heads"].items()
        ]
    lines = _aligned(header, rows)
    if report["source"] == "log" and any(s["drift"] for s in report["timeline"]):
        keys = sorted({k for s in report["timeline"] for k in s["drift"]})
        lines += ["", f"drift per time slice (threshold {report['threshold']}):"]
        lines += _aligned(
            ["slice", "records"] + keys,
            [
                [str(i), str(s["records"])] + [_cell(s["drift"].get(k)) for k in keys]
                for i, s in enumerate(report["timeline"])
            ],
        )
    return "\n".join(lines)


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(f"{c:>{w}}" for c, w in zip(r, widths)) for r in [header, *rows]]


def plot(report: dict, path: str | Path) -> None:
    """Log: drift and accuracy per time slice, one line per head. Service: accuracy and agreement per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if report["source"] == "log":
        slices = range(len(report["timeline"]))
        for key in sorted({k for s in report["timeline"] for k in s["drift"]}):
            left.plot(slices, [s["drift"].get(key, np.nan) for s in report["timeline"]], marker="o", label=key)
        left.axhline(report["threshold"], color="red", linestyle="--", label="threshold")
        left.set(xlabel="time slice (equal record counts)", ylabel="drift (training spreads)", title="embedding drift")
        for key in report["heads"]:
            values = [s["heads"][key]["accuracy"] for s in report["timeline"]]
            right.plot(slices, [np.nan if v is None else v for v in values], marker="o", label=key)
        right.set(
            xlabel="time slice", ylabel="accuracy on labelled requests", title="accuracy with feedback", ylim=(0, 1.02)
        )
    else:
        keys = list(report["heads"])
        x = np.arange(len(keys))
        for offset, field, label in ((-0.2, "accuracy", "accuracy (feedback)"), (0.2, "agreement", "agreement")):
            values = [report["heads"][k][field] for k in keys]
            right.bar(x + offset, [np.nan if v is None else v for v in values], width=0.4, label=label)
        right.set_xticks(x, [f"{k}\n{report['heads'][k]['role']}" for k in keys])
        right.set(ylim=(0, 1.02), title="per head")
        drift = [report["heads"][k]["drift"] for k in keys]
        left.bar(x, [np.nan if v is None else v for v in drift])
        left.axhline(report["threshold"], color="red", linestyle="--", label="threshold")
        left.set_xticks(x, keys)
        left.set(ylabel="drift (training spreads)", title="embedding drift of the recent window")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
