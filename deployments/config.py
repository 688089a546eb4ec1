"""The service's configuration: one pydantic model, read from YAML. Unknown keys are errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.executors import ParallelConfig
from engine.config import EngineConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingSettings(_Strict):
    min_replicas: int = Field(1, ge=1, description="Fewest LLM server replicas (>= 1: the router's backlog "
                                                   "reaches the autoscaler through a live replica).")
    max_replicas: int = Field(1, ge=1, description="Most LLM server replicas.")
    target_ongoing_requests: float = Field(16, gt=0, description="Requests per replica Serve aims for.")
    upscale_delay_s: float = Field(5.0, ge=0, description="Sustained demand before scaling up (seconds).")
    downscale_delay_s: float = Field(30.0, ge=0, description="Sustained idleness before scaling down (seconds).")
    metrics_interval_s: float | None = Field(None, gt=0, description="How often replicas report load (Serve's default when unset).")
    look_back_period_s: float | None = Field(None, gt=0, description="Window load is averaged over (Serve's default when unset).")
    target_queue_wait_s: float | None = Field(None, gt=0, description="Scale up while realtime requests wait "
                                              "longer than this at the router (p90 of the last 10 s).")
    target_ttft_p90_s: float | None = Field(None, gt=0, description="Scale up while realtime time to first token "
                                            "(router wait + replica TTFT, p90 of the last 10 s) exceeds this.")

    def serve_autoscaling_config(self) -> dict:
        """Serve's autoscaling_config, with the policy that counts the router's backlog."""
        config = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "policy": {"policy_function": "deployments.ops.autoscaling:BacklogPolicy",
                       "policy_kwargs": {"target_queue_wait_s": self.target_queue_wait_s,
                                         "target_ttft_p90_s": self.target_ttft_p90_s}},
        }
        for key in ("metrics_interval_s", "look_back_period_s"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        return config


class ServerSettings(_Strict):
    num_cpus: float = Field(2, gt=0, description="CPUs per LLM server replica (also its torch threads).")
    num_gpus: float = Field(0, ge=0, description="GPUs per LLM server replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="Concurrent requests one replica accepts.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources each replica "
                                        "requires (e.g. a node label resource: replicas only on such nodes).")
    max_replicas_per_node: int | None = Field(None, ge=1, description="Spread the replicas: at most this many "
                                              "on one node (Serve's), so losing a node loses few.")
    routing: Literal["prefix_affinity", "power_of_two", "free_kv"] = Field(
        "prefix_affinity", description="Replica choice (deployments/routing.py): requests sharing a long prompt "
                                       "prefix go to the replica holding it (bounded load), else power of two "
                                       "choices on requests in flight; free_kv: rank by reported free KV blocks.")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    stream_interval_ms: float = Field(
        20, ge=0, description="A streamed request's tokens that come within this long of the last chunk sent go "
                              "out together in the next (its first token and its end never wait): every chunk "
                              "costs a message through the ingress and the proxy, work that shares the replica's "
                              "cores (2-core CPU replica, one stream: 5.5 ms a token at one chunk per token, 4.0 "
                              "at 20 ms, the engine alone 2.6). 0: a chunk per step, unless the stream falls "
                              "behind.")
    stream_chunks_per_s: float | None = Field(
        150, gt=0, description="Chunks per second one replica sends over all its open streams, at most: with N "
                               "streams open each waits at least N / this between chunks (its tokens go "
                               "together), so the messages between the processes, whose work shares the "
                               "model's cores, do not grow with the number of streams (2-core CPU replica, 16 "
                               "streams: a chunk per token halved the throughput). None: no such bound.")


class HTTPSettings(_Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP server listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the HTTP server listens on.")
    direct_ingress: bool = Field(True, description="`semline serve`: the ingress replica answers HTTP on `port` "
                                 "itself (Ray Serve's direct ingress), one process hop fewer per request and per "
                                 "stream chunk than through Serve's proxy (2-core machine, 16 streams: +3-5 % output "
                                 "tokens/s, the same server measured through both). Serve's proxy then listens on "
                                 "proxy_port. Only `semline serve` (which starts its own Ray cluster) applies it; a "
                                 "RayService keeps the proxy.")
    proxy_port: int | None = Field(None, ge=1, le=65535, description="With direct_ingress: the port of Serve's "
                                   "proxy (the same routes, one hop more); None: a free port.")
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="Largest request body accepted (413 above; "
                                "a body sent without Content-Length is cut off as soon as it passes the limit).")
    max_output_tokens: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for (400 above). "
                                   "Prompt length is limited by the engine's max_prompt_tokens / max_model_len.")
    request_timeout_s: float = Field(600, gt=0, description="Longest a realtime request may take from arrival to "
                                     "its last token (waiting for admission included): past it the request is "
                                     "aborted (its KV blocks freed) and the client gets 504 request_timeout, or, "
                                     "once a stream has started, an error event. A request's x-semline-timeout-ms "
                                     "header may ask for less.")
    response_ttl_s: float = Field(3600, gt=0, description="How long a stored /v1/responses answer is kept "
                                  "(GET /v1/responses/{id}, previous_response_id); every ingress replica sees it.")
    max_stored_responses: int = Field(4096, ge=0, description="Most /v1/responses answers kept at once for "
                                      "each tenant (its least recently used go first; another tenant's stay).")
    max_stored_response_bytes: int = Field(64 * 2**20, ge=1, description="Bytes of stored /v1/responses answers "
                                           "kept at once for each tenant (with their input and conversation).")
    node_resource: str | None = Field(None, description="A custom Ray resource the HTTP ingress requires: "
                                      "pins it to the node that runs Serve's proxy (the head).")
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto", description="How the model writes tool calls: auto picks the chat template's own format "
                            "(Mistral's [TOOL_CALLS], Llama 3's JSON), else hermes (<tool_call> JSON).")
    reasoning_parser: Literal["auto", "none", "deepseek_r1", "qwen3"] = Field(
        "auto", description="How a reasoning model's <think>...</think> is returned apart from the answer "
                            "(message.reasoning_content / reasoning, a Responses reasoning item): auto picks the "
                            "chat template's style (qwen3 when it takes enable_thinking, else deepseek_r1) or "
                            "none when the template never thinks.")
    reasoning_budget: int | None = Field(None, ge=0, description="Most tokens a reasoning model thinks "
                                         "before </think> is forced (llama.cpp's --reasoning-budget); a "
                                         "request's thinking_budget may set its own. None: no limit.")


class RouterSettings(_Strict):
    actor_name: str = Field("semline-router", description="Name of the router actor (one per application).")
    max_inflight_per_replica: int | None = Field(
        None, ge=1, description="Requests admitted per live LLM server replica; None = the engine's max_num_seqs. "
                                "The router's capacity follows the number of replicas.")
    max_queued_realtime: int = Field(256, ge=0, description="Realtime requests the router holds (429 above).")
    max_queued_batch: int = Field(4096, ge=0, description="Batch requests the router holds (429 above).")
    batch_wait_ms: float = Field(20, ge=0, description="How long batch-lane work may gather before dispatch.")
    batch_max_share: float = Field(0.25, gt=0, le=1, description="Share of the capacity the batch lane may fill, "
                                   "less the realtime requests in flight (at least one seat): batch work only "
                                   "uses what realtime leaves idle.")
    max_batch_size: int = Field(16, ge=1, description="Most requests dispatched together.")
    queue_timeout_s: float = Field(600, gt=0, description="Longest wait for admission before 503.")
    retry_after_s: float = Field(1, ge=0, description="Retry-After sent with 429.")
    holder_sync_s: float = Field(5, gt=0, description="How often each ingress and batch runner replica reports "
                                 "the tickets it holds; a ticket granted more than twice this long ago that its "
                                 "holder does not report is reclaimed.")
    holder_ttl_s: float = Field(30, gt=0, description="A holder silent this long is gone (a killed replica): "
                                "its tickets are reclaimed.")
    key_max_inflight: int | None = Field(None, ge=1, description="Per API key: sequences in flight or queued at "
                                         "once (429 key_limit above); None = no limit.")
    key_tokens_per_minute: int | None = Field(None, ge=1, description="Per API key: prompt + output tokens in the "
                                              "last minute (429 key_limit with Retry-After above); None = no limit.")
    fair_share: bool = Field(True, description="Within a lane and priority, grant seats by weighted fair queuing "
                             "between tenants (and keys); false: in arrival order.")
    light_headroom: int | None = Field(None, ge=0, description="Seats beyond the capacity a realtime request may "
                                       "take at once when its tenant (key) has nothing in flight, so it does not "
                                       "wait for another's requests to end; set max_inflight_per_replica that much "
                                       "below the engine's max_num_seqs so the engine has room for them. None: 1 "
                                       "where max_inflight_per_replica is None (each replica then admits "
                                       "max_num_seqs - 1), else 0.")

    def headroom(self) -> int:
        """light_headroom, resolved."""
        if self.light_headroom is not None:
            return self.light_headroom
        return 1 if self.max_inflight_per_replica is None else 0

    @model_validator(mode="after")
    def _ttl_spans_reports(self):
        if self.holder_ttl_s <= 2 * self.holder_sync_s:
            raise ValueError("router.holder_ttl_s must be more than twice router.holder_sync_s")
        return self

    def admission_config(self) -> dict:
        return {
            "max_inflight": 0,  # no replica yet: capacity arrives with the replicas' heartbeats
            "max_queued": {"realtime": self.max_queued_realtime, "batch": self.max_queued_batch},
            "batch_wait_ms": {"realtime": 0.0, "batch": self.batch_wait_ms},
            "max_share": {"realtime": 1.0, "batch": self.batch_max_share},
            "max_batch_size": self.max_batch_size,
            "retry_after_s": self.retry_after_s,
            "holder_ttl_s": self.holder_ttl_s,
            "reclaim_grace_s": 2 * self.holder_sync_s,
            "recovery_s": 1.5 * self.holder_sync_s,
            "key_max_inflight": self.key_max_inflight,
            "key_tokens_per_minute": self.key_tokens_per_minute,
            "fair_share": self.fair_share,
            "light_headroom": self.headroom(),
        }


class BatchSettings(_Strict):
    storage_dir: str = Field(os.path.join(os.environ.get("SEMLINE_CACHE", "~/.cache/semline"), "batches"),
                             description="Where batch files and batch state persist (survives restarts).")
    max_file_bytes: int = Field(64 * 2**20, ge=1024, description="Largest uploaded file (413 above).")
    max_concurrency: int = Field(256, ge=1, description="Batch lines waiting at the router or running, all batches.")
    max_open_batches: int = Field(64, ge=1, description="Batches not yet finished (429 above).")
    max_requests_per_batch: int = Field(50_000, ge=1, description="Lines one batch file may hold.")
    max_retries: int = Field(5, ge=0, description="Retries of a line that hit a full router or a lost replica.")
    completion_windows: list[str] = Field(["24h"], min_length=1, description="The completion windows a batch may "
                                          "ask for (OpenAI offers 24h): a number and s/m/h/d. A batch not done "
                                          "within its window expires: lines done so far go to its output file, "
                                          "the rest to its error file (code batch_expired).")
    node_resource: str | None = Field(None, description="A custom Ray resource the batch runner requires: pins it "
                                      "to the node that holds storage_dir (on Kubernetes, the head with its volume).")
    max_storage_bytes: int = Field(16 * 2**30, ge=1024, description="Uploaded files, all tenants together (413 "
                                   "storage_full above; a batch's own output is never refused).")
    output_ttl_s: float = Field(30 * 86400, gt=0, description="A batch's output and error files expire this long "
                                "after they are written, unless the batch asks otherwise (output_expires_after).")
    retention_s: float = Field(30 * 86400, gt=0, description="A finished batch's record is deleted this long after "
                               "it finished.")
    reap_interval_s: float = Field(60, gt=0, description="How often expired files and old batches are deleted.")


    @field_validator("completion_windows")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        from deployments.api.protocol import window_seconds

        bad = [w for w in value if window_seconds(w) is None]
        if bad:
            raise ValueError(f"completion windows are a number and s/m/h/d (24h, 30m): {bad}")
        return value


class ArmSettings(_Strict):
    name: str = Field(min_length=1, description="The arm's name (the x-semline-arm header, the arm label).")
    model: str = Field(min_length=1, description="What it serves: the base model's name or a LoRA adapter's.")
    weight: float = Field(ge=0, description="Its share of the experiment's traffic (relative to the others').")


class ExperimentSettings(_Strict):
    name: str = Field(min_length=1, description="The public model name whose traffic is split.")
    arms: list[ArmSettings] = Field(min_length=1, description="The arms; weights can change at run time "
                                    "(POST /v1/experiments/{name}).")

    @model_validator(mode="after")
    def _arms(self):
        if len({a.name for a in self.arms}) != len(self.arms):
            raise ValueError(f"experiment {self.name!r}: arm names must differ")
        if sum(a.weight for a in self.arms) <= 0:
            raise ValueError(f"experiment {self.name!r}: some arm needs a weight above 0")
        return self


class FilterSettings(_Strict):
    type: Literal["blocklist", "pii", "max_length", "classifier"] = Field(
        description="blocklist: phrases and regexes; pii: e-mail, phone and card numbers; max_length: cut long "
                    "outputs; classifier: a Python callable on the whole text (deployments/quality/filters.py).")
    name: str | None = Field(None, description="The filter's label in the hit metrics (default: its type).")
    models: list[str] | None = Field(None, description="The public model names (base, adapters, experiments) "
                                     "whose answers it filters; None = all.")
    phrases: list[str] = Field(default_factory=list, description="blocklist: phrases (case-insensitive).")
    patterns: list[str] = Field(default_factory=list, description="blocklist: regular expressions.")
    action: Literal["replace", "refuse"] = Field("replace", description="blocklist: write the replacement over "
                                                 "a match, or end the output where it begins (content_filter).")
    replacement: str | None = Field(None, description="blocklist: the text put in place of a match (default "
                                    "'***'); pii: of every kind (default [email], [phone], [card]).")
    kinds: list[Literal["email", "phone", "card"]] = Field(["email", "phone", "card"], description="pii: what to mask.")
    max_chars: int | None = Field(None, ge=1, description="max_length: the longest output, in characters.")
    callable: str | None = Field(None, description="classifier: 'package.module:function', called with the "
                                 "text; returns True or a score.")
    threshold: float = Field(0.5, description="classifier: a score at or above this withholds the output.")

    @model_validator(mode="after")
    def _complete(self):
        import regex

        if self.type == "blocklist":
            if not self.phrases and not self.patterns:
                raise ValueError("a blocklist filter needs phrases or patterns")
            for pattern in self.patterns:
                try:
                    regex.compile(pattern)
                except regex.error as exc:
                    raise ValueError(f"blocklist pattern {pattern!r}: {exc}") from exc
            if self.replacement is None:
                self.replacement = "***"
        if self.type == "max_length" and self.max_chars is None:
            raise ValueError("a max_length filter needs max_chars")
        if self.type == "classifier" and not self.callable:
            raise ValueError("a classifier filter needs callable ('package.module:function')")
        return self


class ResultCacheSettings(_Strict):
    enabled: bool = Field(False, description="Answer repeated deterministic requests (greedy or seeded, not "
                          "streamed) from a cache, in both lanes (x-semline-cache: hit); each tenant from its "
                          "own answers.")
    max_entries: int = Field(4096, ge=1, description="Answers kept for each tenant (least recently used out).")
    max_bytes: int = Field(64 * 2**20, ge=1, description="Bytes of answers kept for each tenant (least recently "
                           "used out).")
    models: list[str] | None = Field(None, description="The public model names whose answers are cached; "
                                     "None = all.")
    ttl_s: float = Field(600, gt=0, description="How long an answer is kept.")


class FeedbackSettings(_Strict):
    storage_dir: str = Field(os.path.join(os.environ.get("SEMLINE_CACHE", "~/.cache/semline"), "feedback"),
                             description="Where responses and ratings persist (append-only JSONL).")
    store_outputs: bool = Field(False, description="Keep each answer's prompt and output with it, so "
                                "GET /v1/feedback exports them with the ratings (for fine-tuning).")
    retention_s: float = Field(7 * 86400, gt=0, description="How long a response (and its prompt and output) "
                               "is kept for rating, and a rating kept (exported, counted in the metrics).")
    max_responses: int = Field(100_000, ge=1, description="Responses each ingress replica keeps in memory (the "
                               "tenant holding the most gives up its oldest first).")
    max_log_bytes: int = Field(256 * 2**20, ge=4096, description="Bytes of each log (responses.jsonl, "
                               "feedback.jsonl); past it, lines are dropped down to half of it (answers no longer "
                               "ratable, ratings no longer exported), the oldest of the tenants holding the most: "
                               "a tenant below the fair level loses none.")
    max_ratings_per_response: int = Field(16, ge=1, description="Ratings one answer may have (429 rating_limit "
                                          "above), so the ratings log grows with the answers, not with the posts.")


class QualitySettings(_Strict):
    filters: list[FilterSettings] = Field(default_factory=list, description="The output filter chain, in order.")
    result_cache: ResultCacheSettings = Field(default_factory=ResultCacheSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)


class KubernetesSettings(_Strict):
    """The cluster around the application; read only by `semline k8s render`."""

    name: str = Field("semline", description="Name of the RayService (and prefix of the other objects).")
    namespace: str = Field("semline", description="Namespace of every object.")
    image: str = Field("ghcr.io/semline/semline:0.1.0", description="The serving image (see Dockerfile).")
    api_keys_secret: str | None = Field(None, description="The Secret holding the API keys, required when the "
                                        "config has none of its own: its `api-keys` (comma-separated) become the "
                                        "'default' inference tenant's ($SEMLINE_API_KEYS), its optional "
                                        "`admin-keys` $SEMLINE_ADMIN_KEYS (a tenant's keys_env).")
    head_cpu: str = Field("4", description="Head pod CPU request and limit (runs the proxy, ingress, router, batch runner).")
    head_memory: str = Field("16Gi", description="Head pod memory request and limit.")
    worker_cpu: str = Field("8", description="GPU worker pod CPU request and limit.")
    worker_memory: str = Field("32Gi", description="GPU worker pod memory request and limit.")
    worker_gpus: int | None = Field(None, ge=1, description="GPUs per worker pod (nvidia.com/gpu); None = the "
                                    "engine's tensor_parallel_size (one tensor-parallel group per pod).")
    batch_volume_size: str = Field("20Gi", description="Size of the volume that holds batch files and state.")
    batch_job_input: str = Field("/data/jobs/input.jsonl", description="Input of the offline batch RayJob.")
    batch_job_output: str = Field("/data/jobs/output.jsonl", description="Output of the offline batch RayJob.")


ROLES = ("admin", "inference")
# The tenant the legacy key settings (api_key, api_keys, api_keys_file, $SEMLINE_API_KEYS) form.
DEFAULT_TENANT = "default"
# Who calls a server that has no keys at all (bound to loopback: the local experience).
OPEN_TENANT = "local"


class TenantSettings(_Strict):
    """One tenant of a shared deployment: its keys, what it may do and its share of the line."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="The tenant's name (metrics "
                      "label, owner of its files, batches and responses).")
    keys: list[str] = Field(default_factory=list, description="Its API keys.")
    keys_file: str | None = Field(None, description="A file of more of its keys, one per line ('#' comments).")
    keys_env: str | None = Field(None, description="An environment variable holding more of its keys, "
                                 "comma-separated.")
    role: Literal["admin", "inference"] = Field("inference", description="admin: every route, and every tenant's "
                                                "files, batches and responses; inference: the OpenAI routes.")
    weight: float = Field(1.0, gt=0, description="Its fair share: within a lane and priority, seats go to the "
                          "tenant granted the fewest tokens for its weight (weighted fair queuing).")
    max_priority: int | None = Field(None, description="The most urgent request priority it may ask for (lower is "
                                     "more urgent): a request asking for less is refused 403; one asking for none gets "
                                     "max(0, max_priority). None: any.")
    max_inflight: int | None = Field(None, ge=1, description="Sequences in flight or queued at once (429 "
                                     "key_limit above); None: router.key_max_inflight.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Prompt + output tokens in the last minute "
                                          "(429 key_limit above); None: router.key_tokens_per_minute.")
    batch_storage_bytes: int | None = Field(None, ge=1, description="Bytes of its batch files (uploads and its "
                                            "batches' outputs) it may hold; an upload past it is 413.")
    max_batches: int | None = Field(None, ge=1, description="Its batches not yet finished (429 above).")

    def all_keys(self) -> list[str]:
        keys = list(self.keys)
        if self.keys_file:
            keys += read_keys_file(self.keys_file)
        if self.keys_env:
            keys += [k.strip() for k in os.environ.get(self.keys_env, "").split(",") if k.strip()]
        return keys

    @property
    def limit_key(self) -> str:
        """The id its requests are counted under at the router (per-tenant limits)."""
        return f"tenant:{self.name}"


def tenant_of_key(key: str | None) -> str:
    """The tenant a request's limit key (TenantSettings.limit_key, or a legacy key's id) names."""
    return key[7:] if key and key.startswith("tenant:") else DEFAULT_TENANT


def may_see(viewer: tuple[str, bool] | None, owner: str | None) -> bool:
    """Whether a caller ((tenant name, is admin); None: no tenants, as in the batch job) may see
    what `owner` created (None: made before tenants, the 'default' tenant's)."""
    return viewer is None or viewer[1] or (owner or DEFAULT_TENANT) == viewer[0]


def read_keys_file(path: str) -> list[str]:
    keys = []
    for line in Path(path).expanduser().read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(line)
    return keys


class SemlineConfig(_Strict):
    """Everything `semline serve` needs."""

    model_name: str = Field("SmolLM2-135M-Instruct", description="Model id clients use in requests.")
    served_model_names: list[str] = Field(default_factory=list, description="More names clients may use for "
                                          "the base model (vLLM's --served-model-name after the first); metrics "
                                          "and answers name it model_name.")
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields (see engine/config.py).")
    parallel: dict[str, Any] = Field(default_factory=dict, description="How the Ray workers of a split model are "
                                     "placed and watched: ParallelConfig fields (see cluster/executors.py).")
    server: ServerSettings = Field(default_factory=ServerSettings)
    http: HTTPSettings = Field(default_factory=HTTPSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    api_key: str | None = Field(None, description="When set, every /v1/* request needs 'Authorization: Bearer <key>'.")
    api_keys: list[str] = Field(default_factory=list, description="More accepted API keys (any one will do).")
    api_keys_file: str | None = Field(None, description="A file of accepted API keys, one per line ('#' comments), "
                                      "read when the application starts. $SEMLINE_API_KEYS (comma-separated) "
                                      "adds more.")
    tenants: list[TenantSettings] = Field(default_factory=list, description="Who may call: each tenant's keys, "
                                          "role and limits. The keys of api_key, api_keys, api_keys_file and "
                                          "$SEMLINE_API_KEYS form one more, inference tenant named 'default' "
                                          "(each of its keys with the router's per-key limits).")
    lora_adapter_dirs: list[str] = Field(default_factory=list, description="Folders under which "
                                         "POST /v1/load_lora_adapter may load adapters (none: it loads none).")
    experiments: list[ExperimentSettings] = Field(default_factory=list, description="A/B experiments: public "
                                                  "model names whose traffic is split between arms.")
    quality: QualitySettings = Field(default_factory=QualitySettings)
    metrics_export_port: int = Field(8080, ge=1, le=65535, description="Port of the Ray node's Prometheus "
                                     "metrics (`semline serve` starts Ray with it).")
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings,
                                           description="Only for `semline k8s render`.")

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, value: dict[str, Any]) -> dict[str, Any]:
        EngineConfig.from_dict(value)  # raises ConfigError naming unknown keys or bad values
        return value

    @model_validator(mode="after")
    def _model_names(self):
        adapters = set((self.engine.get("lora_modules") or {}))
        names = [self.model_name, *self.served_model_names, *adapters, *(e.name for e in self.experiments)]
        if len(set(names)) != len(names):
            raise ValueError("the model name, its other served names, the LoRA adapters' and the experiments' "
                             "names must all differ")
        return self

    @field_validator("parallel")
    @classmethod
    def _check_parallel(cls, value: dict[str, Any]) -> dict[str, Any]:
        ParallelConfig.from_dict(value)
        return value

    @model_validator(mode="after")
    def _tenant_names(self):
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names) or {DEFAULT_TENANT, OPEN_TENANT} & set(names):
            raise ValueError(f"tenant names must differ, and not be {DEFAULT_TENANT!r} (the legacy keys' tenant) "
                             f"or {OPEN_TENANT!r} (callers of a server without keys)")
        return self

    def accepted_api_keys(self) -> list[str]:
        """The legacy keys (the 'default' tenant's): api_key, api_keys, the file's, $SEMLINE_API_KEYS."""
        keys = ([self.api_key] if self.api_key else []) + list(self.api_keys)
        if self.api_keys_file:
            keys += read_keys_file(self.api_keys_file)
        keys += [k.strip() for k in os.environ.get("SEMLINE_API_KEYS", "").split(",") if k.strip()]
        return list(dict.fromkeys(keys))

    def tenant_keys(self) -> dict[str, TenantSettings]:
        """Every accepted key and the tenant it belongs to (read when the application starts).
        Empty: no key is needed (a server without keys). A key given to two tenants is an error."""
        table: dict[str, TenantSettings] = {}
        legacy = self.accepted_api_keys()
        owners = [(key, TenantSettings(name=DEFAULT_TENANT)) for key in legacy]
        owners += [(key, tenant) for tenant in self.tenants for key in tenant.all_keys()]
        for key, tenant in owners:
            if key in table and table[key].name != tenant.name:
                raise ValueError(f"an API key is given to both tenant {table[key].name!r} and {tenant.name!r}")
            table[key] = tenant
        return table

    def tenant(self, name: str) -> TenantSettings | None:
        if name == DEFAULT_TENANT:
            return TenantSettings(name=DEFAULT_TENANT)
        if name == OPEN_TENANT:
            return TenantSettings(name=OPEN_TENANT, role="admin")
        return next((t for t in self.tenants if t.name == name), None)

    def admission_config(self) -> dict:
        """The router's admission settings, with each tenant's own limits."""
        limits = {t.limit_key: [t.max_inflight, t.tokens_per_minute] for t in self.tenants
                  if t.max_inflight is not None or t.tokens_per_minute is not None}
        weights = {t.limit_key: t.weight for t in self.tenants if t.weight != 1.0}
        return {**self.router.admission_config(), "key_limits": limits, "key_weights": weights}

    def engine_config(self) -> EngineConfig:
        return EngineConfig.from_dict(self.engine)

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig.from_dict(self.parallel)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SemlineConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        return cls.model_validate(data)
