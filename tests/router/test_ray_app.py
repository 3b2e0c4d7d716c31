"""`specdec serve --ray` on one machine asks Ray for enough logical CPUs that every replica
fits (a 2-core machine would otherwise leave replicas unscheduled forever)."""

from __future__ import annotations

from router.ray_app import cpus_needed
from shared.config import AutoscalingConfig, default_config


def test_cpus_needed_counts_every_replica_at_its_largest():
    config = default_config()
    ray_cfg = config.ray
    fixed = ray_cfg.router_num_cpus + ray_cfg.drafter_num_cpus + 2 * ray_cfg.verifier_num_cpus
    assert cpus_needed(config) == fixed
    scaled = config.model_copy(update={"ray": ray_cfg.model_copy(update={
        "autoscaling": {"codelm-target-s": AutoscalingConfig(min_replicas=1, max_replicas=3)}})})  # fmt: skip
    assert cpus_needed(scaled) == fixed + 2 * ray_cfg.verifier_num_cpus
