"""BentoML model store integration: `tl-models bento package BUILD_DIR` and the models the service declares.

Store layout: one model for the backbone, one model per head name with one version per head version, so a new
head (or head version) is added to the store without touching the backbone::

    <build>-backbone:<sha16>     backbone.onnx             version = first 16 hex digits of its sha256
    <build>-head-<name>:v<N>     head.onnx                 version = the head version in the build manifest

Labels (``project=tl-models``, ``kind``, ``build``, ``backbone``, ``head``, ``head_version``) let the service
find a build's models; metadata holds the sha256 of every file (checked again when the service loads it), the
preprocessing, labels, embedding size, the backbone a head was trained on, and the head's metrics.
Packaging is idempotent: models already in the store with the same sha256 are kept; one with the same tag and
other bytes is an error. ``BENTOML_HOME`` selects the store, as for every BentoML command.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import BadRequest, BuildError, NotFound
from ..core.heads import BackboneSource, HeadSource, backbone_from_build, head_from_build, sources_from_build
from ..core.manifest import BuildDir
from ..core.names import BACKBONE_ONNX, HEAD_ONNX

log = logging.getLogger(__name__)

PROJECT = "tl-models"


@dataclass
class PackageReport:
    """What `tl-models bento package` did: tags created and tags that were already in the store."""

    build: str
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)


def backbone_model_name(build: str) -> str:
    return _tag_name(f"{build}-backbone")


def head_model_name(build: str, head: str) -> str:
    return _tag_name(f"{build}-head-{head}")


def head_tag(build: str, head: str, version: int) -> str:
    return f"{head_model_name(build, head)}:v{version}"


def _tag_name(name: str) -> str:
    from bentoml import Tag

    name = name.lower()
    try:
        Tag(name)  # validates: lowercase letters, digits, '-', '_', '.', at most 63 characters
    except ValueError as exc:
        raise BuildError(f"cannot name a BentoML model {name!r}: {exc} (use a shorter build or head name)") from None
    return name


def _get(tag: str):
    """The stored model, or None."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(tag)
    except NotFound:
        return None


def _save(tag: str, files: dict[str, Path], labels: dict[str, str], metadata: dict, report: PackageReport) -> None:
    """Create ``tag`` with ``files`` unless it exists with the same sha256s (then keep it)."""
    import bentoml

    existing = _get(tag)
    if existing is not None:
        if existing.info.metadata.get("files") != metadata["files"]:
            raise BuildError(f"the BentoML store already holds {tag} with other files (a rebuilt build directory?); "
                             f"delete it with `bentoml models delete {tag}` or package under another build name")
        report.existing.append(tag)
        return
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        for name, source in files.items():
            shutil.copyfile(source, model.path_of(name))
    report.created.append(tag)
    log.info("saved %s", tag)


def package_build(path: str | Path) -> PackageReport:
    """Save a build's backbone and every exported head version into the BentoML model store."""
    build_dir = BuildDir(path)
    manifest = build_dir.verify()
    backbone = backbone_from_build(build_dir, manifest)
    report = PackageReport(manifest.name)
    backbone_tag = f"{backbone_model_name(manifest.name)}:{backbone.sha256[:16]}"
    common = {"project": PROJECT, "build": manifest.name, "backbone": manifest.backbone}
    _save(backbone_tag, {BACKBONE_ONNX: Path(backbone.path)}, {**common, "kind": "backbone"},
          {"files": {BACKBONE_ONNX: backbone.sha256}, "weights": manifest.weights,
           "embedding_dim": manifest.embedding_dim, "input_size": manifest.input_size,
           "preprocessing": manifest.preprocessing, "labels": manifest.labels, "versions": manifest.versions}, report)
    for entry in manifest.heads:
        if entry.rel(HEAD_ONNX) not in manifest.files:
            continue
        head = head_from_build(build_dir, manifest, entry)
        metrics = {k: v for k, v in entry.metrics.items() if isinstance(v, (int, float))}
        _save(head_tag(manifest.name, head.name, head.version), {HEAD_ONNX: Path(head.path)},
              {**common, "kind": "head", "head": head.name, "head_version": str(head.version)},
              {"files": {HEAD_ONNX: head.sha256}, "head": head.name, "version": head.version,
               "head_kind": entry.kind, "labels": list(head.labels), "embedding_dim": manifest.embedding_dim,
               "backbone_sha256": backbone.sha256, "backbone_tag": backbone_tag, "metrics": metrics,
               "parity": entry.parity or {}}, report)
    return report


# ---------------------------------------------------------------- reading the store

def _tl_models(kind: str, build: str | None = None) -> list:
    import bentoml

    found = []
    for model in bentoml.models.list():
        labels = model.info.labels
        if labels.get("project") == PROJECT and labels.get("kind") == kind and build in (None, labels.get("build")):
            found.append(model)
    return found


def stored_builds() -> list[str]:
    """Names of the builds packaged into the store."""
    return sorted({m.info.labels["build"] for m in _tl_models("backbone")})


def resolve_build(build: str | None = None) -> str:
    """The build to serve: ``build``, else ``TL_MODELS_BENTO``, else the only build in the store."""
    build = build or os.environ.get("TL_MODELS_BENTO")
    builds = stored_builds()
    if build:
        if build not in builds:
            raise BuildError(f"build {build!r} is not in the BentoML store ({_home()}); packaged builds: "
                             f"{', '.join(builds) or 'none'}. Run `tl-models bento package BUILD_DIR`")
        return build
    if len(builds) != 1:
        raise BuildError(f"{'no build' if not builds else 'several builds'} in the BentoML store ({_home()})"
                         f"{': ' + ', '.join(builds) if builds else ''}. Run `tl-models bento package BUILD_DIR`, "
                         "set TL_MODELS_BENTO=<build> to pick one, or TL_MODELS_BUILD=<dir> to serve a directory")
    return builds[0]


def _home() -> str:
    return os.environ.get("BENTOML_HOME") or str(Path.home() / "bentoml")


def build_models(build: str) -> tuple[object, list]:
    """The build's newest backbone model and every head model version made for that backbone."""
    backbones = sorted(_tl_models("backbone", build), key=lambda m: m.info.creation_time)
    if not backbones:
        raise BuildError(f"no backbone of build {build!r} in the BentoML store ({_home()})")
    backbone = backbones[-1]
    sha = backbone.info.metadata["files"][BACKBONE_ONNX]
    heads = [m for m in _tl_models("head", build) if m.info.metadata.get("backbone_sha256") == sha]
    return backbone, sorted(heads, key=lambda m: (m.info.labels["head"], int(m.info.labels["head_version"])))


def declared_models() -> list:
    """BentoModel references the service declares (so `bentoml build` bundles them); none for a build dir."""
    from bentoml.models import BentoModel

    if os.environ.get("TL_MODELS_BUILD"):
        return []
    backbone, heads = build_models(resolve_build())
    return [BentoModel(m.tag) for m in (backbone, *heads)]


def backbone_source(model) -> BackboneSource:
    """A stored backbone model as a serving source (sha256 is checked when the service loads it)."""
    meta = model.info.metadata
    return BackboneSource(path=model.path_of(BACKBONE_ONNX), sha256=meta["files"][BACKBONE_ONNX],
                          preprocessing=meta["preprocessing"], labels=tuple(meta["labels"]),
                          build=model.info.labels["build"], origin=f"bentoml:{model.tag}")


def head_source(model) -> HeadSource:
    """A stored head model as a serving source."""
    meta = model.info.metadata
    return HeadSource(name=meta["head"], version=int(meta["version"]), path=model.path_of(HEAD_ONNX),
                      sha256=meta["files"][HEAD_ONNX], labels=tuple(meta["labels"]),
                      backbone_sha256=meta["backbone_sha256"], origin=f"bentoml:{model.tag}")


def stored_head(tag: str) -> HeadSource:
    """A head model of the store by tag; BadRequest for a malformed tag or another kind of model, NotFound."""
    from bentoml.exceptions import BentoMLException

    try:
        model = _get(tag)
    except (ValueError, BentoMLException) as exc:  # BentoML raises either for a malformed tag
        raise BadRequest(f"bad model tag {tag!r}: {exc}") from None
    if model is None:
        raise NotFound(f"no model {tag} in the BentoML store")
    if model.info.labels.get("project") != PROJECT or model.info.labels.get("kind") != "head":
        raise BadRequest(f"model {tag} is not a tl-models head")
    return head_source(model)


def serving_sources() -> tuple[BackboneSource, list[HeadSource]]:
    """What the service serves: the build directory ``TL_MODELS_BUILD``, else a build of the model store."""
    if os.environ.get("TL_MODELS_BUILD"):
        return sources_from_build(os.environ["TL_MODELS_BUILD"])
    backbone, heads = build_models(resolve_build())
    return backbone_source(backbone), [head_source(m) for m in heads]


def default_state_dir(backbone: BackboneSource) -> Path:
    """Route and head catalog of a build: under BENTOML_HOME, one folder per build and backbone."""
    return Path(_home()) / "tl-models" / f"{backbone.build}-{backbone.sha256[:12]}"
