"""The HTTP ingress of `semline serve`: the realtime lane's routes (OpenAIServing) and the
routes around them: users' feedback on answers, LoRA adapters and experiment weights loaded
at run time, and the batch lane's files and batches (handed to the BatchRunner)."""

from __future__ import annotations

import asyncio
import json
import os

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from deployments.api.errors import APIError, to_api_error
from deployments.api.plan import Plan, json_body, key_id, viewer
from deployments.api.protocol import (BatchCreateRequest, ExperimentWeightsRequest, ExpiresAfter, FeedbackRequest,
                                      LoadLoRARequest, UnloadLoRARequest)
from deployments.api.serving import OpenAIServing
from deployments.config import SemlineConfig
from deployments.ops.exposition import CONTENT_TYPE, MetricsExposition
from deployments.quality.feedback import FeedbackStore, RatingLimitError, UnknownResponseError
from engine import RequestOutput


class OpenAIIngress(OpenAIServing):
    """The HTTP routes' logic: the realtime lane runs here, the batch lane's calls go to the
    BatchRunner deployment (`batch`, a DeploymentHandle)."""

    def __init__(self, llm, batch, config: SemlineConfig, router=None) -> None:
        super().__init__(llm, config, router)
        self.batch = batch
        feedback = config.quality.feedback
        self.feedback = FeedbackStore(feedback.storage_dir, feedback.store_outputs, feedback.retention_s,
                                      feedback.max_responses, feedback.max_log_bytes, feedback.max_ratings_per_response)
        self.quality_metrics.feedback(self.feedback.summary())  # the ratings before a restart count too
        self.exposition = MetricsExposition()

    async def metrics(self) -> Response:
        """Prometheus text: the replicas' figures summed, under vLLM's names and semline's."""
        return Response(await self.exposition.text(), media_type=CONTENT_TYPE)

    def _answered(self, plan: "Plan", response_id: str, outputs: list[RequestOutput], text: str) -> None:
        super()._answered(plan, response_id, outputs, text)
        choice = plan.choices[0]
        write = self.feedback.record_response(response_id, plan.target.model, plan.target.experiment,
                                              plan.target.arm, choice.messages if choice.messages is not None
                                              else choice.prompt, text, plan.owner)
        asyncio.get_running_loop().run_in_executor(None, write)  # the file and its lock: off the event loop

    # --- feedback, adapters, experiments ----------------------------------------------

    async def post_feedback(self, request: Request) -> dict:
        body = self._validate_plain(FeedbackRequest, await json_body(request))
        try:
            record = await asyncio.to_thread(self.feedback.add, body.response_id, body.numeric_score(), body.label,
                                             body.comment, viewer(request))
        except UnknownResponseError as exc:
            raise APIError(404, str(exc), param="response_id", code="response_not_found") from exc
        except RatingLimitError as exc:
            raise APIError(429, str(exc), "rate_limit_error", param="response_id", code="rating_limit") from exc
        self.quality_metrics.feedback(await asyncio.to_thread(self.feedback.summary))
        return {"object": "feedback", **record}

    async def get_feedback(self, since: float = 0.0):
        records = await asyncio.to_thread(lambda: list(self.feedback.export(since)))
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return Response(body, media_type="application/x-ndjson")

    async def load_lora_adapter(self, request: Request) -> dict:
        body = self._validate_plain(LoadLoRARequest, await json_body(request))
        if not self.catalog.lora_enabled:
            raise APIError(400, "this deployment serves no LoRA adapters: start it with engine.enable_lora")
        await self._refresh_catalog()
        if self.catalog.knows(body.lora_name):
            raise APIError(400, f"a model named {body.lora_name!r} is already served", param="lora_name")
        if not _under(body.lora_path, self.config.lora_adapter_dirs):  # the same answer whether it exists or not
            raise APIError(403, "lora_path is not under the adapter directories this server loads from "
                           "(lora_adapter_dirs)", "permission_error", param="lora_path", code="path_not_allowed")
        # One LLM server reads it now (a bad folder is refused here); the others on first use.
        await self._server_call("load_lora", body.lora_name, body.lora_path)
        await self.admission.call("set_adapter", body.lora_name, body.lora_path)
        await self._refresh_catalog()
        return {"object": "lora_adapter", "id": body.lora_name, "root": body.lora_path, "parent": self.catalog.base,
                "status": "loaded"}

    async def unload_lora_adapter(self, request: Request) -> dict:
        body = self._validate_plain(UnloadLoRARequest, await json_body(request))
        await self._refresh_catalog()
        if body.lora_name not in self.catalog.dynamic:
            reason = "it is listed in the configuration" if body.lora_name in self.catalog.static else "none is loaded"
            raise APIError(404, f"cannot unload LoRA adapter {body.lora_name!r}: {reason}", param="lora_name",
                           code="model_not_found")
        await self.admission.call("set_adapter", body.lora_name, None)
        await self._refresh_catalog()
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}

    async def experiments(self) -> dict:
        await self._refresh_catalog()
        return {"object": "list", "data": [c for c in self.catalog.cards() if "experiment" in c]}

    async def set_experiment_weights(self, name: str, request: Request) -> dict:
        body = self._validate_plain(ExperimentWeightsRequest, await json_body(request))
        await self._refresh_catalog()
        current = self.catalog.weights.get(name)
        if current is None:
            raise APIError(404, f"no experiment named {name!r}", code="experiment_not_found")
        if set(body.weights) != set(current):
            raise APIError(400, f"weights must name each arm of {name!r}: {sorted(current)}", param="weights")
        if sum(body.weights.values()) <= 0:
            raise APIError(400, "some arm needs a weight above 0", param="weights")
        await self.admission.call("set_weights", name, body.weights)
        await self._refresh_catalog()
        return next(c for c in self.catalog.cards() if c["id"] == name)

    async def upload_file(self, request: Request) -> dict:
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=self.config.batch.max_file_bytes)
        except Exception as exc:  # noqa: BLE001 - starlette raises several kinds for bad multipart bodies
            raise APIError(400, f"expected a multipart/form-data body with 'file' and 'purpose': {exc}") from exc
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "missing the 'file' part", param="file")
        if not isinstance(purpose, str):
            raise APIError(400, "missing the 'purpose' field", param="purpose")
        ttl_s = None
        if form.get("expires_after[seconds]") is not None or form.get("expires_after[anchor]") is not None:
            try:  # OpenAI's expires_after, as its SDKs send it in the form
                ttl_s = ExpiresAfter(anchor=form.get("expires_after[anchor]") or "created_at",
                                     seconds=form.get("expires_after[seconds]")).seconds
            except ValidationError as exc:
                raise APIError(400, f"expires_after: {exc.errors()[0]['msg']} (anchor created_at, seconds 1 to "
                               "2592000)", param="expires_after") from exc
        data = await upload.read()
        return await self._call_batch("create_file", viewer(request), data, upload.filename or "upload.jsonl",
                                      purpose, ttl_s)

    async def create_batch(self, request: Request) -> dict:
        data = await json_body(request)
        try:
            body = BatchCreateRequest.model_validate(data)
        except ValidationError as exc:
            raise to_api_error(exc) from exc
        output_ttl_s = body.output_expires_after.seconds if body.output_expires_after is not None else None
        return await self._call_batch("create_batch", viewer(request), body.input_file_id, body.endpoint,
                                      body.completion_window, body.metadata, key_id(request), output_ttl_s)

    # Files and batches belong to the tenant that made them: the runner shows a caller (its
    # tenant, whether admin) only theirs, or all to an admin; another's is 404.

    async def list_files(self, request: Request) -> dict:
        return await self._call_batch("list_files", viewer(request))

    async def get_file(self, file_id: str, request: Request) -> dict:
        return await self._call_batch("get_file", viewer(request), file_id)

    async def delete_file(self, file_id: str, request: Request) -> dict:
        return await self._call_batch("delete_file", viewer(request), file_id)

    async def file_content(self, file_id: str, request: Request) -> Response:
        return Response(await self._call_batch("file_content", viewer(request), file_id),
                        media_type="application/jsonl")

    async def list_batches(self, request: Request, after: str | None = None, limit: int = 20) -> dict:
        return await self._call_batch("list_batches", viewer(request), after, max(1, min(limit, 100)))

    async def get_batch(self, batch_id: str, request: Request) -> dict:
        return await self._call_batch("get_batch", viewer(request), batch_id)

    async def cancel_batch(self, batch_id: str, request: Request) -> dict:
        return await self._call_batch("cancel_batch", viewer(request), batch_id)

    async def _call_batch(self, method: str, caller: tuple[str, bool] | None, *args):
        try:
            result = await self.batch.call.remote(method, caller, *args)
        except Exception as exc:
            raise to_api_error(exc) from exc
        if isinstance(result, APIError):  # a client error, returned rather than raised
            raise result
        return result


def _under(path: str, folders: list[str]) -> bool:
    """`path`, links resolved, is inside one of `folders` (an adapter may load only from there)."""
    resolved = os.path.realpath(os.path.expanduser(path))
    for folder in folders:
        root = os.path.realpath(os.path.expanduser(folder))
        if resolved != root and os.path.commonpath([resolved, root]) == root:
            return True
    return False
