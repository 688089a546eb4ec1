"""Every HTTP route of the ingress, declared once: method, path, the handler that answers it,
whether the API key check and body limits cover it, and what the OpenAPI schema says of its
body and answers. The application (http_app.build_fastapi) registers the handlers, the guard
and the published schema from this table alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from deployments.api import protocol
from deployments.api.ingress import OpenAIIngress as Ingress
from deployments.api.protocol import (BatchCreateRequest, ChatCompletionRequest, CompletionRequest,
                                      DetokenizeRequest, EmbeddingRequest, ExperimentWeightsRequest,
                                      FeedbackRequest, LoadLoRARequest, ResponsesRequest, TokenizeRequest,
                                      UnloadLoRARequest)

# The multipart upload of /v1/files, as OpenAI publishes it.
UPLOAD_SCHEMA = {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]}},
}


ROLES = ("public", "inference", "admin")


@dataclass(frozen=True)
class Route:
    method: str  # "get", "post" or "delete"
    path: str
    handler: Callable  # an ingress method; its parameters are the route's (path, query, the Request)
    # Who may call it: "public" (probes and metrics: no key, no body limits), "inference"
    # (any tenant's key: the OpenAI routes), "admin" (an admin tenant's key). Declared on
    # every route; a server without keys lets every caller through as an admin.
    role: str
    # 200 answer: a pydantic model, or a media type; streamed events' model, if it streams.
    answer: type[BaseModel] | str
    events: type[BaseModel] | None = None
    # The request body the handler reads by hand (so malformed JSON, bodies that are not UTF-8
    # and the batch lane share one validation path), published as if FastAPI had parsed it.
    body: type[BaseModel] | dict | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"route {self.method.upper()} {self.path}: declare its role, one of {ROLES}")

    @property
    def api(self) -> bool:
        """Covered by the API key check and the body limits."""
        return self.role != "public"


ROUTES = (
    Route("get", "/health", Ingress.health, "public", protocol.Health),
    Route("get", "/live", Ingress.live, "public", protocol.Health),
    # Prometheus scrapes it without a key, as vLLM's.
    Route("get", "/metrics", Ingress.metrics, "public", "text/plain"),
    Route("get", "/v1/models", Ingress.models, "inference", protocol.ModelList),
    Route("post", "/v1/completions", Ingress.completions, "inference", protocol.Completion, protocol.Completion,
          CompletionRequest),
    Route("post", "/v1/chat/completions", Ingress.chat_completions, "inference", protocol.ChatCompletion,
          protocol.ChatCompletionChunk, ChatCompletionRequest),
    Route("post", "/v1/responses", Ingress.responses, "inference", protocol.ResponseObject, protocol.ResponseEvent,
          ResponsesRequest),
    Route("get", "/v1/responses/{response_id}", Ingress.get_response, "inference", protocol.ResponseObject),
    Route("get", "/v1/responses/{response_id}/input_items", Ingress.response_input_items, "inference",
          protocol.ResponseItemList),
    Route("delete", "/v1/responses/{response_id}", Ingress.delete_response, "inference", protocol.ResponseDeleted),
    Route("post", "/v1/responses/{response_id}/cancel", Ingress.cancel_response, "inference",
          protocol.ResponseObject),
    Route("post", "/v1/embeddings", Ingress.embeddings, "inference", protocol.EmbeddingList, body=EmbeddingRequest),
    Route("post", "/tokenize", Ingress.tokenize, "inference", protocol.Tokenized, body=TokenizeRequest),
    Route("post", "/detokenize", Ingress.detokenize, "inference", protocol.Detokenized, body=DetokenizeRequest),
    Route("post", "/v1/feedback", Ingress.post_feedback, "inference", protocol.FeedbackObject, body=FeedbackRequest),
    Route("get", "/v1/feedback", Ingress.get_feedback, "admin", "application/x-ndjson"),
    Route("post", "/v1/load_lora_adapter", Ingress.load_lora_adapter, "admin", protocol.LoRAAdapterStatus,
          body=LoadLoRARequest),
    Route("post", "/v1/unload_lora_adapter", Ingress.unload_lora_adapter, "admin", protocol.LoRAAdapterStatus,
          body=UnloadLoRARequest),
    Route("get", "/v1/experiments", Ingress.experiments, "inference", protocol.ModelList),
    Route("post", "/v1/experiments/{name}", Ingress.set_experiment_weights, "admin", protocol.ModelCard,
          body=ExperimentWeightsRequest),
    Route("post", "/v1/files", Ingress.upload_file, "inference", protocol.FileObject, body=UPLOAD_SCHEMA),
    Route("get", "/v1/files", Ingress.list_files, "inference", protocol.FileList),
    Route("get", "/v1/files/{file_id}", Ingress.get_file, "inference", protocol.FileObject),
    Route("delete", "/v1/files/{file_id}", Ingress.delete_file, "inference", protocol.FileDeleted),
    Route("get", "/v1/files/{file_id}/content", Ingress.file_content, "inference", "application/jsonl"),
    Route("post", "/v1/batches", Ingress.create_batch, "inference", protocol.Batch, body=BatchCreateRequest),
    Route("get", "/v1/batches", Ingress.list_batches, "inference", protocol.BatchList),
    Route("get", "/v1/batches/{batch_id}", Ingress.get_batch, "inference", protocol.Batch),
    Route("post", "/v1/batches/{batch_id}/cancel", Ingress.cancel_batch, "inference", protocol.Batch),
)

# Paths outside /v1 that the API key, body limits and OpenAI-style errors cover too (vLLM's).
EXTRA_API_PATHS = frozenset(r.path for r in ROUTES if r.api and not r.path.startswith("/v1/"))
