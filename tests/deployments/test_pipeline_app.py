"""The Serve application with a model split over Ray workers per replica (2 pipeline stages,
or 2 tensor-parallel ranks), from a config file."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.deployments.conftest import API_KEY, MODEL

APP = "pipeline"


# Tensor parallelism under Serve runs in the `semline serve` test below (its own cluster).
@pytest.mark.parametrize("split", [{"pipeline_parallel_size": 2}])
def test_serve_app_runs_a_split_model_from_the_config_file(serve_app, client, tmp_path, split):
    import time

    import httpx
    from openai import OpenAI
    from ray import serve
    from ray.serve.api import _run
    from ray.util.state import list_actors

    from deployments.app import build_app
    from deployments.config import SemlineConfig

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "model_name": MODEL, "api_key": API_KEY,
        "engine": {"device": "cpu", "dtype": "float32", "quantization": "none", "kv_cache_memory_gb": 0.125, **split},
        "parallel": {"step_timeout_s": 30},
        "server": {"num_cpus": 0.5},  # the replica's bundle; each worker reserves one CPU of its own
        "router": {"actor_name": f"split-router-{'-'.join(split)}"},
        "batch": {"storage_dir": str(tmp_path / "batches")},
    }))
    config = SemlineConfig.from_yaml(path)
    # Not waiting for the application: /health must say 503 until its LLM server can serve.
    _run(build_app(config), _blocking=False, name=APP, route_prefix=f"/{APP}")
    try:
        seen, deadline = [], time.monotonic() + 240
        while time.monotonic() < deadline:
            reply = httpx.get(f"{serve_app}/{APP}/health", timeout=30)
            is_json = reply.headers.get("content-type", "").startswith("application/json")
            seen.append((reply.status_code, reply.json().get("error", {}).get("code") if is_json else None))
            if reply.status_code == 200:
                break
            time.sleep(0.2)
        assert seen[-1][0] == 200, seen[-5:]
        assert (503, "not_ready") in seen  # the ingress answered before the model was up
        assert httpx.get(f"{serve_app}/{APP}/live", timeout=30).json() == {"status": "ok"}
        # The replica's engine runs the model in two worker actors of the replica's placement group.
        workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                   if a.class_name == "ModelWorker"]
        assert len(workers) == 2
        assert config.parallel_config().step_timeout_s == 30
        prompt = "The three primary colors are"
        pipelined = OpenAI(base_url=f"{serve_app}/{APP}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        got = pipelined.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        want = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.choices[0].text and got.usage.completion_tokens == 12
    finally:
        serve.delete(APP)


def test_semline_serve_runs_tensor_parallel_from_the_config_file(client, tmp_path):
    """`semline serve --config FILE` (its own local Ray cluster, beside the session's) with
    tensor_parallel_size 2 answers like the single-process application; SIGTERM stops it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from deployments.cli import free_port

    port = free_port()
    path = tmp_path / "tp.yaml"
    path.write_text(yaml.safe_dump({
        "model_name": MODEL,
        "engine": {"device": "cpu", "dtype": "float32", "quantization": "none", "kv_cache_memory_gb": 0.125, "tensor_parallel_size": 2},
        "server": {"num_cpus": 0.5},
        "http": {"port": port}, "metrics_export_port": free_port(),
        "router": {"actor_name": "cli-router"},
        "batch": {"storage_dir": str(tmp_path / "batches")},
    }))
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a cluster of its own, never the session's
    server = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve", "--config", str(path),
                               "--num-cpus", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    body = {"model": MODEL, "prompt": "The three primary colors are", "max_tokens": 12, "temperature": 0}
    try:
        deadline, answer = time.monotonic() + 240, None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
                if reply.status_code == 200:
                    answer = reply.json()
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert answer is not None, server.stdout.read() if server.poll() is not None else "no answer in 240 s"
        want = client.completions.create(**body)
        assert answer["choices"][0]["text"] == want.choices[0].text
        # The port is the ingress replica's own (http.direct_ingress, the default): streams too.
        pieces = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json={**body, "stream": True},
                          timeout=60) as reply:
            assert reply.headers["content-type"].startswith("text/event-stream")
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    pieces += [c["text"] for c in json.loads(line[6:]).get("choices") or ()]
        assert "".join(pieces) == want.choices[0].text
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
