"""The one backbone-identity check: which backbone a head, a state directory or an embedding log was made for.

A backbone is named by the sha256 of its fp32 ``backbone.onnx`` (:meth:`Manifest.backbone_sha256
<tl_models.core.manifest.Manifest.backbone_sha256>`, :attr:`BackboneSource.sha256
<tl_models.core.heads.BackboneSource.sha256>`), whatever precision is served: an int8 graph keeps the name of the
graph it was quantized from. Everything that meets a backbone asks here, with one rule and one message: the head
admission both servers share (``core.heads.admit_head``, which Triton's swap calls), BentoML's state directory
(``bento.registry.check_state``) and model store (``bento.store``), and ``build --from-log`` (``training.traffic``)
against the log the judge wrote (:func:`identity_facts`).
"""

from __future__ import annotations

from .errors import Conflict

IDENTITY_KEY = "backbone_sha256"  # the key that names the backbone in a log's facts and a stored model's metadata


class OtherBackbone(Conflict):
    """Something made for another backbone than the one it meets (409 / ``ALREADY_EXISTS``)."""


def same_backbone(made_for: str | None, backbone_sha256: str) -> bool:
    """Whether something made for the backbone ``made_for`` (None: unrecorded) may run on ``backbone_sha256``."""
    return made_for is not None and made_for == backbone_sha256


def check_backbone(what: str, made_for: str | None, backbone_sha256: str, here: str, fix: str = "") -> None:
    """:class:`OtherBackbone` unless :func:`same_backbone`: one line naming ``what``, both backbones (sha256
    prefixes), ``here`` (what runs ``backbone_sha256``) and, when given, what to do instead."""
    if not same_backbone(made_for, backbone_sha256):
        made = "an unrecorded backbone" if made_for is None else f"another backbone (sha256 {made_for[:12]}…)"
        raise OtherBackbone(
            f"{what} was made for {made}; {here} runs {backbone_sha256[:12]}…{f': {fix}' if fix else ''}"
        )


def identity_facts(backbone_sha256: str) -> dict[str, str]:
    """The part of an embedding log's facts or a stored model's metadata that names its backbone: what
    :func:`check_backbone` compares with."""
    return {IDENTITY_KEY: backbone_sha256}
