"""The transfer-learning methods measured on the demo digits, through `tl_models.training.pipeline.build`
(mobilenet_v2, ImageNet weights, linear head; the methods of one split are heads of one build, whose images ONNX
Runtime embeds on its backbone.onnx; a fine-tuning build has its own, embedded by torch); accuracy is the head on
held-out embeddings, mean ± std over the seeds, printed as a table and written as JSON.

few-labels: per seed and labels-per-class count, that many digits per class are labelled (the build splits them
into train and val as usual), 54 per class are held out, the rest is the unlabelled folder; a head on the labelled
images alone vs `build --unlabeled`, with the validation stop and with `--pseudo-all-rounds`.

shift: every digit labelled in the source domain; the target domain is the digits shifted (inverted, or tinted
orange), half of them an unlabelled target folder and the other half the labelled test set; source only vs
`build --target` (CORAL) vs `build --target --unlabeled` (self-training on the aligned target).

fine-tune: per seed, 30 digits per class labelled (the build splits them 240 train / 60 val), the other 1,497 the
test set; the linear probe (frozen backbone) vs `build --fine-tune N` (the recipe: stage 1 the same probe, stage 2
the last N stages at --lr / 1000), with and without random-crop augmentation (no flip: a mirrored digit is another
shape), and the seconds each build took.

    python scripts/methods.py few-labels --labels 5 10 --seeds 0 1 2 --out build/methods
    python scripts/methods.py shift --seeds 0 1 2 --out build/methods
    python scripts/methods.py fine-tune --seeds 0 1 2 --stages 1 2 --out build/methods
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import torch

from tl_models.core.manifest import BuildDir
from tl_models.core.names import BACKBONE_ONNX
from tl_models.training.build_backbone import load_build_backbone
from tl_models.training.config import FineTune, SelfTraining, TrainConfig
from tl_models.training.data import DEMO_SHIFTS, load_image_folder, shifted_image, write_demo_dataset
from tl_models.training.extract import OrtEngine, extraction_sessions
from tl_models.training.features import FeatureCache
from tl_models.training.options import BuildOptions
from tl_models.training.pipeline import build, load_head_module
from tl_models.training.train import predict

HELD_OUT = 54  # per class: 540 test digits


def _split_digits(
    data: Path, out: Path, labels: int, seed: int, held_out: int | None = HELD_OUT
) -> tuple[Path, Path, Path]:
    """``labels`` per class into out/labelled/<class>, ``held_out`` per class into out/test/<class>, the rest into
    out/unlabelled (flat); ``held_out`` None: the rest is the test set and out/unlabelled stays empty."""
    rng = random.Random(seed)
    for part in ("labelled", "test", "unlabelled", "build"):
        shutil.rmtree(out / part, ignore_errors=True)
    for class_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        rng.shuffle(files)
        end = len(files) if held_out is None else labels + held_out
        for part, chosen in (("labelled", files[:labels]), ("test", files[labels:end])):
            (out / part / class_dir.name).mkdir(parents=True)
            for path in chosen:
                shutil.copy(path, out / part / class_dir.name / path.name)
        (out / "unlabelled").mkdir(exist_ok=True)
        for path in files[end:]:
            shutil.copy(path, out / "unlabelled" / f"{class_dir.name}-{path.name}")
    return out / "labelled", out / "test", out / "unlabelled"


def _test_accuracy(build_dir: Path, head_name: str, test: Path, cache: Path) -> float:
    """Accuracy of the newest version of ``head_name`` on the images of ``test``, embedded as the build embeds
    (ONNX Runtime on its backbone.onnx where it has one, else torch on its backbone)."""
    build_ = BuildDir(build_dir)
    manifest = build_.manifest()
    data = load_image_folder(test)
    backbone = load_build_backbone(build_, manifest)
    onnx = build_dir / BACKBONE_ONNX
    engine = OrtEngine(onnx, sessions=extraction_sessions()) if onnx.is_file() else None
    features, _ = FeatureCache(cache).get_or_compute(backbone, data, progress=False, engine=engine)
    head = load_head_module(build_, manifest.head(head_name))
    predicted = predict(head, torch.from_numpy(features)).argmax(1).numpy()
    return float((predicted == torch.tensor(data.targets).numpy()).mean())


def _table(rows: list[dict], group: str, methods: list[str]) -> str:
    """Markdown: one line per value of ``group``, mean ± std of each method's accuracy over the seeds."""
    lines = [f"| {group} | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
    for value in dict.fromkeys(r[group] for r in rows):
        picked = [r for r in rows if r[group] == value]
        cells = [
            f"{100 * statistics.mean(r[m] for r in picked):.1f} ± {100 * statistics.pstdev(r[m] for r in picked):.1f}%"
            for m in methods
        ]
        lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run(work: Path, test: Path, cache: Path, method: str, options: dict) -> tuple[float, dict]:
    """Build one head with ``options``; its held-out accuracy and its manifest entry, with the build's wall-clock
    seconds as ``seconds``. Each method is a head of its own in ``work/build``: the first exports the backbone
    (with its parity), the others use that backbone.onnx to embed their images with ONNX Runtime, each folder
    once, and skip export; a fine-tuning build changes its backbone, so it gets a build directory of its own,
    ``work/<method>``, embedded by torch."""
    head = method.lower().replace(" ", "-").replace("+", "and").replace(",", "")
    tuned = "fine_tune" in options
    out = work / (head if tuned else "build")
    if tuned:
        shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    export = not tuned and not (out / BACKBONE_ONNX).exists()  # the first head exports the backbone, once
    report = build(
        BuildOptions(
            out=out,
            head=head,
            backbone="mobilenet_v2",
            weights="IMAGENET1K_V1",
            kind="linear",
            cache_dir=cache,
            progress=False,
            export=export,
            **options,
        )
    )
    seconds = round(time.perf_counter() - start, 1)
    return _test_accuracy(out, head, test, cache), {**report.head.train, "seconds": seconds}


def few_labels(args: argparse.Namespace, data: Path, cache: Path) -> list[dict]:
    rows = []
    for labels in args.labels:
        for seed in args.seeds:
            work = args.out / f"labels{labels}-seed{seed}"
            labelled, test, unlabelled = _split_digits(data, work, labels, seed)
            common = {"data": labelled, "train": TrainConfig(seed=seed)}
            row = {"labels per class": labels, "seed": seed}
            row["labelled only"], _ = _run(work, test, cache, "labelled only", common)
            row["self-training"], train = _run(
                work, test, cache, "self-training", {**common, "unlabeled": unlabelled, "self_training": SelfTraining()}
            )
            row["pseudo_labels"] = train["self_training"]["pseudo_labels"]
            row["self-training, all rounds"], _ = _run(
                work,
                test,
                cache,
                "self-training all rounds",
                {**common, "unlabeled": unlabelled, "self_training": SelfTraining(stop=False)},
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(_table(rows, "labels per class", ["labelled only", "self-training", "self-training, all rounds"]))
    return rows


FINE_TUNE_LABELS = 30  # per class: 300 labelled digits


def fine_tune(args: argparse.Namespace, data: Path, cache: Path) -> list[dict]:
    rows, methods = [], ["linear probe"]
    for stages in args.stages:
        methods += [f"fine-tune {stages}, no augmentation", f"fine-tune {stages} + crop"]
    for seed in args.seeds:
        work = args.out / f"fine-tune-seed{seed}"
        labelled, test, _ = _split_digits(data, work, FINE_TUNE_LABELS, seed, held_out=None)
        common = {"data": labelled, "train": TrainConfig(seed=seed)}
        row = {"seed": seed, "data": "300 digits"}
        for method in methods:
            options = dict(common)
            if method != "linear probe":
                stages = int(method.split()[1].rstrip(","))
                options["fine_tune"] = FineTune(
                    stages=stages, lr=args.fine_tune_lr, augment=() if "no augmentation" in method else ("crop",)
                )
            row[method], train = _run(work, test, cache, method, options)
            row[f"{method} seconds"] = train["seconds"]  # the build alone (features cached), not the test
            if train.get("fine_tune"):
                row[f"{method} kept"] = train["fine_tune"]["kept"]
            print(json.dumps(row), flush=True)
        rows.append(row)
    print(_table(rows, "data", methods))
    return rows


def _shifted_digits(data: Path, work: Path, shift: str, seed: int) -> tuple[Path, Path]:
    """Every digit shifted: a random half into work/target (flat, unlabelled), the rest into work/test/<class>."""
    rng = random.Random(seed)
    for part in ("target", "test", "build"):
        shutil.rmtree(work / part, ignore_errors=True)
    (work / "target").mkdir(parents=True)
    for class_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        (work / "test" / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.iterdir()):
            image = shifted_image(path, shift)
            if rng.random() < 0.5:
                image.save(work / "target" / f"{class_dir.name}-{path.name}")
            else:
                image.save(work / "test" / class_dir.name / path.name)
    return work / "target", work / "test"


def shift(args: argparse.Namespace, data: Path, cache: Path) -> list[dict]:
    rows = []
    for name in DEMO_SHIFTS:
        for seed in args.seeds:
            work = args.out / f"{name}-seed{seed}"
            target, test = _shifted_digits(data, work, name, seed)
            common = {"data": data, "train": TrainConfig(seed=seed)}
            row = {"shift": name, "seed": seed}
            row["source only"], _ = _run(work, test, cache, "source only", common)
            row["CORAL"], _ = _run(work, test, cache, "CORAL", {**common, "target": target})
            row["CORAL + self-training"], _ = _run(
                work,
                test,
                cache,
                "CORAL + self-training",
                {**common, "target": target, "unlabeled": target, "self_training": SelfTraining()},
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(_table(rows, "shift", ["source only", "CORAL", "CORAL + self-training"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["few-labels", "shift", "fine-tune"])
    parser.add_argument("--labels", type=int, nargs="+", default=[5, 10], help="few-labels: labelled digits per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], help="fine-tune: backbone stages to train")
    parser.add_argument("--fine-tune-lr", type=float, help="fine-tune: stage 2 learning rate (default: the build's)")
    parser.add_argument("--out", type=Path, default=Path("build/methods"))
    args = parser.parse_args()
    data = write_demo_dataset(args.out / "digits")
    cache = args.out / "cache"
    experiment = {"few-labels": few_labels, "shift": shift, "fine-tune": fine_tune}[args.experiment]
    rows = experiment(args, data, cache)
    path = args.out / f"{args.experiment}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"rows: {path}")


if __name__ == "__main__":
    main()
