"""Ratios against ONNX Runtime, the targets judged on the median of rounds, the table."""

from __future__ import annotations

import numpy as np

from ..report import format_table
from .loopback import fmt_ms, stack_label
from .options import JUDGING_LOG_SHARE, MODES, TARGETS
from .variants import variant_rows, variant_targets


def add_ratios(figures: dict) -> None:
    """Server throughput / raw ORT best, p50 at concurrency 1 minus raw ORT batch-1 ms, server CPU per request minus
    raw ORT's least CPU per image and, at concurrency 1, minus one session's CPU per image at batch 1 (the pass a lone
    request gets: ``cpu_over_pass_ms``), on each server row (against ONNX Runtime of the same precision, in the same
    round). The references (``ort_best``, ``ort_decode_best``, ``ort_best_int8``): the median of the rounds', with
    each round's in ``rounds``."""
    references: dict[str, list[dict]] = {}
    for index in sorted({row["round"] for row in figures["in_process"]}):
        in_round = [r for r in figures["in_process"] if r["round"] == index]
        servers = [r for r in figures["servers"] if r["round"] == index]
        for name, reference in _round_ratios(in_round, servers).items():
            references.setdefault(name, []).append(reference)
    for name, per_round in references.items():
        each = [r["throughput"] for r in per_round]
        figures[name] = {**per_round[0], "throughput": _median(each), "rounds": each}


def _round_ratios(in_process_rows: list[dict], servers: list[dict]) -> dict[str, dict]:
    """:func:`add_ratios` for one round's rows; returns that round's references."""
    references: dict[str, dict] = {}
    decoding = [r for r in in_process_rows if r["decode"]]
    if decoding:
        references["ort_decode_best"] = {"throughput": max(r["throughput"] for r in decoding)}
    for precision in ("fp32", "int8"):
        ort = [r for r in in_process_rows if r["stack"] == stack_label("onnxruntime", precision) and not r["decode"]]
        if not ort:
            continue
        best = max(ort, key=lambda r: r["throughput"])
        references["ort_best" if precision == "fp32" else f"ort_best_{precision}"] = {
            "batch": best["batch"],
            "throughput": best["throughput"],
        }
        single = next((r for r in ort if r["batch"] == 1 and r.get("sessions", 1) == 1), None)
        leanest = min(r["cpu_ms_per_image"] for r in ort)
        for row in (r for r in servers if r["precision"] == precision):
            row["vs_ort_best"] = row["throughput"] / best["throughput"]
            if decoding and precision == "fp32":
                row["vs_ort_decode_best"] = row["throughput"] / references["ort_decode_best"]["throughput"]
            cpu = row.get("server_cpu_ms_per_request")
            if cpu is not None:
                row["cpu_over_ort_ms"] = cpu - leanest
            if row["concurrency"] == 1 and single is not None:  # against the pass a lone request gets
                if row["p50_ms"] is not None:
                    row["overhead_ms"] = row["p50_ms"] - single["ms_per_batch"]
                if cpu is not None:
                    row["cpu_over_pass_ms"] = cpu - single["cpu_ms_per_image"]
    return references


def _median(values: list[float]) -> float:
    return float(np.median(values))


def targets(figures: dict) -> list[dict]:
    """The issue's CPU targets, each with the measured value and whether it was met."""
    out = []
    top = max((r["concurrency"] for r in figures["servers"]), default=None)
    points: dict[tuple[str, int], list[dict]] = {}
    for row in figures["servers"]:
        points.setdefault((row["stack"], row["concurrency"]), []).append(row)
    for (stack, clients), rows in points.items():
        if clients == top and all("vs_ort_best" in r for r in rows):
            out.append(
                _target(
                    f"{stack}: throughput at concurrency {top} >= {TARGETS['throughput_ratio']}x raw ORT best",
                    [r["vs_ort_best"] for r in rows],
                    at_least=TARGETS["throughput_ratio"],
                    clean=all(r["errors"] == 0 for r in rows),
                )
            )
        if all("overhead_ms" in r for r in rows):
            out.append(
                _target(
                    f"{stack}: serving overhead at concurrency 1 <= {TARGETS['overhead_ms']} ms p50",
                    [r["overhead_ms"] for r in rows],
                    at_most=TARGETS["overhead_ms"],
                )
            )
        if all("cpu_over_ort_ms" in r for r in rows):
            out.append(
                _target(
                    f"{stack}: server CPU per request at concurrency {clients} <= raw ORT's least CPU per image + "
                    f"{TARGETS['cpu_over_ort_ms']} ms",
                    [r["cpu_over_ort_ms"] for r in rows],
                    at_most=TARGETS["cpu_over_ort_ms"],
                )
            )
    heads = figures.get("heads_cost")
    if heads:
        out.append(
            {
                "target": f"{figures['heads_count']} heads cost <= 10% more memory than 1 head",
                "value": heads["memory_ratio"],
                "met": heads["memory_ratio"] <= TARGETS["heads_memory"],
            }
        )
        swap = heads["swap"]
        out.append(
            {
                "target": "head swap under load < 1 s with zero failed requests",
                "value": swap["swap_s"],
                "met": swap["status"] == 200 and swap["swap_s"] < TARGETS["swap_s"] and swap["failed"] == 0,
            }
        )
    judging = figures.get("judging_cost")
    if judging:
        out.append(
            {
                "target": f"recording every answer keeps >= {TARGETS['recording_ratio']}x the throughput with the "
                f"recorder off at concurrency {judging['concurrency']}",
                "value": judging["recording_ratio"],
                "met": judging["recording_ratio"] >= TARGETS["recording_ratio"] and judging["on"]["errors"] == 0,
            }
        )
        out.append(
            {
                "target": f"one shadow head and {JUDGING_LOG_SHARE:.0%} logging keep >= "
                f"{TARGETS['judging_ratio']}x the recorder-off throughput at concurrency {judging['concurrency']}",
                "value": judging["ratio"],
                "met": judging["ratio"] >= TARGETS["judging_ratio"] and judging["judged"]["errors"] == 0,
            }
        )
    if figures.get("variant_cost"):
        out += variant_targets(figures["variant_cost"], figures["backbone"])
    return out


def _target(
    text: str, values: list[float], at_least: float | None = None, at_most: float | None = None, clean: bool = True
) -> dict:
    """A target judged on the median of its rounds' values (each round's in ``rounds``); ``clean``: no errors."""
    value = _median(values)
    met = clean and (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    return {"target": text, "value": value, "rounds": values, "met": met}


def format_figures(figures: dict) -> str:
    round_count = len({r["round"] for r in figures["in_process"] + figures["servers"]})

    def round_of(row: dict) -> str:
        return f", round {row['round'] + 1}" if round_count > 1 else ""

    rows = [
        (
            f"{r['stack']} in process, "
            + (f"{r['sessions']} sessions side by side, " if r.get("sessions", 1) > 1 else "")
            + ("decode + pass, " if r["decode"] else "")
            + f"batch {r['batch']}{round_of(r)}",
            f"{r['throughput']:.1f} img/s, {r['ms_per_batch']:.1f} ms/batch, {r['cpu_ms_per_image']:.1f} CPU-ms/img",
        )
        for r in figures["in_process"]
    ]
    for r in figures["servers"]:
        extra = (
            f", server {r['server_cpu_ms_per_request']:.1f} CPU-ms/req" if r.get("server_cpu_ms_per_request") else ""
        )
        extra += f", x{r['vs_ort_best']:.2f} ORT" if "vs_ort_best" in r else ""
        extra += f" (x{r['vs_ort_decode_best']:.2f} decoding too)" if "vs_ort_decode_best" in r else ""
        extra += f", overhead {r['overhead_ms']:+.1f} ms" if "overhead_ms" in r else ""
        extra += f", CPU {r['cpu_over_ort_ms']:+.1f} ms over ORT's least" if "cpu_over_ort_ms" in r else ""
        extra += f" ({r['cpu_over_pass_ms']:+.1f} over its batch-1 pass)" if "cpu_over_pass_ms" in r else ""
        rows.append(
            (
                f"{r['stack']}, concurrency {r['concurrency']}{round_of(r)}",
                f"{r['throughput']:.1f} req/s, p50/p90/p99 {fmt_ms(r['p50_ms'])}/{fmt_ms(r['p90_ms'])}/"
                f"{fmt_ms(r['p99_ms'])}, {r['errors']} errors / {r['requests']}, clients "
                f"{r['client_cpu_share']:.0%} CPU{extra}",
            )
        )
    for r in (r for r in figures["servers"] if r.get("profile")):
        shares = r["profile"].get("categories")
        text = (
            ", ".join(f"{name} {share:.0%}" for name, share in list(shares.items())[:7])
            + f" ({r['profile']['samples']} samples; {r['profile']['raw']})"
            if shares
            else r["profile"].get("error", "no samples")
        )
        rows.append((f"profile of {r['stack']}, concurrency {r['concurrency']}", text))
    heads = figures.get("heads_cost")
    if heads:
        for count, point in heads["heads"].items():
            rows.append(
                (
                    f"bentoml, {count} head(s)",
                    f"RSS {point['rss_bytes'] / 2**20:.0f} MiB, p50 {fmt_ms(point['p50_ms'])}",
                )
            )
        swap = heads["swap"]
        rows.append(
            (
                f"live swap of {swap['head']}:{swap['version']} under {swap['clients']} clients",
                f"{swap['swap_s'] * 1000:.0f} ms (HTTP {swap['status']}), {swap['failed']} failed of "
                f"{swap['requests']} ({swap['failed_during_swap']} of {swap['requests_during_swap']} during it)",
            )
        )
    judging = figures.get("judging_cost")
    if judging:
        for mode in MODES:
            rounds = ", ".join(f"{t:.1f}" for t in judging[mode]["rounds"])
            rows.append(
                (
                    f"bentoml {mode}, concurrency {judging['concurrency']}",
                    f"{judging[mode]['throughput']:.1f} req/s (rounds {rounds}), p50 "
                    f"{fmt_ms(judging[mode]['p50_ms'])}, {judging[mode]['errors']} errors",
                )
            )
    if figures.get("variant_cost"):
        rows += variant_rows(figures["variant_cost"], fmt_ms)
    for target in figures["targets"]:
        each = target.get("rounds", [])
        spread = f"; median of {', '.join(f'{v:.2f}' for v in each)}" if len(each) > 1 else ""
        verdict = f"{'met' if target['met'] else 'MISSED'} ({target['value']:.2f}{spread})"
        rows.append((f"target: {target['target']}", verdict))
    title = (
        f"bench serve: {figures['backbone']} [{figures['weights']}], {figures['cpu_count']} CPU cores, "
        f"{figures['seconds']:g} s or {figures['max_requests']} requests per point"
        + (f", {figures['processes']} server processes (workers / instances)" if figures.get("processes") else "")
    )
    return format_table(title, rows)
