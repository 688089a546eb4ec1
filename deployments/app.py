"""build_app: a plain function from SemlineConfig to the Serve application graph.

(No `from __future__ import annotations` here: FastAPI must see the real `Request`
type on the route methods that Serve wraps.)
"""


from fastapi import Request
from ray import serve

from deployments.config import SemlineConfig
from deployments.llm_server import LLMServer
from deployments.openai_api import OpenAIIngress, build_fastapi


def llm_server_options(config: SemlineConfig) -> dict:
    """Serve options of the LLM server deployment, computed from the config."""
    server = config.server
    scaling = server.autoscaling
    options = {
        "name": "LLMServer",
        "ray_actor_options": {"num_cpus": server.num_cpus, "num_gpus": server.num_gpus},
        "max_ongoing_requests": server.max_ongoing_requests,
        "health_check_period_s": 5,
    }
    if scaling.min_replicas == scaling.max_replicas:
        options["num_replicas"] = scaling.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
        }
    return options


def build_app(config: SemlineConfig | dict | None = None):
    """The realtime lane's ingress bound to the LLM server deployment."""
    if not isinstance(config, SemlineConfig):
        config = SemlineConfig.model_validate(config or {})
    app = build_fastapi(config)

    @serve.ingress(app)
    class SemlineIngress(OpenAIIngress):
        @app.get("/health")
        async def get_health(self):
            return await self.health()

        @app.get("/v1/models")
        async def get_models(self):
            return await self.models()

        @app.post("/v1/completions")
        async def post_completions(self, request: Request):
            return await self.completions(request)

        @app.post("/v1/chat/completions")
        async def post_chat_completions(self, request: Request):
            return await self.chat_completions(request)

    llm = serve.deployment(LLMServer, **llm_server_options(config)).bind(
        config.engine, int(max(1, config.server.num_cpus)))
    ingress = serve.deployment(SemlineIngress, name="OpenAIIngress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=4096)
    return ingress.bind(llm, config)
