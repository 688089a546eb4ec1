"""build_app: a plain function from SemlineConfig to the Serve application graph.

    OpenAIIngress (HTTP) ──► router actor (tickets) ──► LLMServer replicas (engines)
    BatchRunner (batch jobs) ─┘

(No `from __future__ import annotations` here: FastAPI must see the real `Request`
type on the route methods that Serve wraps.)
"""


from fastapi import Request
from fastapi.responses import Response
from ray import serve
from ray.serve.config import RequestRouterConfig

from cluster.executors import replica_bundles
from deployments.batch.runner import BatchRunner
from deployments.config import SemlineConfig
from deployments.llm_server import LLMServer
from deployments.routing import POLICIES
from deployments.api.serving import OpenAIIngress, build_fastapi

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

    @serve.ingress(app)
    class SemlineIngress(OpenAIIngress):
        @app.get("/health")
        async def get_health(self):
            return await self.health()

        @app.get("/live")
        async def get_live(self):
            return await self.live()

        @app.get("/v1/models")
        async def get_models(self):
            return await self.models()

        @app.post("/v1/completions")
        async def post_completions(self, request: Request):
            return await self.completions(request)

        @app.post("/v1/chat/completions")
        async def post_chat_completions(self, request: Request):
            return await self.chat_completions(request)

        @app.post("/v1/responses")
        async def post_responses(self, request: Request):
            return await self.responses(request)

        @app.post("/v1/embeddings")
        async def post_embeddings(self, request: Request):
            return await self.embeddings(request)

        @app.post("/tokenize")
        async def post_tokenize(self, request: Request):
            return await self.tokenize(request)

        @app.post("/detokenize")
        async def post_detokenize(self, request: Request):
            return await self.detokenize(request)

        @app.post("/v1/feedback")
        async def post_feedback_route(self, request: Request):
            return await self.post_feedback(request)

        @app.get("/v1/feedback")
        async def get_feedback_route(self, since: float = 0.0):
            return await self.get_feedback(since)

        @app.post("/v1/load_lora_adapter")
        async def post_load_lora_adapter(self, request: Request):
            return await self.load_lora_adapter(request)

        @app.post("/v1/unload_lora_adapter")
        async def post_unload_lora_adapter(self, request: Request):
            return await self.unload_lora_adapter(request)

        @app.get("/v1/experiments")
        async def get_experiments(self):
            return await self.experiments()

        @app.post("/v1/experiments/{name}")
        async def post_experiment_weights(self, name: str, request: Request):
            return await self.set_experiment_weights(name, request)

        @app.post("/v1/files")
        async def post_files(self, request: Request):
            return await self.upload_file(request)

        @app.get("/v1/files")
        async def get_files(self):
            return await self._call_batch("list_files")

        @app.get("/v1/files/{file_id}")
        async def get_file(self, file_id: str):
            return await self._call_batch("get_file", file_id)

        @app.delete("/v1/files/{file_id}")
        async def delete_file(self, file_id: str):
            return await self._call_batch("delete_file", file_id)

        @app.get("/v1/files/{file_id}/content")
        async def get_file_content(self, file_id: str):
            data = await self._call_batch("file_content", file_id)
            return Response(data, media_type="application/jsonl")

        @app.post("/v1/batches")
        async def post_batches(self, request: Request):
            return await self.create_batch(request)

        @app.get("/v1/batches")
        async def get_batches(self, after: str | None = None, limit: int = 20):
            return await self._call_batch("list_batches", after, max(1, min(limit, 100)))

        @app.get("/v1/batches/{batch_id}")
        async def get_batch(self, batch_id: str):
            return await self._call_batch("get_batch", batch_id)

        @app.post("/v1/batches/{batch_id}/cancel")
        async def post_batch_cancel(self, batch_id: str):
            return await self._call_batch("cancel_batch", batch_id)

    router_args = (config.router.actor_name, config.router.admission_config(), config.router.max_inflight_per_replica)
    llm = serve.deployment(LLMServer, **llm_server_options(config)).bind(
        config.engine, int(max(1, config.server.num_cpus)), *router_args, config.model_name, config.parallel,
        config.http.tool_call_parser, config.server.stream_interval_ms, config.server.stream_chunks_per_s)
    batch = serve.deployment(BatchRunner, name="BatchRunner", num_replicas=1,
                             ray_actor_options=batch_runner_actor_options(config),
                             max_ongoing_requests=1024, logging_config=QUIET).bind(llm, config)
    ingress_options = {"num_cpus": 0}
    if config.http.node_resource:
        ingress_options["resources"] = {config.http.node_resource: 1}
    ingress = serve.deployment(SemlineIngress, name="OpenAIIngress", ray_actor_options=ingress_options,
                               max_ongoing_requests=4096, logging_config=QUIET)
    return ingress.bind(llm, batch, config)

