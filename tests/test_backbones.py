"""Backbone registry facts against real models, and every way ``--weights`` can be given or go wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from PIL import Image
from skimage import data as skdata

from tl_models.core.errors import NotFound, UserError
from tl_models.core.files import file_sha256
from tl_models.core.preprocess import transform_image
from tl_models.training.backbones import BACKBONES, WeightsError, get_spec, load_backbone, unfreeze_stages

TABBY_TO_EGYPTIAN_CAT = range(281, 286)  # ImageNet classes 281..285: tabby, tiger cat, Persian, Siamese, Egyptian


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_embedding_dim_matches_the_stripped_model(name: str) -> None:
    """The registry's embedding_dim is what the classifier-less model really returns, at its crop size;
    the model is frozen and its stages (what ``--fine-tune`` trains) exist, have parameters and do not overlap."""
    backbone = load_backbone(name, "none")
    crop = backbone.preprocessing.crop_size
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, crop, crop), dtype=np.uint8))
    with torch.inference_mode():
        out = backbone.module(images)
    assert out.shape == (2, BACKBONES[name].embedding_dim)
    assert backbone.weights_id == "none:seed=0"
    assert not any(p.requires_grad for p in backbone.module.parameters())
    assert not backbone.module.training
    seen: set[int] = set()
    for stage in backbone.spec.stages:
        params = {id(p) for path in stage for p in backbone.module.features.get_submodule(path).parameters()}
        assert params and not params & seen, stage
        seen |= params
    with pytest.raises(UserError, match=f"takes 1 to {len(backbone.spec.stages)}"):
        unfreeze_stages(backbone, len(backbone.spec.stages) + 1)


def test_unknown_backbone_names_the_known_ones() -> None:
    with pytest.raises(NotFound, match="resnet18"):
        get_spec("resnet19")


def test_unknown_weights_enum_names_the_choices() -> None:
    with pytest.raises(WeightsError) as info:
        load_backbone("resnet18", "IMAGENET1K_V9")
    message = str(info.value)
    assert "IMAGENET1K_V9" in message
    assert "IMAGENET1K_V1" in message and "DEFAULT" in message


def test_missing_pth_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="does not exist") as info:
        load_backbone("resnet18", str(missing))
    assert str(missing) in str(info.value)


def test_unreadable_pth_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read"):
        load_backbone("resnet18", str(bad))


def test_pth_of_another_architecture_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "v3.pth"
    torch.save(tvm.mobilenet_v3_small(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit resnet18"):
        load_backbone("resnet18", str(path))


def test_pth_state_dict_loads_with_a_file_weights_id(tmp_path: Path) -> None:
    """A state_dict saved from a model loads into the backbone (not the seeded init) and is identified by sha256."""
    torch.manual_seed(123)
    model = tvm.mobilenet_v3_small(weights=None)
    path = tmp_path / "mine.pth"
    torch.save(model.state_dict(), path)
    backbone = load_backbone("mobilenet_v3_small", str(path))
    assert backbone.weights_id == f"file:sha256={file_sha256(path)}"
    loaded = backbone.module.features.state_dict()
    saved = model.state_dict()
    assert set(loaded) == {k for k in saved if not k.startswith("classifier.")}  # classifier stripped
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key
    seeded = load_backbone("mobilenet_v3_small", "none").module.features.state_dict()
    assert not torch.equal(seeded["features.0.0.weight"], loaded["features.0.0.weight"])


def test_checkpoint_dict_with_state_dict_key_loads(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    model = tvm.resnet18(weights=None)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    backbone = load_backbone("resnet18", str(path))
    assert torch.equal(backbone.module.get_parameter("features.conv1.weight"), model.conv1.weight)


def _chelsea(backbone) -> torch.Tensor:
    image = Image.fromarray(skdata.chelsea()).convert("RGB")
    return torch.from_numpy(transform_image(image, backbone.preprocessing)[None])


def test_mobilenet_v2_imagenet_weights_load_offline_and_see_a_cat(offline_weights: list[Path]) -> None:
    """IMAGENET1K_V1 loads from the hub cache with no network; backbone + the real classifier say 'cat'."""
    backbone = load_backbone("mobilenet_v2", "IMAGENET1K_V1")
    assert backbone.weights_id == "torchvision:MobileNet_V2_Weights.IMAGENET1K_V1"
    full = tvm.mobilenet_v2(weights=tvm.MobileNet_V2_Weights.IMAGENET1K_V1).eval()
    image = _chelsea(backbone)
    with torch.inference_mode():
        embedding = backbone.module(image)
        logits = full.classifier(embedding)
        reference = full(
            (image.float() / 255.0 - torch.tensor(backbone.preprocessing.mean).reshape(1, 3, 1, 1))
            / torch.tensor(backbone.preprocessing.std).reshape(1, 3, 1, 1)
        )
    assert int(logits.argmax()) in TABBY_TO_EGYPTIAN_CAT
    assert int(reference.argmax()) == int(logits.argmax())
    torch.testing.assert_close(logits, reference, atol=1e-3, rtol=1e-3)
    assert float(torch.softmax(logits, 1)[0, TABBY_TO_EGYPTIAN_CAT].sum()) > 0.5


def test_absent_enum_file_says_which_file_goes_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No internet and no file in the hub cache: the error names the file and the folder to put it in."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # refuse downloads even where the internet is reachable
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(WeightsError) as info:
        load_backbone("resnet18", "IMAGENET1K_V1")
    message = str(info.value)
    filename = Path(tvm.ResNet18_Weights.IMAGENET1K_V1.url).name
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert filename in message
    assert str(folder) in message
    assert tvm.ResNet18_Weights.IMAGENET1K_V1.url in message
    assert not (folder / filename).exists()


def test_inception_v3_weights_keep_torchvision_transform_input(tmp_path: Path) -> None:
    """torchvision builds inception_v3 with transform_input=True for pretrained weights; loaded from a file, our
    backbone gives that model's embedding (the re-normalisation is the graph's mean = std = 0.5), 299 px input,
    the auxiliary classifier gone. With --weights none it is torchvision's weights=None model (ImageNet mean/std)."""
    torch.manual_seed(0)
    reference = tvm.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    path = tmp_path / "inception.pth"
    torch.save(reference.state_dict(), path)
    reference.fc = torch.nn.Identity()
    reference.eval()
    backbone = load_backbone("inception_v3", str(path))
    prep = backbone.preprocessing
    assert (prep.crop_size, prep.resize_size, prep.mean, prep.std) == (299, 342, (0.5,) * 3, (0.5,) * 3)
    assert backbone.module.features.AuxLogits is None and "AuxLogits" not in str(list(backbone.module.state_dict()))
    image = _chelsea(backbone)
    imagenet = (
        torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1),
    )
    with torch.inference_mode():
        ours = backbone.module(image)
        theirs = reference((image.float() / 255.0 - imagenet[0]) / imagenet[1])
    assert ours.shape == (1, 2048)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
    assert load_backbone("inception_v3", "none").preprocessing.mean == (0.485, 0.456, 0.406)


def test_backbones_command_lists_every_row_with_its_input_and_stages(capsys: pytest.CaptureFixture) -> None:
    from tl_models.cli import main

    assert main(["backbones"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(BACKBONES)
    assert rows["inception_v3"][1:4] == ["2048", "299", "4"] and rows["vgg16_bn"][1:4] == ["512", "224", "5"]
