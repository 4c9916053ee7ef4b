"""`tl-models deploy render`: Kubernetes manifests (a Kustomize base) and a Dockerfile for one build."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..deploy.kubernetes import SERVERS, DeployOptions, render
from .common import EXIT_OK


def cmd_deploy_render(args: argparse.Namespace) -> int:
    options = DeployOptions(
        server=args.server,
        replicas=args.replicas,
        gpu=args.gpu,
        image=args.image,
        storage=args.storage,
        storage_class=args.storage_class,
        cpu=args.cpu,
        memory=args.memory,
    )
    folder = render(args.build_dir, args.out, options)
    print(f"rendered {folder}: kubectl apply -k {folder} (image: docker build -f {folder / 'Dockerfile'} .)")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add `deploy render`."""
    defaults = DeployOptions()
    deploy = sub.add_parser("deploy", help="Kubernetes manifests for a build").add_subparsers(
        dest="verb", required=True
    )
    p = deploy.add_parser("render", help="a Kustomize base and a Dockerfile for one build and server")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--server", choices=SERVERS, required=True)
    p.add_argument("--replicas", type=int, default=defaults.replicas)
    p.add_argument(
        "--gpu",
        action="store_true",
        help="one nvidia.com/gpu per pod (Triton: package the repository with --flavour onnxruntime --gpu)",
    )
    p.add_argument("--out", type=Path, default=Path("deploy"), help="parent folder (default: deploy)")
    p.add_argument("--image", help="container image (default: tl-models-<server>:latest, built from the Dockerfile)")
    p.add_argument("--storage", default=defaults.storage, help="size of the shared ReadWriteMany volume")
    p.add_argument("--storage-class", help="storage class of the shared volume (one that offers ReadWriteMany)")
    p.add_argument("--cpu", default=defaults.cpu, help="CPU request per pod (the limit is twice)")
    p.add_argument("--memory", default=defaults.memory, help="memory request and limit per pod")
    p.set_defaults(func=cmd_deploy_render)
