"""Few labels on the demo digits: a head on the labelled images alone vs `tl-models build --unlabeled`.

For each seed and each labels-per-class count: that many digits per class are labelled (the build splits them
into train and val as usual), 54 per class are held out for testing, and the rest is the unlabelled folder.
Both builds run through `tl_models.build.pipeline.build` (mobilenet_v2, ImageNet weights, linear head, no export);
test accuracy is the head on the held-out digits' embeddings. Prints a table (mean ± std over the seeds) and
writes the rows as JSON.

    python scripts/few_labels.py --labels 5 10 --seeds 0 1 2 --out /tmp/few-labels
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
from pathlib import Path

import torch

from tl_models.build.config import SelfTraining, TrainConfig
from tl_models.build.data import load_image_folder, write_demo_dataset
from tl_models.build.features import FeatureCache
from tl_models.build.pipeline import BuildOptions, build, load_build_backbone, load_head_module
from tl_models.build.train import predict
from tl_models.core.manifest import BuildDir

HELD_OUT = 54  # per class: 540 test digits


def _split_digits(data: Path, out: Path, labels: int, seed: int) -> tuple[Path, Path, Path]:
    """``labels`` per class into out/labelled/<class>, 54 per class into out/test/<class>, the rest into
    out/unlabelled (flat)."""
    rng = random.Random(seed)
    for part in ("labelled", "test", "unlabelled"):
        shutil.rmtree(out / part, ignore_errors=True)
    for class_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        rng.shuffle(files)
        for part, chosen in (("labelled", files[:labels]), ("test", files[labels:labels + HELD_OUT])):
            (out / part / class_dir.name).mkdir(parents=True)
            for path in chosen:
                shutil.copy(path, out / part / class_dir.name / path.name)
        (out / "unlabelled").mkdir(exist_ok=True)
        for path in files[labels + HELD_OUT:]:
            shutil.copy(path, out / "unlabelled" / f"{class_dir.name}-{path.name}")
    return out / "labelled", out / "test", out / "unlabelled"


def _test_accuracy(build_dir: Path, test: Path, cache: Path) -> float:
    build_ = BuildDir(build_dir)
    manifest = build_.manifest()
    data = load_image_folder(test)
    features, _ = FeatureCache(cache).get_or_compute(load_build_backbone(build_, manifest), data, progress=False)
    head = load_head_module(build_, manifest.head(manifest.heads[-1].name))
    predicted = predict(head, torch.from_numpy(features)).argmax(1).numpy()
    return float((predicted == torch.tensor(data.targets).numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, nargs="+", default=[5, 10], help="labelled digits per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("build/few-labels"))
    parser.add_argument("--json", type=Path, help="rows as JSON (default: OUT/few_labels.json)")
    args = parser.parse_args()
    data = write_demo_dataset(args.out / "digits")
    cache = args.out / "cache"
    rows = []
    for labels in args.labels:
        for seed in args.seeds:
            work = args.out / f"labels{labels}-seed{seed}"
            labelled, test, unlabelled = _split_digits(data, work, labels, seed)
            common = dict(data=labelled, backbone="mobilenet_v2", weights="IMAGENET1K_V1", kind="linear",
                          train=TrainConfig(seed=seed), cache_dir=cache, progress=False, export=False)
            row = {"labels_per_class": labels, "seed": seed}
            for method, extra in (("labelled only", {}), ("self-training", {"unlabeled": unlabelled,
                                                                              "self_training": SelfTraining()})):
                out = work / method.replace(" ", "-")
                shutil.rmtree(out, ignore_errors=True)
                report = build(BuildOptions(out=out, head="digits", **common, **extra))
                row[method] = _test_accuracy(out, test, cache)
                if "self_training" in report.head.train:
                    record = report.head.train["self_training"]
                    row["pseudo_labels"], row["best_round"] = record["pseudo_labels"], record["best_round"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| labels per class | labelled only | self-training | pseudo-labels used |\n| --- | --- | --- | --- |")
    for labels in args.labels:
        picked = [r for r in rows if r["labels_per_class"] == labels]
        cell = lambda key: (f"{100 * statistics.mean(r[key] for r in picked):.1f} ± "  # noqa: E731
                            f"{100 * statistics.pstdev(r[key] for r in picked):.1f}%")
        print(f"| {labels} | {cell('labelled only')} | {cell('self-training')} | "
              f"{statistics.mean(r['pseudo_labels'] for r in picked):.0f} |")
    path = args.json or args.out / "few_labels.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"rows: {path}")


if __name__ == "__main__":
    main()
