"""The one backbone-identity check (``tl_models.core.identity``): one rule and one message wherever a head, a state
directory, a stored model or an embedding log meets a backbone."""

from __future__ import annotations

import pytest

from tl_models.core.errors import Conflict, http_status
from tl_models.core.identity import IDENTITY_KEY, OtherBackbone, check_backbone, identity_facts, same_backbone

SERVED = "a" * 64
OTHER = "b" * 64


def test_the_same_backbone_passes_and_an_unrecorded_one_does_not():
    assert same_backbone(SERVED, SERVED)
    assert not same_backbone(OTHER, SERVED) and not same_backbone(None, SERVED)
    check_backbone("head a:1", SERVED, SERVED, "this service")  # no error


def test_another_backbone_is_one_line_naming_both_and_what_to_do():
    with pytest.raises(OtherBackbone) as caught:
        check_backbone("the embedding log /logs/x", OTHER, SERVED, "the build b", "train from a log of this build")
    assert caught.value.message == (
        "the embedding log /logs/x was made for another backbone (sha256 bbbbbbbbbbbb…); the build b runs "
        "aaaaaaaaaaaa…: train from a log of this build"
    )
    assert isinstance(caught.value, Conflict) and http_status(caught.value) == 409


def test_an_unrecorded_backbone_is_refused_by_name():
    with pytest.raises(OtherBackbone, match="head a:1 was made for an unrecorded backbone; this service runs"):
        check_backbone("head a:1", None, SERVED, "this service")


def test_the_facts_that_name_a_backbone_round_trip_through_the_check():
    facts = identity_facts(SERVED)
    assert facts == {IDENTITY_KEY: SERVED}
    check_backbone("a log", facts.get(IDENTITY_KEY), SERVED, "this build")
