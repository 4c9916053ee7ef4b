"""BentoML model store integration: `tl-models bento package BUILD_DIR` and the models the service declares.

Store layout: one model for the backbone, one model per head name with one version per head version, so a new
head (or head version) is added to the store without touching the backbone::

    <build>-backbone:<sha16>     backbone.onnx             version = first 16 hex digits of its sha256
    <build>-backbone:<sha16>     backbone.int8.onnx        with ``--precision int8``: the gated int8 graph
    <build>-head-<name>:v<N>     head.onnx                 version = the head version in the build manifest

Labels (``project=tl-models``, ``kind``, ``build``, ``backbone``, ``precision``, ``head``, ``head_version``) let
the service find a build's models; metadata holds the sha256 of every file (checked again when the service loads
it), the preprocessing, labels, embedding size, the backbone a head was trained on (the fp32 backbone's sha256, for
int8 too), the head's metrics, and for an int8 backbone the heads its gate measured. The service serves the
precision ``TL_MODELS_PRECISION`` names (default fp32).
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
from ..core.heads import (
    BackboneSource,
    HeadSource,
    backbone_from_build,
    check_precision,
    frozen_versions,
    head_from_build,
    head_source_from_build,
    sources_from_build,
)
from ..core.identity import IDENTITY_KEY, identity_facts, same_backbone
from ..core.manifest import BuildDir
from ..core.names import BACKBONE_FILES, BACKBONE_ONNX, HEAD_ONNX, check_name

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
        Tag(name, None)  # validates: lowercase letters, digits, '-', '_', '.', at most 63 characters
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
    """Create ``tag`` with ``files`` unless it exists with the same sha256s (then keep it; an int8 backbone whose
    record changed since, by `tl-models quantize --verify` on another machine, is stored again with the new one)."""
    import bentoml

    existing = _get(tag)
    if existing is not None:
        if existing.info.metadata.get("files") != metadata["files"]:
            raise BuildError(
                f"the BentoML store already holds {tag} with other files (a rebuilt build directory?); "
                f"delete it with `bentoml models delete {tag}` or package under another build name"
            )
        if existing.info.metadata.get("int8") == metadata.get("int8"):
            report.existing.append(tag)
            return
        bentoml.models.delete(tag)
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        for name, source in files.items():
            shutil.copyfile(source, model.path_of(name))
    report.created.append(tag)
    log.info("saved %s", tag)


def package_build(path: str | Path, precision: str = "fp32") -> PackageReport:
    """Save a build's backbone of ``precision`` and every exported head version into the BentoML model store;
    BuildError for int8 when the build has no int8 backbone past its gate for the latest heads."""
    build_dir = BuildDir(path)
    manifest = build_dir.verify()
    backbone = backbone_from_build(build_dir, manifest, precision)
    report = PackageReport(manifest.name)
    backbone_tag = f"{backbone_model_name(manifest.name)}:{backbone.graph_sha256[:16]}"
    common = {"project": PROJECT, "build": manifest.name, "backbone": manifest.backbone}
    file = BACKBONE_FILES[precision]
    gate = {"gated": sorted(backbone.gated), "int8": manifest.int8} if backbone.gated is not None else {}
    _save(
        backbone_tag,
        {file: Path(backbone.path)},
        {**common, "kind": "backbone", "precision": precision},
        {
            "files": {file: backbone.graph_sha256},
            **identity_facts(backbone.sha256),
            "weights": manifest.weights,
            "embedding_dim": manifest.embedding_dim,
            "input_size": manifest.input_size,
            "preprocessing": manifest.preprocessing,
            "labels": manifest.labels,
            "versions": manifest.versions,
            **gate,
        },
        report,
    )
    for entry in frozen_versions(manifest):
        if entry.rel(HEAD_ONNX) not in manifest.files:
            continue
        head = head_from_build(build_dir, manifest, entry)
        metrics = {k: v for k, v in entry.metrics.items() if isinstance(v, (int, float))}
        _save(
            head_tag(manifest.name, head.name, head.version),
            {HEAD_ONNX: Path(head.path)},
            {**common, "kind": "head", "head": head.name, "head_version": str(head.version)},
            {
                "files": {HEAD_ONNX: head.sha256},
                "head": head.name,
                "version": head.version,
                "head_kind": entry.kind,
                "labels": list(head.labels),
                "embedding_dim": manifest.embedding_dim,
                **identity_facts(backbone.sha256),
                "backbone_tag": backbone_tag,
                "metrics": metrics,
                "parity": entry.parity or {},
            },
            report,
        )
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
            raise BuildError(
                f"build {build!r} is not in the BentoML store ({_home()}); packaged builds: "
                f"{', '.join(builds) or 'none'}. Run `tl-models bento package BUILD_DIR`"
            )
        return build
    if len(builds) != 1:
        raise BuildError(
            f"{'no build' if not builds else 'several builds'} in the BentoML store ({_home()})"
            f"{': ' + ', '.join(builds) if builds else ''}. Run `tl-models bento package BUILD_DIR`, "
            "set TL_MODELS_BENTO=<build> to pick one, or TL_MODELS_BUILD=<dir> to serve a directory"
        )
    return builds[0]


def _home() -> str:
    return os.environ.get("BENTOML_HOME") or str(Path.home() / "bentoml")


def _precision(model) -> str:
    return model.info.labels.get("precision", "fp32")  # backbones packaged before int8 existed are fp32


def _backbone_sha256(model) -> str:
    """The fp32 backbone a stored backbone model serves (or was quantized from): what its heads were trained on."""
    meta = model.info.metadata
    return meta.get(IDENTITY_KEY) or meta["files"][BACKBONE_ONNX]


def build_models(build: str, precision: str = "fp32") -> tuple[object, list]:
    """The build's newest backbone model of ``precision`` and every head model version made for that backbone
    (for int8: those its gate measured)."""
    backbones = sorted(
        (m for m in _tl_models("backbone", build) if _precision(m) == check_precision(precision)),
        key=lambda m: m.info.creation_time,
    )
    if not backbones:
        raise BuildError(
            f"no {precision} backbone of build {build!r} in the BentoML store ({_home()}): run "
            f"`tl-models bento package BUILD_DIR{' --precision int8' if precision == 'int8' else ''}`"
        )
    backbone = backbones[-1]
    source = backbone_source(backbone)
    heads = [
        m
        for m in _tl_models("head", build)
        if same_backbone(m.info.metadata.get(IDENTITY_KEY), source.sha256)
        and source.serves(m.info.metadata["files"][HEAD_ONNX])
    ]
    return backbone, sorted(heads, key=lambda m: (m.info.labels["head"], int(m.info.labels["head_version"])))


def serving_precision() -> str:
    """The precision the service serves: ``TL_MODELS_PRECISION`` (fp32 or int8), default fp32."""
    return check_precision(os.environ.get("TL_MODELS_PRECISION") or "fp32")


def declared_models() -> list:
    """BentoModel references the service declares (so `bentoml build` bundles them); none for a build dir."""
    from bentoml.models import BentoModel

    if os.environ.get("TL_MODELS_BUILD"):
        return []
    backbone, heads = build_models(resolve_build(), serving_precision())
    return [BentoModel(m.tag) for m in (backbone, *heads)]


def backbone_source(model) -> BackboneSource:
    """A stored backbone model as a serving source (sha256 is checked when the service loads it)."""
    meta, precision = model.info.metadata, _precision(model)
    file = BACKBONE_FILES[precision]
    gated = frozenset(meta["gated"]) if "gated" in meta else None
    return BackboneSource(
        path=model.path_of(file),
        sha256=_backbone_sha256(model),
        preprocessing=meta["preprocessing"],
        labels=tuple(meta["labels"]),
        build=model.info.labels["build"],
        origin=f"bentoml:{model.tag}",
        precision=precision,
        graph_sha256=meta["files"][file],
        gated=gated,
        int8_machine=(meta.get("int8") or {}).get("machine"),
    )


def head_source(model) -> HeadSource:
    """A stored head model as a serving source."""
    meta = model.info.metadata
    return HeadSource(
        name=meta["head"],
        version=int(meta["version"]),
        path=model.path_of(HEAD_ONNX),
        sha256=meta["files"][HEAD_ONNX],
        labels=tuple(meta["labels"]),
        backbone_sha256=meta[IDENTITY_KEY],
        origin=f"bentoml:{model.tag}",
    )


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


def find_head(build: str, name: str, version: int) -> HeadSource:
    """A head version of the served build, from where the service's models come from: the build directory
    ``TL_MODELS_BUILD`` (shared storage in a fleet), else the model store."""
    if os.environ.get("TL_MODELS_BUILD"):
        return head_source_from_build(os.environ["TL_MODELS_BUILD"], name, version)
    return stored_head(head_tag(build, check_name(name), version))


def serving_sources() -> tuple[BackboneSource, list[HeadSource]]:
    """What the service serves: the build directory ``TL_MODELS_BUILD``, else a build of the model store."""
    if os.environ.get("TL_MODELS_BUILD"):
        return sources_from_build(os.environ["TL_MODELS_BUILD"], serving_precision())
    backbone, heads = build_models(resolve_build(), serving_precision())
    return backbone_source(backbone), [head_source(m) for m in heads]


def default_state_dir(backbone: BackboneSource) -> Path:
    """Route and head catalog of a build: under BENTOML_HOME, one folder per build, backbone and precision (an int8
    service admits only gated heads, so it keeps a route of its own)."""
    suffix = "" if backbone.precision == "fp32" else f"-{backbone.precision}"
    return Path(_home()) / "tl-models" / f"{backbone.build}-{backbone.sha256[:12]}{suffix}"
