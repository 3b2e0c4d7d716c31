"""The Kubernetes manifests (`k8s/`), validated offline: every overlay renders with
`kubectl kustomize` (the PyPI kubectl); core kinds pass `kubernetes-validate --strict`; each
rendered RayService matches the project's schema of the fields it uses and its
serveConfigV2 parses with Ray Serve's own config schema, and its application imports and
builds from the same specdec configuration; the committed RayService equals the rendering
(`python -m tools.render_k8s --check`); the Dockerfile copies only what exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from shared.paths import PROJECT_ROOT

K8S = PROJECT_ROOT / "k8s"
OVERLAYS = ["base", "overlays/cpu-demo", "overlays/gpu"]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (the test extra installs it)")
    return path


def render(overlay: str) -> list[dict]:
    out = subprocess.run([_tool("kubectl"), "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def test_every_overlay_renders_the_expected_kinds(rendered):
    overlay, docs = rendered
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [("RayService", "specdec"), ("StatefulSet", "specdec-redis"), ("Service", "specdec-redis"),
                     ("Service", "specdec-grpc"), ("ConfigMap", "specdec-config"),
                     ("PodDisruptionBudget", "specdec-ray-workers"), ("PodDisruptionBudget", "specdec-redis")]:  # fmt: skip
        assert expected in kinds, (overlay, expected)
    if overlay == "overlays/cpu-demo":
        assert ("Secret", "specdec-secrets") in kinds


def test_core_kinds_pass_strict_validation(rendered, tmp_path):
    overlay, docs = rendered
    core = [d for d in docs if d["apiVersion"] != "ray.io/v1"]
    # the Ray pods' templates are core PodTemplateSpecs: validate them as Pods too
    for rs in (d for d in docs if d["kind"] == "RayService"):
        cluster = rs["spec"]["rayClusterConfig"]
        for i, group in enumerate([cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]):
            core.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"ray-{i}"}, "spec": group["template"]["spec"]})
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    out = subprocess.run([_tool("kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rayservice_matches_the_schema_and_its_serve_config_builds(rendered):
    from ray.serve.schema import ServeDeploySchema

    overlay, docs = rendered
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    jsonschema.validate(rs, json.loads((K8S / "rayservice.schema.json").read_text()))
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    # the ConfigMap's specdec.yaml (what /etc/specdec/specdec.yaml holds in the pods)
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "specdec-config"]
    assert app.args == {"config": "/etc/specdec/specdec.yaml"}
    local = K8S / ("overlays/gpu" if overlay == "overlays/gpu" else "base") / "specdec.yaml"
    assert yaml.safe_load(config_map["data"]["specdec.yaml"]) == yaml.safe_load(local.read_text())
    from ray.serve.deployment import Application

    assert isinstance(builder({"config": str(local)}), Application)
    names = {d.name for d in app.deployments}
    assert names == {"router", "drafter-pool", "verifier-codelm-target-m", "verifier-codelm-target-s"}
    if overlay == "overlays/gpu":
        verifier = next(d for d in app.deployments if d.name == "verifier-codelm-target-m")
        assert verifier.ray_actor_options.num_gpus == 1
        workers = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        assert all(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1" for w in workers)


def test_committed_rayservice_equals_the_rendering():
    out = subprocess.run([sys.executable, "-m", "tools.render_k8s", "--check"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dockerfile_copies_what_exists():
    text = (K8S / "Dockerfile").read_text()
    src = re.search(r"ARG SRC=(\S+)", text).group(1)
    context = {src: PROJECT_ROOT, "shared": PROJECT_ROOT.parent / "shared"}
    copies = re.findall(r"^COPY (.+) \S+$", text, flags=re.M)
    assert copies
    for line in copies:
        for source in line.split():
            top, _, rest = source.replace("${SRC}", src).partition("/")
            assert (context[top] / rest).exists(), source
