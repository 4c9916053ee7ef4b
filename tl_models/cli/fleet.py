"""`tl-models fleet init | status | swap | split`: one route for every BentoML replica, changed in two phases."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..core.errors import BadRequest
from ..fleet.bento import init, split, status, swap
from ..fleet.discovery import replica_urls
from .common import EXIT_OK, EXIT_USER_ERROR, SPLIT_HELP, parse_split, show


def _replicas(args: argparse.Namespace) -> list[str]:
    return replica_urls(args.replicas, args.dns, args.port, args.dns_server)


def _token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("TL_MODELS_ADMIN_TOKEN")
    if not token:
        raise BadRequest("give the replicas' admin token: --token or TL_MODELS_ADMIN_TOKEN")
    return token


def cmd_fleet_init(args: argparse.Namespace) -> int:
    route = init(args.route_file, args.build_dir, parse_split(args.split))
    print(f"fleet route {args.route_file}: versions {route.versions}, weights {route.weights}")
    return EXIT_OK


def cmd_fleet_status(args: argparse.Namespace) -> int:
    report = status(_replicas(args), args.route_file)
    lines = [f"{'replica':<28} {'ready':<6} {'versions':<24} {'weights':<28} shadow"]
    for r in report["replicas"]:
        lines.append(
            f"{r['url']:<28} {str(r['ready']):<6} {str(r.get('versions', '-')):<24} "
            f"{str(r.get('weights', '-')):<28} {r.get('shadow', '-')}"
            + (f"  ({r['error']})" if r["error"] else "")
            + (f"  (not following the fleet route: {r['fleet_error']})" if r.get("fleet_error") else "")
        )
    if (report.get("route") or {}).get("error"):
        lines.append(f"route file: {report['route']['error']}")
    lines.append(
        "replicas agree" + (" with the route file" if args.route_file else "")
        if report["agree"]
        else "replicas DISAGREE" + (" (or differ from the route file)" if args.route_file else "")
    )
    show(report, lines, args.json)
    return EXIT_OK if report["agree"] else EXIT_USER_ERROR


def cmd_fleet_swap(args: argparse.Namespace) -> int:
    report = swap(
        _replicas(args), args.route_file, args.head, args.version, _token(args), parse_split(args.split), args.build_dir
    )
    lines = [f"{args.head}: version {report['old_version']} -> {args.version} in {report['seconds']:.2f} s"]
    lines += [
        f"  {r['url']}: "
        + (
            "converged"
            if r["converged"]
            else f"NOT converged ({r['error']}); it follows the route file when it is back"
        )
        for r in report["phase2"]
    ]
    show(report, lines, args.json)
    return EXIT_OK


def cmd_fleet_split(args: argparse.Namespace) -> int:
    weights = parse_split(args.split)
    if weights is None:  # --split is required, but an empty one parses to nothing
        raise BadRequest(f"--split needs weights: {SPLIT_HELP}")
    report = split(_replicas(args), args.route_file, weights, _token(args))
    lines = [f"weights {args.split} in {report['seconds']:.2f} s"]
    lines += [
        f"  {r['url']}: " + ("converged" if r["converged"] else f"NOT converged ({r['error']})")
        for r in report["phase2"]
    ]
    show(report, lines, args.json)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add `fleet init | status | swap | split`."""
    fleet = sub.add_parser("fleet", help="A/B split and head swap across every BentoML replica at once")
    verbs = fleet.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("init", help="write the fleet's first route file from a build")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--route-file", type=Path, required=True, help="the route every replica follows")
    p.add_argument("--split", help=f"{SPLIT_HELP} (default: equal)")
    p.set_defaults(func=cmd_fleet_init)
    for verb, text in (
        ("status", "every replica's heads, versions, weights, readiness, and disagreements"),
        ("swap", "make a head version live everywhere: admit on every replica, then route"),
        ("split", "new traffic weights on every replica"),
    ):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("--replicas", help="replica URLs, comma-separated (http://host:port,...)")
        p.add_argument("--dns", help="or a headless Service's DNS name: every address it resolves to")
        p.add_argument("--port", type=int, default=3000, help="with --dns: the replicas' port")
        p.add_argument(
            "--dns-server",
            metavar="HOST[:PORT]",
            help="with --dns: ask this DNS server (an IP address; port 53 unless given; tcp://HOST[:PORT] for TCP) "
            "instead of the system resolver",
        )
        p.add_argument(
            "--route-file",
            type=Path,
            required=verb != "status",
            help="the fleet's route file (the mounted ConfigMap's source)",
        )
        p.add_argument("--json", type=Path, help="also write the report as JSON")
        if verb != "status":
            p.add_argument("--token", help="admin token (default: $TL_MODELS_ADMIN_TOKEN)")
        if verb == "swap":
            p.add_argument("--head", required=True)
            p.add_argument("--version", type=int, required=True)
            p.add_argument("--split", help=f"new {SPLIT_HELP}")
            p.add_argument("--build-dir", type=Path, help="the shared build: check the version is there first")
        if verb == "split":
            p.add_argument("--split", required=True, help=SPLIT_HELP)
        p.set_defaults(func={"status": cmd_fleet_status, "swap": cmd_fleet_swap, "split": cmd_fleet_split}[verb])
