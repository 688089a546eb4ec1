"""One local Ray cluster and one Serve application per test session."""

from __future__ import annotations

import os
import sys

from pathlib import Path

import pytest

from deployments.cli import free_port
from tests.deployments.promql import SCRAPE_S

MODEL = "SmolLM2-135M-Instruct"
# Another served name of the base model (vLLM's --served-model-name after the first).
ALIAS = "smol"
API_KEY = "test-key-123"  # the legacy api_key: the 'default' inference tenant's
# Tenants of the session's application (test_tenants.py): an admin, and an inference tenant
# that may not ask for a priority more urgent than 0.
ADMIN_KEY, TEAM_KEY = "admin-key-456", "team-key-789"
TEAM_STORAGE = 16 * 1024  # bytes of batch files the team tenant may hold
# Limits of the session's application (test_hardening.py checks they hold).
MAX_PROMPT_TOKENS = 4096
MAX_OPEN_BATCHES = 4


@pytest.fixture(scope="session")
def storage_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("batches")


# The quality loop (tests/deployments/test_quality.py): a LoRA adapter served beside the base,
# an A/B experiment between them, a public name whose answers go through output filters, and
# the result cache for the adapter's answers.
ADAPTER = "tuned"
EXPERIMENT = "smol-ab"
FILTERED = "smol-filtered"
BLOCKED_PHRASE = "forbidden fruit"


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory):
    """A PEFT LoRA adapter (random weights on q and v) of the embedded model, built here."""
    from engine.config import EngineConfig
    from engine.loader import hf_folder
    from tests.engine.test_lora import build_adapter

    folder = tmp_path_factory.mktemp("adapter")
    model_dir = hf_folder(None, EngineConfig().resolve_cache_dir())
    build_adapter(model_dir, folder, 7, ["q_proj", "v_proj"], 8)
    return folder


# Appended to the embedded model's chat template: Qwen3's switch (enable_thinking false: an
# empty thinking block opens the answer), so chat_template_kwargs reach a template that reads
# them and the reasoning parser's `auto` finds the qwen3 style.
THINKING_SWITCH = ("{%- if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
                   "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}")


@pytest.fixture(scope="session")
def chat_template(tmp_path_factory):
    """The embedded model's chat template with Qwen3's thinking switch, as a file."""
    from engine.config import EngineConfig
    from engine.loader import load_tokenizer, resolve_model_dir

    folder = resolve_model_dir(None, EngineConfig().resolve_cache_dir())
    path = tmp_path_factory.mktemp("template") / "chat_template.jinja"
    path.write_text(load_tokenizer(folder).chat_template + THINKING_SWITCH)
    return str(path)


@pytest.fixture(scope="session")
def app_config(storage_dir, adapter_dir, chat_template, tmp_path_factory):
    from deployments.config import SemlineConfig

    return SemlineConfig(
        api_key=API_KEY,
        tenants=[{"name": "ops", "keys": [ADMIN_KEY], "role": "admin"},
                 {"name": "team", "keys": [TEAM_KEY], "max_priority": 0, "batch_storage_bytes": TEAM_STORAGE}],
        lora_adapter_dirs=[str(tmp_path_factory.getbasetemp())],
        served_model_names=[ALIAS],
        engine={"device": "cpu", "dtype": "float32", "quantization": "none", "kv_cache_memory_gb": 0.25, "max_prompt_tokens": MAX_PROMPT_TOKENS,
                "chat_template": chat_template,
                "lora_modules": {ADAPTER: str(adapter_dir)}, "max_lora_rank": 16},
        experiments=[{"name": EXPERIMENT, "arms": [{"name": "control", "model": MODEL, "weight": 70},
                                                   {"name": "treatment", "model": ADAPTER, "weight": 30}]},
                     {"name": FILTERED, "arms": [{"name": "only", "model": MODEL, "weight": 1}]}],
        quality={"filters": [{"type": "pii", "models": [FILTERED]},
                             {"type": "blocklist", "phrases": [BLOCKED_PHRASE], "action": "refuse",
                              "models": [FILTERED]}],
                 "result_cache": {"enabled": True, "models": [ADAPTER]},
                 "feedback": {"storage_dir": str(tmp_path_factory.mktemp("feedback")), "store_outputs": True}},
        http={"port": free_port(), "max_body_bytes": 64 * 1024},
        # Small enough that the overload test can fill the realtime queue.
        router={"max_inflight_per_replica": 4, "max_queued_realtime": 4},
        batch={"storage_dir": str(storage_dir), "max_file_bytes": 1024 * 1024, "max_open_batches": MAX_OPEN_BATCHES,
               "completion_windows": ["24h", "4s"],  # 4s: the expiry test
               "reap_interval_s": 0.5},  # expired files go within a second
    )


@pytest.fixture(scope="session")
def metrics_port():
    return free_port()


@pytest.fixture(scope="session")
def dashboard_port():
    return free_port()


@pytest.fixture(scope="session")
def jobs_address(serve_app, dashboard_port):
    """The session cluster's Jobs API (Ray's dashboard)."""
    return f"http://127.0.0.1:{dashboard_port}"


@pytest.fixture(scope="session")
def serve_app(app_config, metrics_port, dashboard_port):
    """The real application (ingress + LLM server) on a free loopback port, with an API key."""
    import time

    import httpx
    import ray
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from deployments.app import build_app
    from deployments.cli import use_quiet_ray

    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics reach the port within ~1 s
    # Serve set up as `semline serve` sets it (throughput-optimized mode included), but behind
    # Serve's proxy: the session's applications share its port under their route prefixes.
    os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0")
    use_quiet_ray()
    # Ray jobs run their entrypoint's `python` from PATH: this environment's, as in the serving image.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    ray.init(num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             logging_level="ERROR", _metrics_export_port=metrics_port)
    # The HTTP port is picked now, after Ray's processes took theirs, and picked again if another
    # process took it before the proxy bound it (a fresh clone's run lost every Serve test so).
    for _ in range(3):
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config=LoggingConfig(enable_access_log=False))
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                # Serve's proxy answers (503 until it has a route table): it holds the port.
                if httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=2).status_code in (200, 503):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            serve.shutdown()
            continue
        break
    else:
        pytest.fail("Serve's proxy could not bind a loopback port in 3 tries")
    app_config.http.port = port
    serve.run(build_app(app_config), name="semline", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def client(serve_app):
    from openai import OpenAI

    return OpenAI(base_url=f"{serve_app}/v1", api_key=API_KEY, max_retries=0, timeout=120)


PROMETHEUS = Path(__file__).parents[2] / ".tools" / "prometheus" / "usr" / "bin" / "prometheus"


@pytest.fixture(scope="module")
def prometheus(serve_app, metrics_port, tmp_path_factory):
    """A real Prometheus on loopback scraping the Ray cluster's metrics port and the
    application's /metrics every SCRAPE_S (2 s; at 1 s, which is also the timeout, a loaded
    2-core run lost a third of its scrapes). Per module: its scrapes took an eighth of a core,
    which the rest of the suite needs (it starts in ~2 s)."""
    import subprocess
    import time

    import httpx

    if not PROMETHEUS.exists():
        pytest.fail(f"Prometheus is not at {PROMETHEUS}: `make test` fetches it (apt-get download prometheus; "
                    "dpkg-deb -x); or install it with apt-get install prometheus and link it there")
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    app_target = serve_app.removeprefix("http://")
    (folder / "prometheus.yml").write_text(
        f"global: {{scrape_interval: {SCRAPE_S}s, scrape_timeout: {SCRAPE_S}s, evaluation_interval: {SCRAPE_S}s}}\n"
        f"scrape_configs: [{{job_name: ray, static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]}},\n"
        # The application's own /metrics (vLLM's names), as a vLLM user's Prometheus scrapes it.
        f"  {{job_name: semline, metrics_path: /metrics, static_configs: [{{targets: ['{app_target}']}}]}}]\n")
    proc = subprocess.Popen([str(PROMETHEUS), f"--config.file={folder / 'prometheus.yml'}",
                             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/-/ready").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    while time.time() < deadline:  # ...and until its first scrape of the cluster succeeded
        result = httpx.get(f"{url}/api/v1/query", params={"query": 'up{job="ray"}'}).json()["data"]["result"]
        if result and result[0]["value"][1] == "1":
            break
        time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("Prometheus did not scrape the Ray metrics port within 30 s")
    yield url
    proc.terminate()
    proc.wait(10)
