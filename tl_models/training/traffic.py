"""Train a new head version from served traffic: the embedding log's records that got feedback labels.

The backbone is frozen, so the embeddings a service logged are exactly the features a head trains on: no image is
read and the backbone does not run (except for the parity check of the exported head). The log must come from a
service of this build's backbone (its sha256 is in the log's index); optionally the build's original training
images (``--data``) join the logged examples.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.drift import EmbeddingReference
from ..core.embedding_log import read_log
from ..core.errors import BadRequest, BuildError
from ..core.identity import IDENTITY_KEY, check_backbone
from ..core.manifest import BuildDir
from .architectures import HeadSpec, build_head
from .build_backbone import extraction_engine, load_build_backbone
from .commit import commit_head
from .data import load_data, stratified_split
from .features import FeatureCache, default_cache_dir
from .options import BuildOptions, BuildReport
from .train import fit

log = logging.getLogger(__name__)


def build_from_log(options: BuildOptions) -> BuildReport:
    """A new version of ``options.head`` in the build ``options.out``, trained on the labelled records of the
    embedding log ``options.from_log`` (and the images of ``options.data`` when given)."""
    if options.unlabeled or options.target or options.fine_tune.stages:
        raise BadRequest(
            "--from-log trains on logged embeddings: it cannot be combined with --unlabeled, --target or --fine-tune"
        )
    build_dir = BuildDir(options.out)
    if not build_dir.exists():
        raise BuildError(
            f"--from-log adds a head version to the build whose service wrote the log: {options.out} "
            "is no build directory"
        )
    if options.from_log is None:
        raise BadRequest("a build from a log needs the log: --from-log LOG")
    traffic = read_log(options.from_log)
    with build_dir.lock():
        build_dir.clean_staging()
        manifest = build_dir.verify()
        check_backbone(
            f"the embedding log {options.from_log}",
            traffic.facts.get(IDENTITY_KEY),
            manifest.backbone_sha256(),
            f"the build {options.out}",
            "train from a log of a service of this build",
        )
        embeddings, labels, times = traffic.labelled()
        if not len(labels):
            raise BuildError(
                f"the log {options.from_log} has no records with feedback: send labels to POST "
                "/feedback for logged requests first"
            )
        unknown = sorted(set(labels) - set(manifest.labels))
        if unknown:
            raise BuildError(
                f"the log has labels {unknown} that the build's heads do not know ({', '.join(manifest.labels)})"
            )
        features = embeddings.astype(np.float32)
        targets = [manifest.labels.index(label) for label in labels]
        backbone = load_build_backbone(build_dir, manifest)
        record: dict[str, Any] = {
            "log": {
                "root": str(Path(options.from_log).resolve()),
                "records": len(traffic.columns["time"]),
                "labelled": len(labels),
                "first": float(times.min()),
                "last": float(times.max()),
                "build": traffic.facts.get("build"),
            }
        }
        cache_hit = False
        if options.data is not None:
            data = load_data(options.data)
            if data.classes != manifest.labels:
                raise BuildError(f"{options.data} has labels {data.classes}, the build has {manifest.labels}")
            engine, _ = extraction_engine(options, build_dir, manifest, backbone)
            images, cache_hit = FeatureCache(options.cache_dir or default_cache_dir()).get_or_compute(
                backbone, data, progress=options.progress, engine=engine
            )
            features, targets = np.concatenate([features, images]), targets + list(data.targets)
            record["images"] = {"root": str(data.root), "content_hash": data.content_hash(), "images": len(data.paths)}
        counts = Counter(targets)
        too_few = sorted(manifest.labels[t] for t, n in counts.items() if n < 2)
        if too_few:
            raise BuildError(
                f"labels {too_few} have fewer than 2 labelled examples: a head needs one to train on "
                "and one to validate with"
            )
        train_idx, val_idx = stratified_split(targets, options.val_fraction, options.train.seed)
        record.update(train=len(train_idx), val=len(val_idx), val_fraction=options.val_fraction)
        spec = HeadSpec(options.kind, manifest.embedding_dim, len(manifest.labels), options.hidden, options.dropout)
        torch.manual_seed(options.train.seed)
        head = build_head(spec)
        inputs, y = torch.from_numpy(features), torch.tensor(targets)
        result = fit(
            head, inputs[train_idx], y[train_idx], inputs[val_idx], y[val_idx], options.train, progress=options.progress
        )
        reference = EmbeddingReference.of(features, train_idx, val_idx)
        entry, manifest = commit_head(
            build_dir, manifest, options, spec, head, result, record, backbone.module, reference, cache_hit
        )
    log.info("head %s v%d from %d logged labels", entry.name, entry.version, len(labels))
    return BuildReport(entry, cache_hit, manifest)
