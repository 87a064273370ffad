"""Running on a Ray cluster: the cluster-launcher config users start from."""

from __future__ import annotations

from pathlib import Path


def test_cluster_yaml_is_a_valid_ray_cluster_launcher_config() -> None:
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(Path(__file__).parents[1].joinpath("cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)  # raises on schema violations
    assert prepared["provider"]["type"] == "local"
    assert any("make install" in c for c in prepared["setup_commands"])
