"""The build stage end to end on real digits and real ImageNet weights: frozen backbone, feature cache,
head versions, failure and SIGKILL safety, compatibility checks, the manifest, the CLI, reproducibility."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tl_models.core.manifest
import tl_models.training.commit
import tl_models.training.features
import tl_models.training.options
from tl_models.cli import main
from tl_models.core.errors import BuildError
from tl_models.core.files import file_sha256
from tl_models.core.manifest import BuildDir, HeadEntry
from tl_models.core.names import MANIFEST
from tl_models.core.preprocess import Preprocessing
from tl_models.core.runtime import create_session
from tl_models.training.architectures import HeadSpec, build_head
from tl_models.training.augment import Augment
from tl_models.training.backbones import WeightsError, load_backbone
from tl_models.training.build_backbone import load_build_backbone
from tl_models.training.config import FineTune, TrainConfig
from tl_models.training.data import DataError, load_image_folder
from tl_models.training.features import FeatureCache, load_images
from tl_models.training.options import BuildReport
from tl_models.training.train import fit

from helpers import subset

WEIGHTS_ID = "torchvision:MobileNet_V2_Weights.IMAGENET1K_V1"
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
QuickBuild = Callable[..., BuildReport]
TUNE = FineTune(stages=2, lr=3e-5, epochs=2, augment=("crop",))  # short and visible: stage 2 must move the weights
RunCli = Callable[..., tuple[int, str, str]]


def _fresh_state() -> dict[str, torch.Tensor]:
    return load_backbone("mobilenet_v2", "IMAGENET1K_V1").module.state_dict()


def _saved_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)


def _head_state(out: Path, entry: HeadEntry) -> dict[str, torch.Tensor]:
    return torch.load(out / entry.path / "head.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def base_build(demo_data: Path, quick_build: QuickBuild, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One committed build (head 'a' v1, linear, 10 epochs) that tests copy instead of rebuilding."""
    out = tmp_path_factory.mktemp("base") / "out"
    quick_build(demo_data, out, head="a", epochs=10)
    return out


@pytest.fixture
def built(base_build: Path, tmp_path: Path) -> Path:
    """This test's own copy of the base build."""
    return Path(shutil.copytree(base_build, tmp_path / "out"))


def _tripwire(*args: object, **kwargs: object) -> None:
    raise AssertionError("the backbone ran although the feature cache should have been hit")


# (a) the frozen backbone is bit-identical after training


def test_backbone_state_is_bit_identical_after_training(base_build: Path) -> None:
    before, after = _fresh_state(), _saved_state(base_build)
    assert list(after) == list(before)
    assert sum(k.endswith("num_batches_tracked") for k in after) > 30  # BatchNorm buffers are part of the check
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key


def test_fine_tune_moves_only_the_unfrozen_stages(demo_data: Path, quick_build: QuickBuild, tmp_path: Path) -> None:
    """--fine-tune 2: stage 2 trains the registry's last two stages of mobilenet_v2 (features.14..18) and nothing
    else; no BatchNorm statistic moves anywhere; the manifest records both stages."""
    small = subset(demo_data, tmp_path / "small", ["3", "8"], per_class=8)
    report = quick_build(small, tmp_path / "out", fine_tune=TUNE, epochs=1)
    record = report.head.train["fine_tune"]
    assert record["kept"] is True and record["stages"] == 2 and record["augment"] == ["crop"]
    assert record["modules"] == [f"features.{i}" for i in range(14, 19)]
    history = json.loads((tmp_path / "out" / report.head.path / "history.json").read_text())
    assert [h["stage"] for h in history] == [1] + [2] * TUNE.epochs
    backbone = load_backbone("mobilenet_v2", "IMAGENET1K_V1")
    before, after = backbone.module.state_dict(), _saved_state(tmp_path / "out")
    params = {name for name, _ in backbone.module.named_parameters()}
    prefixes = tuple(f"features.{path}." for path in record["modules"])
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed, "--fine-tune trained nothing"
    assert all(key.startswith(prefixes) and key in params for key in changed), sorted(changed)
    for prefix in prefixes:
        assert any(key.startswith(prefix) for key in changed), prefix
    buffers = [key for key in before if key.endswith(BN_BUFFERS)]
    assert any(key.startswith(prefixes) for key in buffers)
    assert not [key for key in buffers if key in changed]
    # it keeps the original weights id, yet never shares feature cache entries with the original weights
    tuned = load_build_backbone(BuildDir(tmp_path / "out"), report.manifest)
    assert tuned.weights_id == backbone.weights_id
    assert FeatureCache.key(tuned, "data") != FeatureCache.key(backbone, "data")

    # the saved backbone is fine-tuned: a head trained on the original weights' cached features would not fit it
    with pytest.raises(BuildError, match="holds a fine-tuned backbone"):
        quick_build(small, tmp_path / "out", head="second")


def test_stage_two_that_never_beats_stage_one_leaves_both_as_they_were() -> None:
    """keep_start: training that does not improve on the models as given (here: learning rate 0) keeps them."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 8), torch.arange(40) % 2
    head = build_head(HeadSpec("linear", 8, 2))
    fit(head, x[:30], y[:30], x[30:], y[30:], TrainConfig(epochs=3), progress=False)
    start = {k: v.clone() for k, v in head.state_dict().items()}
    result = fit(head, x[:30], y[:30], x[30:], y[30:], TrainConfig(epochs=2, lr=0.0), progress=False, keep_start=True)
    assert result.best_epoch == 0 and len(result.history) == 2
    assert all(torch.equal(start[k], v) for k, v in head.state_dict().items())


def test_augment_crops_and_flips_each_image_on_its_own_draw() -> None:
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    batch = images[:1].repeat(4, 1, 1, 1)
    torch.manual_seed(0)
    out = Augment(32, ("crop", "flip"))(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert len({bytes(image.numpy()) for image in out}) == 4  # one draw per image, not per batch
    assert torch.equal(Augment(32, ())(images), images)
    flipped = Augment(32, ("flip",))
    torch.manual_seed(1)
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for o, i in zip(flipped(images), images))


def test_stage_2_is_kept_only_where_it_beats_stage_1_on_validation(
    demo_data: Path, quick_build: QuickBuild, tmp_path: Path
) -> None:
    """The recipe's rule: stage 2 replaces stage 1 only when one of its epochs beats stage 1's head on the
    validation split. A stage 2 at a rate that wrecks the backbone is dropped: the build is stage 1's probe, its
    backbone bit-identical to the original weights. (The default rate is 1/1000 of the head's.)"""
    assert FineTune(stages=1).learning_rate(1e-3) == pytest.approx(1e-6)
    small = subset(demo_data, tmp_path / "small", ["3", "8"], per_class=8)
    for name, tune, epochs in (("kept", TUNE, 1), ("wrecked", FineTune(stages=2, lr=5.0, epochs=2, augment=()), 10)):
        report = quick_build(small, tmp_path / name, fine_tune=tune, epochs=epochs)
        record = report.head.train["fine_tune"]
        history = json.loads((tmp_path / name / report.head.path / "history.json").read_text())
        # the training loop's order of merit: validation accuracy, then lower validation loss
        stage1, stage2 = (
            max((h["val_accuracy"], -h["val_loss"]) for h in history if h["stage"] == stage) for stage in (1, 2)
        )
        assert record["kept"] is (stage2 > stage1), (name, record, stage1, stage2)
        assert record["kept"] is (name == "kept"), (name, record)
        if not record["kept"]:
            tuned = load_build_backbone(BuildDir(tmp_path / name), report.manifest)
            original = load_backbone("mobilenet_v2", "IMAGENET1K_V1")
            assert all(
                torch.equal(value, original.module.state_dict()[key])
                for key, value in tuned.module.state_dict().items()
            )
            assert report.head.metrics["val_accuracy"] == stage1[0]


def test_a_fine_tuned_build_exports_its_fine_tuned_backbone_with_parity(
    demo_data: Path, quick_build: QuickBuild, tmp_path: Path
) -> None:
    """backbone.onnx is the fine-tuned backbone (parity against it passes; the original weights' embeddings differ)."""
    small = subset(demo_data, tmp_path / "small", ["3", "8"], per_class=8)
    report = quick_build(small, tmp_path / "out", fine_tune=TUNE, epochs=1, export=True)
    assert report.head.parity is not None
    assert report.head.train["fine_tune"]["kept"] and report.head.parity["passed"]
    images = load_images(
        load_image_folder(small), Preprocessing.from_dict(report.manifest.preprocessing), progress=False
    )[:4]
    served = create_session(tmp_path / "out" / "backbone.onnx").run(["embedding"], {"image": images})[0]
    with torch.inference_mode():
        original = load_backbone("mobilenet_v2", "IMAGENET1K_V1").module(torch.from_numpy(images)).numpy()
    assert np.abs(served - original).max() > 1e-2


def test_chained_transfer_starts_from_another_builds_backbone(
    demo_data: Path, quick_build: QuickBuild, tmp_path: Path
) -> None:
    """--weights BUILD_DIR: the source build's (here fine-tuned) backbone, bit for bit, for another label set."""
    source = tmp_path / "source"
    quick_build(subset(demo_data, tmp_path / "small", ["3", "8"], per_class=8), source, fine_tune=TUNE, epochs=1)
    other = subset(demo_data, tmp_path / "other", ["1", "7", "9"], per_class=4)
    report = quick_build(other, tmp_path / "chained", weights=str(source))
    sha = BuildDir(source).manifest().files["backbone.pt"]
    assert report.manifest.weights == f"build:source:sha256={sha}" and report.manifest.labels == ["1", "7", "9"]
    chained, fine_tuned = _saved_state(tmp_path / "chained"), _saved_state(source)
    assert list(chained) == list(fine_tuned) and all(torch.equal(chained[k], v) for k, v in fine_tuned.items())
    assert not all(torch.equal(fine_tuned[k], v) for k, v in _fresh_state().items())  # it really was fine-tuned
    with pytest.raises(WeightsError, match="chained transfer keeps the architecture"):
        quick_build(other, tmp_path / "refused", backbone="resnet18", weights=str(source))
    assert not (tmp_path / "refused").exists()


# (b) the feature cache is hit by the second head


def test_second_head_hits_the_feature_cache(
    demo_data: Path, quick_build: QuickBuild, fresh_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = subset(demo_data, tmp_path / "data", ["1", "7"], per_class=4)
    out = tmp_path / "out"
    first = quick_build(data, out, head="a")
    assert first.cache_hit is False
    assert len(list((fresh_cache / "features").glob("*/index.json"))) == 1

    monkeypatch.setattr(tl_models.training.features, "_extract", _tripwire)
    second = quick_build(data, out, head="b", kind="mlp")
    assert second.cache_hit is True
    assert second.head.train["feature_cache_hit"] is True
    assert "feature cache hit" in tl_models.training.options.summary_line(second)

    # the key covers weights and data: a change of either runs the backbone again
    with pytest.raises(AssertionError, match="backbone ran"):
        quick_build(data, tmp_path / "other-weights", weights="none")
    changed = shutil.copytree(data, tmp_path / "changed")
    Image.new("RGB", (64, 64), "white").save(next((changed / "7").iterdir()))
    with pytest.raises(AssertionError, match="backbone ran"):
        quick_build(changed, tmp_path / "other-data")


# (c) heads and versions


def test_second_head_and_new_version_leave_other_heads_untouched(
    demo_data: Path, quick_build: QuickBuild, built: Path
) -> None:
    out = built
    quick_build(demo_data, out, head="b", kind="mlp")
    files_before = dict(BuildDir(out).manifest().files)
    disk_before = {rel: file_sha256(out / rel) for rel in files_before}
    assert disk_before == files_before

    report = quick_build(demo_data, out, head="a", seed=1)
    manifest = report.manifest
    assert [(h.name, h.version, h.kind) for h in manifest.heads] == [
        ("a", 1, "linear"),
        ("b", 1, "mlp"),
        ("a", 2, "linear"),
    ]
    assert report.head.path == "heads/a/2"
    for rel, digest in files_before.items():
        assert manifest.files[rel] == digest
        assert file_sha256(out / rel) == digest
    assert any(rel.startswith("heads/a/2/") for rel in manifest.files)
    build_dir = BuildDir(out)
    build_dir.verify()
    assert build_dir.manifest().head("a").version == 2
    assert build_dir.manifest().head("a", 1).version == 1
    with pytest.raises(BuildError, match="no head 'c'"):
        build_dir.manifest().head("c")


# (d) a failed build leaves the previous build intact


def _raise(*args: object, **kwargs: object) -> None:
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("where", ["staging", "manifest"])
def test_failed_build_keeps_the_previous_manifest(
    demo_data: Path, quick_build: QuickBuild, built: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A failure while the head is staged, or after it was moved into place but before the manifest is
    written, leaves the committed manifest and its files as they were."""
    out = built
    manifest_bytes = (out / MANIFEST).read_bytes()
    with monkeypatch.context() as patch:
        if where == "staging":
            patch.setattr(tl_models.training.commit, "plot_confusion", _raise)
        else:
            patch.setattr(tl_models.core.manifest, "atomic_write_json", _raise)
        for name in ("a", "b"):
            with pytest.raises(RuntimeError, match="injected failure"):
                quick_build(demo_data, out, head=name)
    assert (out / MANIFEST).read_bytes() == manifest_bytes
    build_dir = BuildDir(out)
    build_dir.verify()
    assert [(h.name, h.version) for h in build_dir.manifest().heads] == [("a", 1)]
    assert not list((out / "heads").glob(".staging-*"))
    with pytest.raises(BuildError):
        build_dir.manifest().head("b")

    report = quick_build(demo_data, out, head="a")  # the next build works and never reuses an orphan's number
    assert report.head.version == (2 if where == "staging" else 3)
    build_dir.verify()
    versions = [(h.name, h.version) for h in build_dir.manifest().heads]
    assert versions == [("a", 1), ("a", report.head.version)]


# (e) a build killed by SIGKILL


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("tl-models")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tl_models.cli"]


def test_two_first_builds_into_one_new_folder_take_turns(demo_data: Path, base_build: Path, tmp_path: Path) -> None:
    """Two `tl-models build` started together into one --out that does not exist yet: the second waits for the
    first's lock and then adds its head to the first's build; the folder is never mixed (one backbone, both heads,
    every file as the manifest says)."""
    out = tmp_path / "together"
    processes = [
        subprocess.Popen(
            _cli()
            + [
                "build",
                "--data",
                str(demo_data),
                "--out",
                str(out),
                "--head",
                head,
                "--weights",
                "IMAGENET1K_V1",
                "--epochs",
                "2",
                "--no-export",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
        for head in ("left", "right")
    ]
    outputs = [p.communicate(timeout=600)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    manifest = BuildDir(out).verify()
    assert sorted((h.name, h.version) for h in manifest.heads) == [("left", 1), ("right", 1)]
    assert not list((out / "heads").glob(".staging-*"))


def test_sigkill_mid_build_leaves_the_previous_build_usable(
    demo_data: Path, quick_build: QuickBuild, built: Path, tmp_path: Path
) -> None:
    out = built  # the base build also filled the session feature cache that the subprocess reads
    manifest_bytes = (out / MANIFEST).read_bytes()
    command = _cli() + [
        "build",
        "--data",
        str(demo_data),
        "--out",
        str(out),
        "--head",
        "b",
        "--kind",
        "mlp",
        "--backbone",
        "mobilenet_v2",
        "--weights",
        "IMAGENET1K_V1",
        "--epochs",
        "3",
    ]
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=os.environ.copy())
        try:
            deadline, killed = time.monotonic() + 240, False
            while proc.poll() is None and time.monotonic() < deadline:
                if list((out / "heads").glob(".staging-*")):  # the head is being written: the riskiest moment
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.005)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = (tmp_path / "stderr.txt").read_text()
    assert killed and proc.returncode == -signal.SIGKILL, (
        f"the build was not killed while staging its head (rc {proc.returncode}):\n{log}"
    )

    assert (out / MANIFEST).read_bytes() == manifest_bytes
    build_dir = BuildDir(out)
    build_dir.verify()
    assert [h.name for h in build_dir.manifest().heads] == ["a"]
    assert not (out / "heads" / "b").exists()

    report = quick_build(demo_data, out, head="b", kind="mlp")  # the directory is not stuck (lock, leftovers)
    assert report.head.version == 1
    assert not list((out / "heads").glob(".staging-*"))
    build_dir.verify()
    assert [h.name for h in build_dir.manifest().heads] == ["a", "b"]


# (f) an incompatible second build


def test_incompatible_second_build_is_refused(
    demo_data: Path, quick_build: QuickBuild, built: Path, tmp_path: Path
) -> None:
    out = built
    manifest_bytes = (out / MANIFEST).read_bytes()
    with pytest.raises(BuildError, match="heads share one backbone"):
        quick_build(demo_data, out, head="b", backbone="resnet18", weights="none")
    with pytest.raises(BuildError, match="MobileNet_V2_Weights.IMAGENET1K_V1.*not mobilenet_v2 with none"):
        quick_build(demo_data, out, head="b", weights="none")
    relabelled = shutil.copytree(demo_data, tmp_path / "relabelled")
    (relabelled / "9").rename(relabelled / "nine")
    with pytest.raises(BuildError, match="labels"):
        quick_build(relabelled, out, head="b")
    with pytest.raises(BuildError, match="--fine-tune into .* export the build first"):  # its tail needs a trunk graph
        quick_build(demo_data, out, head="b", fine_tune=TUNE)
    assert (out / MANIFEST).read_bytes() == manifest_bytes
    BuildDir(out).verify()


def test_tampered_build_is_refused(demo_data: Path, quick_build: QuickBuild, built: Path) -> None:
    out = built
    head_file = out / "heads" / "a" / "1" / "head.pt"
    head_file.write_bytes(head_file.read_bytes() + b"\0")
    with pytest.raises(BuildError, match="sha256"):
        BuildDir(out).verify()
    with pytest.raises(BuildError, match="sha256"):
        quick_build(demo_data, out, head="b")


# (g) the manifest


def test_manifest_has_every_required_key(demo_data: Path, quick_build: QuickBuild, built: Path) -> None:
    out = built
    quick_build(demo_data, out, head="b", kind="mlp", epochs=10)
    manifest = BuildDir(out).manifest()
    assert manifest.backbone == "mobilenet_v2"
    assert manifest.weights == WEIGHTS_ID
    assert manifest.embedding_dim == 1280
    assert manifest.input_size == [3, 224, 224]
    assert manifest.mean == pytest.approx([0.485, 0.456, 0.406])
    assert manifest.std == pytest.approx([0.229, 0.224, 0.225])
    assert manifest.labels == [str(i) for i in range(10)]
    assert {"torch", "torchvision", "tl_models"} <= set(manifest.versions)
    assert [(h.name, h.version, h.kind) for h in manifest.heads] == [("a", 1, "linear"), ("b", 1, "mlp")]
    for head in manifest.heads:
        accuracy = head.metrics["val_accuracy"]
        assert isinstance(accuracy, float)
        assert accuracy >= 0.5, head.name  # real ImageNet features on real digits: far above chance (0.1)
        assert np.asarray(head.metrics["confusion_matrix"]).sum() == head.data["val"] == 20
        assert head.data["train"] == 60
        assert {"head.pt", "history.json", "curves.png", "confusion.png"} <= set(head.files)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST, ".lock"}
    assert set(manifest.files) == on_disk
    for rel, digest in manifest.files.items():
        assert len(digest) == 64 and digest == file_sha256(out / rel), rel


# (h) the command line


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture) -> Iterator[RunCli]:
    """``run_cli(*argv) -> (exit code, stdout, stderr)`` in-process; undoes main()'s logging setup."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def test_cli_build_on_bad_data_fails_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "data" / "only-class").mkdir(parents=True)
    result = subprocess.run(
        _cli()
        + [
            "build",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "out"),
            "--weights",
            "none",
            "--no-export",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr, result.stderr
    assert "one class (only-class)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / MANIFEST).exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backbone", "resnet19"], "unknown backbone 'resnet19'"),
        (["--weights", "IMAGENET9"], "unknown weights 'IMAGENET9'"),
        (["--head", "../up"], "bad head name"),
        (["--weights", "missing.pth"], "does not exist"),
        (["--fine-tune", "8", "--weights", "none"], "mobilenet_v2 has 7 trainable stages: --fine-tune takes 1 to 7"),
        (["--fine-tune", "-1"], "--fine-tune takes a number of backbone stages"),
        (["--fine-tune", "1", "--augment", "crop,rotate"], "unknown augmentation rotate"),
        (["--fine-tune", "1", "--fine-tune-lr", "0"], "--fine-tune-lr must be positive"),
    ],
)
def test_cli_errors_are_one_line(
    demo_data: Path, tmp_path: Path, run_cli: RunCli, args: list[str], message: str
) -> None:
    code, _, err = run_cli("build", "--data", str(demo_data), "--out", str(tmp_path / "out"), "--no-export", *args)
    assert code == 1
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_build_succeeds(demo_data: Path, offline_weights: list[Path], tmp_path: Path, run_cli: RunCli) -> None:
    code, out, _ = run_cli(
        "build",
        "--data",
        str(demo_data),
        "--out",
        str(tmp_path / "out"),
        "--weights",
        "IMAGENET1K_V1",
        "--epochs",
        "2",
        "--no-export",
        "--head",
        "cli",
    )
    assert code == 0
    assert "cli v1 (linear) on mobilenet_v2" in out
    BuildDir(tmp_path / "out").verify()


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_first_build_leaves_no_partial_folder(
    demo_data: Path, quick_build: QuickBuild, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("the user's own file")
    monkeypatch.setattr(tl_models.training.commit, "plot_confusion", _raise)
    with pytest.raises(RuntimeError, match="injected failure"):
        quick_build(demo_data, out, head="a")
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()


def test_build_raises_data_error_before_touching_out(tmp_path: Path, quick_build: QuickBuild) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError):
        quick_build(tmp_path / "data", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# (i) reproducibility


def test_same_seed_gives_identical_heads(demo_data: Path, quick_build: QuickBuild, tmp_path: Path) -> None:
    kwargs = dict(kind="mlp", hidden=64, dropout=0.3, epochs=4)
    first = quick_build(demo_data, tmp_path / "one", **kwargs)
    second = quick_build(demo_data, tmp_path / "two", **kwargs)
    other = quick_build(demo_data, tmp_path / "three", seed=1, **kwargs)
    a, b, c = (_head_state(tmp_path / d, r.head) for d, r in (("one", first), ("two", second), ("three", other)))
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.head.metrics == second.head.metrics
    assert (tmp_path / "one" / "heads/default/1/history.json").read_text() == (
        tmp_path / "two" / "heads/default/1/history.json"
    ).read_text()
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed is what makes them equal


def _damage(build: Path, kind: str) -> str:
    """Damage a build directory on disk the way a bad copy or a hand edit would; the message the CLI must print."""
    manifest = build / "manifest.json"
    if kind == "manifest not JSON":
        manifest.write_text(manifest.read_text()[:40])
        return f"{manifest} is not valid JSON"
    if kind == "unknown format version":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 99}))
        return f"{manifest} has format version 99; this tl-models reads 1, 2"
    if kind == "listed file missing":
        (build / "heads" / "b" / "1" / "head.onnx").unlink()
        return f"{build / 'heads' / 'b' / '1' / 'head.onnx'} is listed in the manifest but missing"
    with open(build / "backbone.onnx", "r+b") as backbone:  # "corrupt backbone": a few bytes flipped mid-file
        backbone.seek(backbone.seek(0, 2) // 2)
        backbone.write(b"\x00\xff" * 8)
    return f"{build / 'backbone.onnx'} fails its sha256 check"


@pytest.mark.parametrize(
    "kind", ["manifest not JSON", "unknown format version", "listed file missing", "corrupt backbone"]
)
@pytest.mark.parametrize("command", ["triton package", "bento package", "parity"])
def test_a_damaged_build_is_refused_with_the_file_named(
    deployment, tmp_path: Path, run_cli: RunCli, kind: str, command: str
) -> None:
    """Damage on disk is refused before anything is written: exit 1, one line naming the file and what is wrong."""
    build = shutil.copytree(deployment.build_dir, tmp_path / "build")
    message = _damage(build, kind)
    before = _contents(build)
    extra = ["--repo", str(tmp_path / "repo")] if command == "triton package" else []
    code, _, err = run_cli(*command.split(), str(build), *extra)
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "repo").exists()
    assert _contents(build) == before  # nothing touched


def _contents(build: Path) -> dict[Path, bytes]:
    """Every file of a build directory but its lock (which names the last process that held it)."""
    return {p: p.read_bytes() for p in build.rglob("*") if p.is_file() and p.name != ".lock"}


def test_cli_exit_codes_and_no_old_spelling(deployment, tmp_path: Path, run_cli: RunCli) -> None:
    """0 done, 1 user error, 2 usage, 3 parity failed; the spellings before 0.2 (`package triton`) are gone."""
    build = shutil.copytree(deployment.build_dir, tmp_path / "build")
    assert run_cli("parity", str(build), "--batch-sizes", "2")[0] == 0
    code, _, err = run_cli("parity", str(build), "--batch-sizes", "2", "--atol", "0", "--rtol", "0")
    assert code == 3 and "parity failed" in err, err
    code, _, err = run_cli("triton", "swap", "--url", "127.0.0.1:8000", "--build", "build", "--head", "a")
    assert code == 1 and "bad URL '127.0.0.1:8000'" in err, err
    with pytest.raises(SystemExit) as usage:
        run_cli("triton", "unpack", str(build))
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as old_spelling:
        run_cli("package", "triton", str(build), "--repo", str(tmp_path / "repo"))
    assert old_spelling.value.code == 2 and not (tmp_path / "repo").exists()
    code, out, _ = run_cli("triton", "package", str(build), "--repo", str(tmp_path / "repo"))
    assert code == 0 and "build_head_a" in out


def test_the_fused_graph_is_written_only_when_asked(deployment, tmp_path: Path, run_cli: RunCli) -> None:
    """A build holds the backbone once; `export --fused` adds one fused.onnx per head version, parity-checked."""
    build = shutil.copytree(deployment.build_dir, tmp_path / "build")
    versions = sorted(p for p in build.glob("heads/*/*") if p.is_dir())
    assert versions and not list(build.rglob("fused.onnx")) and not list(build.rglob("model.onnx"))
    assert run_cli("export", str(build), "--fused")[0] == 0
    manifest = BuildDir(build).verify()
    for entry in manifest.heads:
        assert "fused.onnx" in entry.files and entry.rel("fused.onnx") in manifest.files
    backbone_size = (build / "backbone.onnx").stat().st_size
    assert all((v / "fused.onnx").stat().st_size > backbone_size for v in versions)


def test_a_manifest_of_an_unknown_format_version_is_refused(built: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(built, tmp_path / "copy")
    data = json.loads((copy / MANIFEST).read_text())
    assert data["format_version"] == 2
    data["format_version"] = 99
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BuildError, match="format version 99; this tl-models reads 1, 2"):
        BuildDir(copy).manifest()
    del data["labels"]
    data["format_version"] = 1
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BuildError, match="labels"):
        BuildDir(copy).manifest()
