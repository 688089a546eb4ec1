"""build_app: a plain function from SemlineConfig to the Serve application graph.

    OpenAIIngress (HTTP) ──► router actor (tickets) ──► LLMServer replicas (engines)
    BatchRunner (batch jobs) ─┘
"""

from __future__ import annotations

from ray import serve
from ray.serve.config import RequestRouterConfig

from cluster.executors import replica_bundles
from deployments.batch.runner import BatchRunner
from deployments.config import SemlineConfig
from deployments.llm_server import LLMServer
from deployments.routing import POLICIES
from deployments.api.http_app import build_fastapi
from deployments.api.ingress import OpenAIIngress

ROUTING_STATS_PERIOD_S = 1.0
QUIET = {"enable_access_log": False}  # no log line per request and per internal call


def llm_server_options(config: SemlineConfig) -> dict:
    """Serve options of the LLM server deployment, computed from the config."""
    server = config.server
    scaling = server.autoscaling
    options = {
        "name": "LLMServer",
        "ray_actor_options": {"num_cpus": server.num_cpus, "num_gpus": server.num_gpus},
        "max_ongoing_requests": server.max_ongoing_requests,
        "health_check_period_s": 5,
        "logging_config": QUIET,
        "request_router_config": RequestRouterConfig(
            request_router_class=POLICIES[server.routing][0], request_router_kwargs=POLICIES[server.routing][1],
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S),
    }
    if scaling.min_replicas == scaling.max_replicas:
        options["num_replicas"] = scaling.max_replicas
    else:
        options["autoscaling_config"] = scaling.serve_autoscaling_config()
    engine, parallel = config.engine_config(), config.parallel_config()
    if engine.num_model_workers > 1:
        # Each replica reserves its whole model: bundle 0 for itself, one per worker (T x P:
        # the workers hold the GPUs), so autoscaling adds and removes whole model copies.
        options["ray_actor_options"] = {"num_cpus": server.num_cpus, "num_gpus": 0}
        options["placement_group_bundles"] = replica_bundles(
            engine, parallel, {"CPU": server.num_cpus}, server.num_gpus > 0, int(max(1, server.num_cpus)))
        options["placement_group_strategy"] = parallel.placement_strategy
    if server.resources:
        options["ray_actor_options"]["resources"] = dict(server.resources)
    if server.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = server.max_replicas_per_node
    return options


def batch_runner_actor_options(config: SemlineConfig) -> dict:
    """The batch runner needs no CPU; a node resource pins it to the node with its storage."""
    options = {"num_cpus": 0}
    if config.batch.node_resource:
        options["resources"] = {config.batch.node_resource: 1}
    return options


def build_app(config: SemlineConfig | dict | None = None):
    """The ingress bound to the batch runner and the LLM server deployment."""
    if not isinstance(config, SemlineConfig):
        config = SemlineConfig.model_validate(config or {})
    app = build_fastapi(config)

    # The routes are the table's (deployments/api/routes.py), registered by build_fastapi.
    ingress_class = serve.ingress(app)(OpenAIIngress)

    router_args = (config.router.actor_name, config.admission_config(), config.router.max_inflight_per_replica)
    llm = serve.deployment(LLMServer, **llm_server_options(config)).bind(
        config.engine, int(max(1, config.server.num_cpus)), *router_args, config.model_name, config.parallel,
        config.http.tool_call_parser, config.server.stream_interval_ms, config.server.stream_chunks_per_s,
        config.http.reasoning_parser)
    batch = serve.deployment(BatchRunner, name="BatchRunner", num_replicas=1,
                             ray_actor_options=batch_runner_actor_options(config),
                             max_ongoing_requests=1024, logging_config=QUIET).bind(llm, config)
    ingress_options = {"num_cpus": 0}
    if config.http.node_resource:
        ingress_options["resources"] = {config.http.node_resource: 1}
    ingress = serve.deployment(ingress_class, name="OpenAIIngress", ray_actor_options=ingress_options,
                               max_ongoing_requests=4096, logging_config=QUIET)
    return ingress.bind(llm, batch, config)

