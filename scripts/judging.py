"""Judging heads on live traffic, end to end on the demo digits, against a real `bentoml serve` (README "Judging
heads"). Prints the figures, writes them as JSON and the `tl-models report` plot of the embedding log.

Per class, the digits are split: held-out (30) and shifted (30, the held-out's siblings with --shift applied: 15
served, 15 only for evaluation) never reach training; the rest trains head `a` (linear) and head `b` (mlp).

1. serve head `a` live with `b` as shadow; send the held-out digits, each with its label as feedback: the
   accuracy `/heads` reports per head vs the same heads run offline (ONNX Runtime) on the same images;
2. the drift `/heads` reports after the held-out digits, then after the shifted ones;
3. `tl-models build --from-log` trains `a` v2 from the log (every labelled record); `a` v1 vs v2 on the shifted
   digits that were never served, offline; then v2 as shadow on them live, and promoted with a swap.

    python scripts/judging.py --out build/judging [--shift inverted|tinted]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from tl_models.bento import launcher
from tl_models.core.heads import read_verified
from tl_models.core.manifest import BuildDir
from tl_models.core.preprocess import Preprocessing, preprocess_bytes
from tl_models.core.runtime import create_session
from tl_models.training.config import TrainConfig
from tl_models.training.data import DEMO_SHIFTS, shifted_image, write_demo_dataset
from tl_models.training.options import BuildOptions
from tl_models.training.pipeline import build

TOKEN = "judging-demo"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HELD, SHIFTED = 30, 30  # per class


def _split(data: Path, work: Path, shift: str, seed: int = 0) -> dict[str, list[tuple[str, Path]]]:
    """work/train/<class> for training; (label, path) lists of held-out, shifted-served and shifted-eval images."""
    rng = random.Random(seed)
    parts: dict[str, list[tuple[str, Path]]] = {"held": [], "shifted_served": [], "shifted_eval": []}
    shutil.rmtree(work / "train", ignore_errors=True)
    shutil.rmtree(work / "shifted", ignore_errors=True)
    for class_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        rng.shuffle(files)
        label = class_dir.name
        parts["held"] += [(label, p) for p in files[:HELD]]
        for i, path in enumerate(files[HELD : HELD + SHIFTED]):
            target = work / "shifted" / label / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shifted_image(path, shift).save(target)
            parts["shifted_served" if i % 2 == 0 else "shifted_eval"].append((label, target))
        (work / "train" / label).mkdir(parents=True)
        for path in files[HELD + SHIFTED :]:
            shutil.copy(path, work / "train" / label / path.name)
    for images in parts.values():  # served in random order, as traffic comes, not class by class
        rng.shuffle(images)
    return parts


class Offline:
    """The build's ONNX graphs run with ONNX Runtime in this process: the reference for what the service says."""

    def __init__(self, build_dir: Path):
        self.build = BuildDir(build_dir)
        manifest = self.build.manifest()
        self.labels = manifest.labels
        self.spec = Preprocessing.from_dict(manifest.preprocessing)
        self.backbone = create_session(self.build.file("backbone.onnx").read_bytes(), threads=2, name="backbone")

    def top1(self, images: list[tuple[str, Path]], head: str, version: int) -> list[str]:
        entry = next(e for e in self.build.manifest().heads if e.key == f"{head}:{version}")
        path = self.build.file(entry.rel("head.onnx"))
        session = create_session(read_verified(path, self.build.manifest().files[entry.rel("head.onnx")], "head"))
        batch = np.stack([preprocess_bytes(p.read_bytes(), self.spec) for _, p in images])
        embedding = self.backbone.run(["embedding"], {"image": batch})[0]
        return [self.labels[i] for i in session.run(["logits"], {"embedding": embedding})[0].argmax(1)]


def accuracy(predicted: list[str], images: list[tuple[str, Path]]) -> float:
    return float(np.mean([p == label for p, (label, _) in zip(predicted, images)]))


def serve_and_label(client: httpx.Client, images: list[tuple[str, Path]]) -> None:
    """Classify every image (the split decides the head), then send its true label as feedback."""
    for label, path in images:
        answer = client.post("/classify", files={"image": (path.name, path.read_bytes(), "image/png")})
        answer.raise_for_status()
        client.post(
            "/feedback", json={"request_id": answer.json()["request_id"], "label": label}, headers=AUTH
        ).raise_for_status()


def heads(client: httpx.Client) -> dict:
    response = client.get("/heads")
    response.raise_for_status()
    return response.json()


def judged(status: dict, key: str) -> dict:
    """A head's entry in /heads, live or shadow."""
    for entry in status["heads"]:
        if f"{entry['name']}:{entry['version']}" == key:
            return {**entry, "role": "live"}
    for entry in status["shadow"]:
        if f"{entry['name']}:{entry['version']}" == key:
            return {**entry, "role": "shadow"}
    raise KeyError(key)


def admin(client: httpx.Client, path: str, body: dict) -> dict:
    response = client.post(path, json=body, headers=AUTH)
    if response.status_code != 200:
        raise SystemExit(f"{path} {body}: {response.status_code} {response.text}")
    return response.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/judging"))
    parser.add_argument("--shift", choices=sorted(DEMO_SHIFTS), default="inverted")
    args = parser.parse_args()
    out = args.out.resolve()
    parts = _split(write_demo_dataset(out / "digits"), out, args.shift)
    build_dir = out / "build"
    shutil.rmtree(build_dir, ignore_errors=True)
    for head, kind in (("a", "linear"), ("b", "mlp")):
        build(
            BuildOptions(
                data=out / "train",
                out=build_dir,
                weights="IMAGENET1K_V1",
                kind=kind,
                head=head,
                train=TrainConfig(seed=0),
                cache_dir=out / "cache",
                progress=False,
            )
        )
    offline = Offline(build_dir)
    state = out / "state"
    shutil.rmtree(state, ignore_errors=True)
    env = launcher.service_environment(
        build_dir=build_dir,
        state_dir=state,
        extra={
            "TL_MODELS_ADMIN_TOKEN": TOKEN,
            "TL_MODELS_LOG_SHARE": "1",
            "TL_MODELS_LOG_FLUSH": "1",
            "TL_MODELS_DRIFT_WINDOW": "128",
            "TL_MODELS_BUILD_ROOTS": str(out),
            "TL_MODELS_ACCESS_LOG": "0",
        },
    )
    server = launcher.start(env, log_path=out / "serve.log")
    figures: dict = {"shift": args.shift, "images": {k: len(v) for k, v in parts.items()}}
    try:
        client = httpx.Client(base_url=server.url, timeout=60)
        admin(client, "/admin/shadow", {"build_dir": str(build_dir), "head": "b", "version": 1, "share": 1})
        admin(client, "/admin/retire", {"head": "b"})  # b only as shadow: never answers

        serve_and_label(client, parts["held"])
        status = heads(client)
        figures["held_out"] = {}
        for key in ("a:1", "b:1"):
            name, version = key.split(":")
            entry = judged(status, key)
            figures["held_out"][key] = {
                "role": entry["role"],
                "served_accuracy": entry["feedback"]["accuracy"],
                "labelled": entry["feedback"]["labelled"],
                "offline_accuracy": accuracy(offline.top1(parts["held"], name, int(version)), parts["held"]),
            }
        figures["held_out"]["agreement_b_with_a"] = judged(status, "b:1")["agreement"]
        figures["drift"] = {"threshold": status["drift"]["threshold"], "after_held_out": judged(status, "a:1")["drift"]}

        serve_and_label(client, parts["shifted_served"])
        figures["drift"]["after_shifted"] = judged(heads(client), "a:1")["drift"]

        subprocess.run(
            [
                sys.executable,
                "-m",
                "tl_models.cli",
                "build",
                "--from-log",
                str(state / "embedding-log"),
                "--out",
                str(build_dir),
                "--head",
                "a",
            ],
            check=True,
        )
        evaluation = parts["shifted_eval"]
        figures["from_log"] = {
            f"a:{v}": {
                "shifted_accuracy": accuracy(offline.top1(evaluation, "a", v), evaluation),
                "held_out_accuracy": accuracy(offline.top1(parts["held"], "a", v), parts["held"]),
            }
            for v in (1, 2)
        }
        admin(client, "/admin/shadow", {"head": "b", "share": 0})
        admin(client, "/admin/shadow", {"build_dir": str(build_dir), "head": "a", "version": 2, "share": 1})
        before = heads(client)
        serve_and_label(client, evaluation)
        after = heads(client)
        figures["shadow_on_shifted"] = {}
        for key in ("a:1", "a:2"):
            was = judged(before, key)["feedback"] if key == "a:1" else {"labelled": 0, "correct": 0}
            now = judged(after, key)
            labelled = now["feedback"]["labelled"] - was["labelled"]
            figures["shadow_on_shifted"][key] = {
                "role": now["role"],
                "labelled": labelled,
                "accuracy": (now["feedback"]["correct"] - was["correct"]) / labelled,
            }
        admin(client, "/admin/load", {"build_dir": str(build_dir), "head": "a", "version": 2})
        figures["promoted"] = judged(heads(client), "a:2")["role"]
    finally:
        server.stop()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tl_models.cli",
            "report",
            "--log",
            str(state / "embedding-log"),
            "--build",
            str(build_dir),
            "--slices",
            "12",
            "--plot",
            str(out / "judging.png"),
        ],
        check=True,
    )
    (out / "judging.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))
    print(f"figures: {out / 'judging.json'}, plot: {out / 'judging.png'}")


if __name__ == "__main__":
    main()
