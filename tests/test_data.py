"""ImageFolder loading: every unusable layout is a clear DataError, bad files are skipped and counted;
the stratified split is seeded, reproducible and keeps every class on both sides."""

from __future__ import annotations

import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_models.training.data import DataError, load_image_folder, stratified_split


def _png(path: Path, value: int = 128, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def _encoded(fmt: str, size: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def _folder(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _png(root / cls / f"{i}.png", value=10 * i)
    return root


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path)


def test_images_without_class_folders(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    with pytest.raises(DataError, match=r"no class sub-folders \(expected .*/<class>/<image>\)"):
        load_image_folder(tmp_path)


def test_hidden_folders_are_not_classes(tmp_path: Path) -> None:
    _folder(tmp_path, {"cat": 2})
    _folder(tmp_path / ".git", {"objects": 2})
    with pytest.raises(DataError, match="one class \\(cat\\)"):
        load_image_folder(tmp_path)


def test_one_class_only(tmp_path: Path) -> None:
    _folder(tmp_path, {"cat": 5})
    with pytest.raises(DataError, match="one class \\(cat\\); a classifier needs at least 2"):
        load_image_folder(tmp_path)


def test_class_with_no_files(tmp_path: Path) -> None:
    _folder(tmp_path, {"cat": 3, "dog": 0})
    with pytest.raises(DataError, match="class 'dog' .* has no readable images"):
        load_image_folder(tmp_path)


def test_class_with_only_unreadable_files(tmp_path: Path) -> None:
    _folder(tmp_path, {"cat": 3})
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("a dog")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match="class 'dog' .* has no readable images"):
        load_image_folder(tmp_path)


def test_class_with_one_image(tmp_path: Path) -> None:
    _folder(tmp_path, {"cat": 3, "dog": 1})
    with pytest.raises(DataError, match="class 'dog' has 1 readable image; at least 2 are needed"):
        load_image_folder(tmp_path)


def test_bad_files_are_skipped_and_counted(tmp_path: Path) -> None:
    """Non-images, corrupt, truncated, empty and tiny files are skipped with a reason; the good ones all load."""
    _folder(tmp_path, {"cat": 3, "dog": 2})
    bad = {
        tmp_path / "cat" / "readme.txt": b"hello",
        tmp_path / "cat" / "labels.csv": b"a,b\n",
        tmp_path / "dog" / "empty.png": b"",
        tmp_path / "dog" / "text.jpg": b"this is not a jpeg",
        tmp_path / "dog" / "truncated.png": _encoded("PNG")[:300],
        tmp_path / "dog" / "truncated.jpg": _encoded("JPEG")[:400],
        tmp_path / "cat" / "nested" / "garbage.bmp": b"BM" + bytes(10),
        tmp_path / "dog" / "tiny.png": _encoded("PNG", size=4),  # the servers refuse it: too small
    }
    for path, payload in bad.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored, not counted
    _png(tmp_path / "cat" / "nested" / "deep.png")  # images in sub-folders of a class count

    data = load_image_folder(tmp_path)
    assert data.classes == ["cat", "dog"]
    assert Counter(data.targets) == {0: 4, 1: 2}
    assert {p for p, _ in data.skipped} == set(bad)
    assert len(data.skipped) == len(bad)
    reasons = dict(data.skipped)
    assert "not an image file" in reasons[tmp_path / "cat" / "readme.txt"]
    assert all(reason for reason in reasons.values())
    assert not set(data.paths) & set(bad)


def test_skipped_files_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _folder(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / "x.png").write_bytes(b"junk")
    with caplog.at_level("WARNING", logger="tl_models.training.data"):
        data = load_image_folder(tmp_path)
    assert len(data.skipped) == 1
    assert "skipped 1 unreadable or non-image files" in caplog.text


def test_content_hash_follows_the_bytes(tmp_path: Path) -> None:
    _folder(tmp_path / "d", {"a": 2, "b": 2})
    first = load_image_folder(tmp_path / "d").content_hash()
    assert load_image_folder(tmp_path / "d").content_hash() == first
    shutil.copytree(tmp_path / "d", tmp_path / "e")
    assert load_image_folder(tmp_path / "e").content_hash() == first  # same files elsewhere: same features
    _png(tmp_path / "e" / "b" / "1.png", value=99)
    assert load_image_folder(tmp_path / "e").content_hash() != first


def test_demo_data_loads(demo_data: Path) -> None:
    data = load_image_folder(demo_data)
    assert data.classes == [str(i) for i in range(10)]
    assert Counter(data.targets) == {i: 8 for i in range(10)}
    assert data.skipped == []


TARGETS = [c for c in range(6) for _ in range(c + 2)]  # uneven classes of 2..7 members


@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.5, 0.9])
def test_split_keeps_every_class_on_both_sides(val_fraction: float) -> None:
    train, val = stratified_split(TARGETS, val_fraction, seed=0)
    assert sorted(train + val) == list(range(len(TARGETS)))
    assert not set(train) & set(val)
    for cls in set(TARGETS):
        assert any(TARGETS[i] == cls for i in train), cls
        assert any(TARGETS[i] == cls for i in val), cls


def test_split_follows_the_fraction_per_class() -> None:
    targets = [c for c in range(4) for _ in range(50)]
    _, val = stratified_split(targets, 0.2, seed=1)
    assert Counter(targets[i] for i in val) == {c: 10 for c in range(4)}


def test_split_is_seeded_and_reproducible() -> None:
    targets = [c for c in range(5) for _ in range(20)]
    first = stratified_split(targets, 0.2, seed=7)
    assert stratified_split(targets, 0.2, seed=7) == first
    assert stratified_split(list(targets), 0.2, seed=7) == first
    others = {tuple(stratified_split(targets, 0.2, seed=s)[1]) for s in range(5)}
    assert len(others) > 1  # the seed matters


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fractions(val_fraction: float) -> None:
    with pytest.raises(DataError, match="between 0 and 1"):
        stratified_split(TARGETS, val_fraction)
