"""`tl-models deploy render`: Kubernetes manifests (a Kustomize base) and a Dockerfile for one build and one server.

Kustomize, not Helm: what varies between builds is computed here from the build (names, ports, labels, the
route), so a template language would only move that logic into YAML; Kustomize is built into ``kubectl apply -k``
and users patch the rendered base with overlays of their own (namespace, image registry, resources).

Rendered per build and server (``deploy/<build>-<server>/``): Deployment (N replicas, readiness and liveness
probes, resources, the admin token from a Secret, Prometheus scrape annotations), Service, headless Service (fleet
discovery: one DNS record per ready pod), HorizontalPodAutoscaler, PodDisruptionBudget, a ReadWriteMany
PersistentVolumeClaim for the shared build or model repository, for BentoML the ConfigMap holding the fleet's
route, the Dockerfile, and kustomization.yaml (which generates the Secret from ``admin-token.env``).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import BadRequest
from ..core.manifest import BuildDir
from ..core.names import ADMIN_HEADER, ROUTE_FILE, check_name
from ..core.routing import Route

SERVERS = ("bento", "triton")
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
PORTS = {"bento": {"http": 3000}, "triton": {"http": 8000, "grpc": 8001, "metrics": 8002}}
MOUNTS = {"shared": "/shared", "route": "/etc/tl-models", "models": "/models"}


@dataclass
class DeployOptions:
    """What `tl-models deploy render` takes."""

    server: str = "bento"
    replicas: int = 2
    gpu: bool = False
    image: str | None = None
    storage: str = "10Gi"
    storage_class: str | None = None
    cpu: str = "1"
    memory: str = "2Gi"

    def check(self) -> DeployOptions:
        if self.server not in SERVERS:
            raise BadRequest(f"unknown server {self.server!r}; choose from {', '.join(SERVERS)}")
        if self.replicas < 1:
            raise BadRequest(f"replicas must be at least 1, got {self.replicas}")
        return self


def _labels(name: str, server: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "tl-models",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": server,
    }


def _meta(name: str, labels: dict, **extra: object) -> dict:
    return {"name": name, "labels": labels, **extra}


def _container(build: str, options: DeployOptions, secret: str) -> dict:
    """The serving container: image, ports, env, probes, resources, mounts."""
    resources: dict[str, dict[str, str | int]] = {
        "requests": {"cpu": options.cpu, "memory": options.memory},
        "limits": {"cpu": str(2 * float(options.cpu)).rstrip("0").rstrip("."), "memory": options.memory},
    }
    if options.gpu:
        resources["limits"]["nvidia.com/gpu"] = 1
    token = {
        "name": "TL_MODELS_ADMIN_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": secret, "key": "TL_MODELS_ADMIN_TOKEN"}},
    }
    ports = [{"name": port, "containerPort": number} for port, number in PORTS[options.server].items()]
    if options.server == "bento":
        env = [
            {"name": "TL_MODELS_BUILD", "value": f"{MOUNTS['shared']}/{build}"},
            {"name": "TL_MODELS_STATE_DIR", "value": "/state"},
            {"name": "TL_MODELS_FLEET_ROUTE", "value": f"{MOUNTS['route']}/{ROUTE_FILE}"},
            {"name": "TL_MODELS_FLEET_POLL", "value": "5"},
            {"name": "TL_MODELS_BUILD_ROOTS", "value": MOUNTS["shared"]},
            {"name": "TL_MODELS_ACCESS_LOG", "value": "0"},
            token,
        ]
        probes = {"readinessProbe": _probe("/readyz", "http", 5), "livenessProbe": _probe("/livez", "http", 20)}
        mounts = [
            {"name": "shared", "mountPath": MOUNTS["shared"], "readOnly": True},
            {"name": "route", "mountPath": MOUNTS["route"], "readOnly": True},
            {"name": "state", "mountPath": "/state"},
        ]
        command = {}
    else:
        env = [token]
        probes = {
            "readinessProbe": _probe("/v2/health/ready", "http", 5),
            "livenessProbe": _probe("/v2/health/live", "http", 20),
        }
        mounts = [{"name": "shared", "mountPath": MOUNTS["models"]}]
        # model control (load/unload: what swaps and shadows use) only with the admin token in a header
        restricted = f"model-repository:{ADMIN_HEADER}=$(TL_MODELS_ADMIN_TOKEN)"
        command = {
            "args": [
                "tritonserver",
                f"--model-repository={MOUNTS['models']}",
                "--model-control-mode=explicit",
                "--load-model=*",
                "--strict-readiness=true",
                f"--http-restricted-api={restricted}",
                f"--grpc-restricted-protocol={restricted}",
            ]
        }
    return {
        "name": options.server,
        "image": options.image or f"tl-models-{options.server}:latest",
        **command,
        "ports": ports,
        "env": env,
        **probes,
        "resources": resources,
        "volumeMounts": mounts,
    }


def _probe(path: str, port: str, delay: int) -> dict:
    return {
        "httpGet": {"path": path, "port": port},
        "initialDelaySeconds": delay,
        "periodSeconds": 5,
        "failureThreshold": 6,
    }


def manifests(build_dir: str | Path, options: DeployOptions) -> tuple[str, dict[str, dict]]:
    """``(folder name, {file name: Kubernetes object})`` for the build and server."""
    options.check()
    manifest = BuildDir(build_dir).manifest()
    build = check_name(manifest.name, "build name")
    name = f"{build}-{options.server}"
    labels = _labels(build, options.server)
    selector = {"matchLabels": labels}
    secret, claim = f"{name}-admin", f"{name}-shared"
    volumes = [{"name": "shared", "persistentVolumeClaim": {"claimName": claim}}]
    if options.server == "bento":
        volumes += [{"name": "route", "configMap": {"name": f"{name}-route"}}, {"name": "state", "emptyDir": {}}]
    pod: dict[str, Any] = {
        "metadata": {
            "labels": labels,
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/path": "/metrics",
                "prometheus.io/port": str(PORTS[options.server].get("metrics", PORTS[options.server]["http"])),
            },
        },
        "spec": {
            "containers": [_container(build, options, secret)],
            "volumes": volumes,
            "terminationGracePeriodSeconds": 30,
        },
    }
    if options.gpu:
        pod["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    objects = {
        "deployment.yaml": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(name, labels),
            "spec": {
                "replicas": options.replicas,
                "selector": selector,
                "template": pod,
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            },
        },
        "service.yaml": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(name, labels),
            "spec": {"selector": labels, "ports": _service_ports(options.server)},
        },
        "service-headless.yaml": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(f"{name}-headless", labels),
            "spec": {"clusterIP": "None", "selector": labels, "ports": _service_ports(options.server)},
        },
        "hpa.yaml": {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": _meta(name, labels),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": options.replicas,
                "maxReplicas": max(2 * options.replicas, options.replicas + 1),
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                    }
                ],
            },
        },
        "pdb.yaml": {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(name, labels),
            "spec": {"maxUnavailable": 1, "selector": selector},
        },
        "storage.yaml": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": _meta(claim, labels),
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": options.storage}},
                **({"storageClassName": options.storage_class} if options.storage_class else {}),
            },
        },
    }
    if options.server == "bento":
        route = Route({head: 1.0 for head in manifest.latest_versions()}, manifest.latest_versions(), 1).validate()
        objects["route-configmap.yaml"] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(f"{name}-route", labels),
            "data": {ROUTE_FILE: json.dumps(route.to_dict(), indent=2) + "\n"},
        }
    return name, objects


def _service_ports(server: str) -> list[dict]:
    return [{"name": port, "port": number, "targetPort": port} for port, number in PORTS[server].items()]


def dockerfile(options: DeployOptions) -> str:
    """The image recipe (build context: the repository root). BentoML: our own Dockerfile rather than `bentoml
    containerize`, which bakes a bento's models into the image; here head files come from shared storage and one
    image serves every build. Triton: the NGC image plus what the python-backend models import."""
    if options.server == "triton":
        runtime = "onnxruntime-gpu" if options.gpu else "onnxruntime"
        return f"""# tl-models on Triton: NGC tritonserver + what the python-backend models (router, preprocess) import
FROM {TRITON_IMAGE}
COPY tl_models/__init__.py /opt/tl-models/tl_models/__init__.py
COPY tl_models/core /opt/tl-models/tl_models/core
COPY tl_models/triton /opt/tl-models/tl_models/triton
RUN pip install --no-cache-dir numpy pillow {runtime}
ENV PYTHONPATH=/opt/tl-models
EXPOSE 8000 8001 8002
"""
    runtime = "onnxruntime-gpu[cuda,cudnn]" if options.gpu else "onnxruntime"
    return f"""# tl-models on BentoML: the service and its serving path (no torch); models come from the shared volume
FROM python:3.11-slim
WORKDIR /app
COPY service.py /app/service.py
COPY tl_models/__init__.py /app/tl_models/__init__.py
COPY tl_models/core /app/tl_models/core
COPY tl_models/bento /app/tl_models/bento
RUN pip install --no-cache-dir "bentoml>=1.4,<1.5" "{runtime}" numpy pillow httptools uvloop
ENV BENTOML_DO_NOT_TRACK=true PYTHONPATH=/app
EXPOSE 3000
CMD ["bentoml", "serve", "service:Classifier", "--host", "0.0.0.0", "--port", "3000", "--working-dir", "/app"]
"""


def render(build_dir: str | Path, out: str | Path, options: DeployOptions) -> Path:
    """Write the Kustomize base, the Dockerfile and a generated admin token (kept out of git) into ``out``/NAME;
    the folder. An existing token is kept, so rendering again does not lock clients out."""
    import yaml

    class Plain(yaml.SafeDumper):  # every mapping written out in full: no &anchors / *aliases for shared labels
        def ignore_aliases(self, data: object) -> bool:
            return True

    name, objects = manifests(build_dir, options)
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    for file, obj in objects.items():
        (folder / file).write_text(yaml.dump(obj, Dumper=Plain, sort_keys=False))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": sorted(objects),
        "secretGenerator": [{"name": f"{name}-admin", "envs": ["admin-token.env"]}],
        "generatorOptions": {"disableNameSuffixHash": True},
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    (folder / "Dockerfile").write_text(dockerfile(options))
    token = folder / "admin-token.env"
    if not token.is_file():
        token.write_text(f"TL_MODELS_ADMIN_TOKEN={secrets.token_urlsafe(24)}\n")
        os.chmod(token, 0o600)
    (folder / ".gitignore").write_text("admin-token.env\n")
    return folder
