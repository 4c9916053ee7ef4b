"""A backbone cut at a stage boundary (``tl_models.training.cut``): the trunk then the tail is the whole backbone,
for every registered backbone at every boundary; cuts that cannot be made are refused in one line."""

from __future__ import annotations

import pytest
import torch

from tl_models.training.backbones import BACKBONES, load_backbone
from tl_models.training.cut import CutError, cut_backbone, tail_state


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_trunk_then_tail_is_the_whole_backbone_at_every_stage_boundary(name):
    backbone = load_backbone(name, "none", seed=0)
    size = backbone.preprocessing.crop_size
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = backbone.module(images)
        assert whole.shape == (2, backbone.spec.embedding_dim)
        parameters = sum(p.numel() for p in backbone.module.parameters())
        tails = []
        for stages in range(1, len(backbone.spec.stages) + 1):
            cut = cut_backbone(backbone, stages)
            activation = cut.trunk(images)
            assert tuple(activation.shape) == (2, *cut.activation)
            assert torch.equal(cut.tail(activation), whole), (name, stages, cut.at)
            tails.append(sum(p.numel() for p in cut.tail.parameters()))
    # each cut further back hands the tail more of the network, never all of it past the normalisation
    assert tails == sorted(tails) and tails[0] > 0 and tails[-1] <= parameters, tails


def test_a_tail_shares_the_backbone_parameters_and_saves_only_its_own():
    backbone = load_backbone("mobilenet_v2", "none", seed=0)
    cut = cut_backbone(backbone, 2)
    assert cut.at == "features.14" and cut.record() == {"stages": 2, "at": "features.14", "activation": [96, 14, 14]}
    state = tail_state(cut)
    assert state and all(
        key.startswith(
            (
                "features.features.14",
                "features.features.15",
                "features.features.16",
                "features.features.17",
                "features.features.18",
            )
        )
        for key in state
    )
    assert not any(key.startswith("features.features.13") for key in state)
    with torch.no_grad():  # tuning the backbone's last stages in place tunes the tail of a cut made before
        backbone.module.features.features[18][0].weight.mul_(2)
    assert not torch.equal(
        cut.tail.state_dict()["features.features.18.0.weight"], state["features.features.18.0.weight"]
    )


def test_a_cut_the_backbone_does_not_have_is_refused():
    backbone = load_backbone("resnet18", "none", seed=0)
    with pytest.raises(Exception, match="resnet18 has 4 trainable stages: --fine-tune takes 1 to 4, got 5"):
        cut_backbone(backbone, 5)
    assert issubclass(CutError, Exception)
