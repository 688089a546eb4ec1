"""Service configuration: YAML in, strict validation, Serve options out."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.app import llm_server_options
from deployments.config import SemlineConfig

SERVE_YAML = Path(__file__).parents[2] / "deployments" / "serve.yaml"


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name: x\nserver:\n  num_cpus: 1\n  replicas_typo: 3\n")
    with pytest.raises(ValidationError, match="replicas_typo"):
        SemlineConfig.from_yaml(path)
    path.write_text("engine:\n  max_num_seq: 3\n")
    with pytest.raises(ValidationError, match="max_num_seq"):
        SemlineConfig.from_yaml(path)


def test_light_headroom_defaults_to_the_engines_last_seat():
    """By default a light tenant's request has a seat beyond the capacity (the replicas admit
    max_num_seqs - 1); where the capacity is set by hand, so is the headroom."""
    from deployments.config import RouterSettings, SemlineConfig

    assert RouterSettings().headroom() == 1 and SemlineConfig().admission_config()["light_headroom"] == 1
    assert RouterSettings(max_inflight_per_replica=8).headroom() == 0
    assert RouterSettings(max_inflight_per_replica=8, light_headroom=2).headroom() == 2


def test_autoscaling_becomes_serve_options():
    fixed = llm_server_options(SemlineConfig())
    assert fixed["num_replicas"] == 1 and "autoscaling_config" not in fixed
    scaling = SemlineConfig.model_validate(
        {"server": {"num_cpus": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 3}}})
    options = llm_server_options(scaling)
    assert options["autoscaling_config"]["max_replicas"] == 3
    # Serve accepts it, with our policy that counts the router's backlog.
    from ray.serve.config import AutoscalingConfig

    serve_config = AutoscalingConfig.model_validate(options["autoscaling_config"])
    assert serve_config.policy.policy_function == "deployments.ops.autoscaling:BacklogPolicy"
    assert options["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0}


def test_serve_yaml_is_valid_for_serve_and_semline():
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(SERVE_YAML.read_text())
    ServeDeploySchema.model_validate(data)
    SemlineConfig.model_validate(data["applications"][0]["args"])


def test_semline_serve_refuses_a_taken_port_at_once():
    """A port another process listens on: `semline serve` says so and exits, before it starts
    Ray (Serve would retry the ingress replica on it without end)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "deployments.cli", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr
