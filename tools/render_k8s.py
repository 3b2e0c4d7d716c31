"""Render the RayService's `serveConfigV2` from a specdec configuration, so the manifests
and the local application (`router.ray_app`) are built from one file.

    python -m tools.render_k8s            # rewrite every variant's RayService
    python -m tools.render_k8s --check    # exit 1 if a committed manifest differs (the tests run this)

Variants: `k8s/base` (the CPU cluster: k8s/base/specdec.yaml -> k8s/base/rayservice.yaml)
and the GPU overlay (k8s/overlays/gpu/specdec.yaml -> its serveConfigV2 patch). The Serve
config names the application (`import_path: router.ray_app:build_app`, the config file
mounted from the `specdec-config` ConfigMap as its argument) and lists each deployment's
scaling and resources as `build_app` produces them from that configuration (Ray's own
`serve build` conversion), so `kubectl get rayservice -o yaml` shows what will run.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from shared.paths import PROJECT_ROOT

K8S = PROJECT_ROOT / "k8s"
MOUNTED_CONFIG = "/etc/specdec/specdec.yaml"  # the ConfigMap's mount in the Ray pods
IMPORT_PATH = "router.ray_app:build_app"
HEADER = "# Rendered by `python -m tools.render_k8s` from {source}: edit that file, then re-render.\n"


@dataclass(frozen=True)
class Variant:
    config: Path  # the specdec YAML
    output: Path  # the manifest this variant's serveConfigV2 goes into
    full: bool  # the whole RayService (base) or a patch with only serveConfigV2 (overlay)


VARIANTS = (
    Variant(K8S / "base" / "specdec.yaml", K8S / "base" / "rayservice.yaml", full=True),
    Variant(K8S / "overlays" / "gpu" / "specdec.yaml", K8S / "overlays" / "gpu" / "rayservice-serve-config.yaml", full=False),
)


def serve_config(config_path: Path) -> dict:
    """The Serve config (ServeDeploySchema) of the application built from `config_path`."""
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.deployment import deployment_to_schema
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from router.ray_app import APP_NAME, build_app
    from shared.config import SpecdecConfig

    config = SpecdecConfig.from_yaml(config_path)
    built = build_serve_app(build_app({"config": str(config_path)}), name=APP_NAME)
    app = ServeApplicationSchema(
        name=APP_NAME, route_prefix="/", import_path=IMPORT_PATH, args={"config": MOUNTED_CONFIG},
        deployments=[deployment_to_schema(d) for d in built.deployments],
    )  # fmt: skip
    deploy = ServeDeploySchema(
        proxy_location="HeadOnly", http_options={"host": "0.0.0.0", "port": config.http_port}, applications=[app]
    )
    return deploy.model_dump(mode="json", exclude_unset=True)


def rayservice(serve: dict, full: bool) -> dict:
    serve_yaml = yaml.safe_dump(serve, sort_keys=False)
    if not full:
        return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "specdec"},
                "spec": {"serveConfigV2": serve_yaml}}  # fmt: skip
    base = yaml.safe_load((K8S / "base" / "rayservice.template.yaml").read_text())
    base["spec"]["serveConfigV2"] = serve_yaml
    return base


def render(variant: Variant) -> str:
    source = variant.config.relative_to(PROJECT_ROOT)
    body = yaml.safe_dump(rayservice(serve_config(variant.config), variant.full), sort_keys=False)
    return HEADER.format(source=source) + body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the committed manifests; write nothing")
    args = p.parse_args(argv)
    stale = []
    for variant in VARIANTS:
        text = render(variant)
        current = variant.output.read_text() if variant.output.exists() else ""
        if text == current:
            continue
        if args.check:
            stale.append(variant.output)
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                       str(variant.output), "rendered"))  # fmt: skip
        else:
            variant.output.write_text(text)
            print(f"wrote {variant.output.relative_to(PROJECT_ROOT)}")
    if stale:
        print(f"stale: {[str(p.relative_to(PROJECT_ROOT)) for p in stale]}; run python -m tools.render_k8s")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
