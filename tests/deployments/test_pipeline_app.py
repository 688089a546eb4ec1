"""The Serve application with a 2-stage pipeline per replica, from a config file."""

from __future__ import annotations

import yaml

from tests.deployments.conftest import API_KEY, MODEL

APP = "pipeline"


def test_serve_app_runs_a_two_stage_pipeline_from_the_config_file(serve_app, client, tmp_path):
    from openai import OpenAI
    from ray import serve
    from ray.util.state import list_actors

    from deployments.app import build_app
    from deployments.config import SemlineConfig

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "model_name": MODEL, "api_key": API_KEY,
        "engine": {"device": "cpu", "dtype": "float32", "kv_cache_memory_gb": 0.125, "pipeline_parallel_size": 2},
        "server": {"num_cpus": 0.5},  # the replica's bundle; each stage reserves one CPU of its own
        "router": {"actor_name": "pipeline-router"},
        "batch": {"storage_dir": str(tmp_path / "batches")},
    }))
    config = SemlineConfig.from_yaml(path)
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    try:
        # The replica's engine runs its layers in two stage actors of the replica's placement group.
        stages = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                  if a.class_name == "StageActor"]
        assert len(stages) == 2
        prompt = "The three primary colors are"
        pipelined = OpenAI(base_url=f"{serve_app}/{APP}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        got = pipelined.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        want = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.choices[0].text and got.usage.completion_tokens == 12
    finally:
        serve.delete(APP)
