"""`tl-models deploy render`: every rendered manifest validates against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), the Kustomize base lists what was rendered, and each
Dockerfile copies only files that exist in the repository."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tl_models.cli import main as cli_main
from tl_models.core.manifest import BuildDir
from tl_models.core.routing import Route

from helpers import REPO

KUBERNETES = "1.33"


@pytest.mark.parametrize("kind,gpu", [("bento", False), ("bento", True), ("triton", False), ("triton", True)])
def test_rendered_manifests_validate_against_the_kubernetes_schemas(deployment, tmp_path, kind, gpu):
    args = [
        "deploy",
        "render",
        str(deployment.build_dir),
        "--server",
        kind,
        "--replicas",
        "3",
        "--out",
        str(tmp_path),
    ] + (["--gpu"] if gpu else [])
    assert cli_main(args) == 0
    folder = tmp_path / f"{deployment.manifest.name}-{kind}"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml") == resources
    kinds = {}
    for file in resources:
        obj = yaml.safe_load((folder / file).read_text())
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)  # raises on any schema violation
        kinds[obj["kind"]] = kinds.get(obj["kind"], []) + [obj]
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim"}
    assert expected <= set(kinds) and len(kinds["Service"]) == 2
    assert {s["spec"].get("clusterIP") for s in kinds["Service"]} == {None, "None"}  # one headless, for discovery
    deployment_obj = kinds["Deployment"][0]
    assert deployment_obj["spec"]["replicas"] == 3
    pod = deployment_obj["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == ("/readyz" if kind == "bento" else "/v2/health/ready")
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) is gpu
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    token = next(e for e in container["env"] if e["name"] == "TL_MODELS_ADMIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == kustomization["secretGenerator"][0]["name"]
    env_file = folder / kustomization["secretGenerator"][0]["envs"][0]
    assert env_file.read_text().startswith("TL_MODELS_ADMIN_TOKEN=") and len(env_file.read_text()) > 30
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600 and env_file.name in (folder / ".gitignore").read_text()
    claim = kinds["PersistentVolumeClaim"][0]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert any(
        v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"] for v in pod["spec"]["volumes"]
    )
    if kind == "bento":
        env = {e["name"]: e.get("value") for e in container["env"]}
        route = json.loads(kinds["ConfigMap"][0]["data"]["route.json"])
        assert (
            Route(route["weights"], route["versions"], route["revision"]).validate().versions
            == BuildDir(deployment.build_dir).manifest().latest_versions()
        )
        mount = next(m for m in container["volumeMounts"] if m["name"] == "route")
        assert env["TL_MODELS_FLEET_ROUTE"].startswith(mount["mountPath"] + "/")  # a directory mount: it updates
        assert "subPath" not in mount
    else:
        assert "--model-control-mode=explicit" in container["args"]
        assert any(a.startswith("--http-restricted-api=model-repository:") for a in container["args"])
    _check_dockerfile(folder / "Dockerfile", kind)


def _check_dockerfile(path: Path, server: str) -> None:
    """Every COPY source exists in the repository (the build context); the image has no torch side."""
    lines = [line.split() for line in path.read_text().splitlines() if line.startswith("COPY ")]
    assert lines
    sources = [source for parts in lines for source in parts[1:-1]]
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, missing
    assert not any(s.startswith("tl_models/training") or s == "tl_models" for s in sources)
    assert path.read_text().startswith("# tl-models on " + ("BentoML" if server == "bento" else "Triton"))


def test_rendering_again_keeps_the_admin_token(deployment, tmp_path):
    def token() -> str:
        assert (
            cli_main(["deploy", "render", str(deployment.build_dir), "--server", "bento", "--out", str(tmp_path)]) == 0
        )
        return (tmp_path / f"{deployment.manifest.name}-bento" / "admin-token.env").read_text()

    assert token() == token()


def test_bad_render_options_are_user_errors(deployment, tmp_path, capsys):
    assert (
        cli_main(
            [
                "deploy",
                "render",
                str(deployment.build_dir),
                "--server",
                "bento",
                "--replicas",
                "0",
                "--out",
                str(tmp_path),
            ]
        )
        == 1
    )
    assert "replicas must be at least 1" in capsys.readouterr().err
    assert cli_main(["deploy", "render", str(tmp_path / "nope"), "--server", "triton", "--out", str(tmp_path)]) == 1
