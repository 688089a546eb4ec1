"""OpenAI-compatible request bodies (the parts semline serves) and their mapping to SamplingParams."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator,
                      model_validator)

from engine import SamplingParams
from engine.sampling_params import MAX_LOGPROBS as MAX_PROMPT_LOGPROBS
from engine.structured_output import StructuredOutput

MAX_N = 16
# Stop sequences per request, and characters per stop sequence (each is checked after every token).
MAX_STOP = 16
MAX_STOP_CHARS = 256

StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


# The most choices one request may ask for: prompts x n (a seat each at the router).
MAX_CHOICES = 128

# Fields OpenAI (or vLLM) defines that semline does not serve: 400 naming them, rather than
# ignoring what the client relies on. {field: why}
UNSUPPORTED_FIELDS = {
    "functions": "the deprecated functions API is not supported; send tools",
    "function_call": "the deprecated functions API is not supported; send tool_choice",
    "audio": "the served models produce text only",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "suffix": "suffix (insertion) is not supported",
}


class ParamError(ValueError):
    """A request-level check that knows which parameter is wrong (the error body's `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Open(BaseModel):
    """Fields this version does not know are accepted and ignored (listed in the response's
    x-semline-ignored-fields header), so a newer SDK's additions do not break clients."""

    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool = False
    # vLLM's: every chunk carries the usage so far (prompt tokens, completion tokens to that chunk).
    continuous_usage_stats: bool = False


class FunctionDefinition(_Open):
    name: Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class JsonSchemaFormat(_Open):
    name: str = "response"
    description: str | None = None
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ParamError("json_schema", "response_format of type json_schema needs a json_schema")
        return self


class StructuredOutputs(_Open):
    """vLLM's extension: exactly one of json, regex, choice, grammar."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _Common(_Open):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as vLLM's (seed + choice fits 64 bits)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")],
                     Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=1024)
    user: str | None = None
    # Accepted, and not acted on: semline stores no completions.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    response_format: ResponseFormat | None = None
    # Extensions beyond OpenAI's API (vLLM uses the same names).
    # Each prompt token's logprob and this many alternatives, in vLLM's shape (not with stream).
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_PROMPT_LOGPROBS)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    # Admission order within the lane (vLLM's name): lower first.
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    # The first token is due within this many milliseconds; the router refuses at once (429)
    # what its queue cannot admit in time, and 503 once it has passed.
    ttft_deadline_ms: float | None = Field(None, gt=0, lt=1e9)
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _check_prompt_logprobs(self):
        if self.prompt_logprobs is not None and self.stream:
            raise ParamError("prompt_logprobs", "prompt_logprobs are not returned with stream: true")
        return self

    def ignored_fields(self) -> list[str]:
        """The request's fields this version does not know, top level and nested (dotted)."""
        return sorted(_extra_names(self, ""))

    def structured_output(self) -> StructuredOutput | None:
        """What the output must match: response_format, or vLLM's structured_outputs / guided_*."""
        given = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given.append(("response_format", StructuredOutput(json_object=True)))
        elif fmt is not None and fmt.type == "json_schema":
            given.append(("response_format", StructuredOutput(json_schema=fmt.json_schema.schema_)))
        vllm = self.structured_outputs
        for name, kind, value in (
                ("structured_outputs", None, vllm),
                ("guided_json", "json_schema", self.guided_json), ("guided_regex", "regex", self.guided_regex),
                ("guided_choice", "choice", self.guided_choice), ("guided_grammar", "grammar", self.guided_grammar)):
            if value is None:
                continue
            if kind is None:
                fields = {"json_schema": value.json_, "regex": value.regex, "choice": value.choice,
                          "grammar": value.grammar}
                fields = {k: v for k, v in fields.items() if v is not None}
            else:
                fields = {kind: value}
            if isinstance(fields.get("json_schema"), str):
                fields["json_schema"] = _json_object(fields["json_schema"], name)
            given.append((name, StructuredOutput(**fields)))
        if len(given) > 1:
            raise ParamError(given[1][0], f"{given[0][0]} and {given[1][0]} both constrain the output; send one")
        return given[0][1] if given else None

    def sampling_params(self, max_tokens: int, num_logprobs: int | None, index: int,
                        structured_output: StructuredOutput | None = None,
                        skip_special_tokens: bool = True, prompt_logprobs: int | None = None,
                        defaults: dict | None = None) -> SamplingParams:
        """defaults: the model's own sampling settings (generation_config.json), used for the
        fields this request does not set."""
        seed = None if self.seed is None else self.seed + index
        bias = {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
        given, defaults = self.model_fields_set, defaults or {}

        def pick(name: str):
            return getattr(self, name) if name in given or name not in defaults else defaults[name]

        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"),
                min_p=pick("min_p"), repetition_penalty=pick("repetition_penalty"),
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                seed=seed, stop=self.stop, ignore_eos=self.ignore_eos, logprobs=num_logprobs,
                logit_bias=bias, structured_output=structured_output, skip_special_tokens=skip_special_tokens,
                prompt_logprobs=prompt_logprobs,
            )
        except ValidationError as exc:  # a combination the engine refuses: the request's fault (400), not a 500
            error = exc.errors()[0]
            param = ".".join(str(part) for part in error["loc"]) or "body"
            raise ParamError(param, f"{param}: {error['msg']}") from None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Common):
    # A text, token ids, or a batch of either (each prompt gets n choices, indexed in order).
    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1)] | Annotated[
        list[TokenIds], Field(min_length=1)] = Field(..., description="Text, token ids, or a list of either.")
    # 0 only with echo: the prompt's text (and its logprobs) without generating (evaluation).
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    # With logprobs: every prompt token's logprob too (the first is null), before the output's.
    echo: bool = False
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ParamError("best_of", "best_of other than n is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ParamError("max_tokens", "max_tokens 0 generates nothing; it is allowed only with echo")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ParamError("n", f"prompts x n is at most {MAX_CHOICES} choices per request")
        return self

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)


class ChatMessage(_Open):
    # "developer" is what newer SDKs and agent frameworks send for system instructions.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or a list of content parts: text parts are joined (one per line); other
    # kinds (images, audio, files) are refused, naming the part, since the served models read text.
    # Null or absent: no text (an assistant message that only carries tool_calls).
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, value):
        if value is None or isinstance(value, str):
            return value
        texts = []
        for index, part in enumerate(value):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part {index} is of type {kind!r}: the served model reads text only "
                                 "(parts of type 'text' with a 'text' string)")
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _by_role(self):
        if self.tool_calls and self.role != "assistant":
            raise ParamError("tool_calls", "only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ParamError("tool_call_id", "a tool message needs the tool_call_id it answers")
        return self

    def template_message(self) -> dict:
        """The message as the model's chat template takes it (a developer message is a system one)."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump(include={"id", "type", "function"}) for call in self.tool_calls]
        return message


# Variables a chat template is rendered with that a request may not set itself.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "conversation", "tools", "documents", "add_generation_prompt",
                                      "continue_final_message", "tokenize", "return_dict", "chat_template",
                                      "tokenizer", "bos_token", "eos_token"})


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    # vLLM's: more variables for the chat template (e.g. {"enable_thinking": false} for Qwen3).
    chat_template_kwargs: dict[str, Any] | None = Field(None, max_length=32)
    # A reasoning model's most tokens of thinking, then </think> is forced (http.reasoning_budget).
    thinking_budget: int | None = Field(None, ge=0)
    # vLLM's: end the prompt with the assistant's turn opened (default), or go on writing the
    # last message, an assistant's (e.g. an answer or a thought begun for the model).
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("chat_template_kwargs")
    @classmethod
    def _check_template_kwargs(cls, value):
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(value or ()))
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)} (the request's own fields do)")
        return value or None

    @model_validator(mode="after")
    def _check_tools(self):
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise ParamError("tool_choice", "tool_choice other than none/auto needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
                t.function.name for t in self.tools}:
            raise ParamError("tool_choice", f"tool_choice names {choice.function.name!r}, which is not among the tools")
        return self

    @model_validator(mode="after")
    def _check_continuation(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ParamError("continue_final_message", "continue_final_message needs add_generation_prompt false "
                             "(the last message is continued, no new turn is opened)")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ParamError("continue_final_message", "continue_final_message continues the last message, which "
                             "must be the assistant's")
        return self

    def template_options(self) -> dict | None:
        """What the chat template is rendered with: chat_template_kwargs, and how the prompt ends."""
        options = dict(self.chat_template_kwargs or {})
        if not self.add_generation_prompt:
            options.update(add_generation_prompt=False, continue_final_message=self.continue_final_message)
        return options or None

    def active_tools(self) -> list[dict] | None:
        """The tools the model is offered (none with tool_choice none), as OpenAI dicts."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True, include={"type", "function"}) for t in self.tools]

    def forced_tools(self) -> list[dict] | None:
        """The tools one of which must be called (tool_choice required or named), else None."""
        tools = self.active_tools()
        if tools is None or self.tool_choice in (None, "auto"):
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in tools if t["function"]["name"] == self.tool_choice.function.name]
        return tools


# The most inputs one embeddings request may carry.
MAX_EMBEDDING_INPUTS = 256


class EmbeddingRequest(_Open):
    model: str
    input: Annotated[str, StringConstraints(min_length=1)] | TokenIds | Annotated[
        list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
    ] | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        value = self.input
        if isinstance(value, str) or isinstance(value[0], int):
            return [value]
        return list(value)

    def ignored_fields(self) -> list[str]:
        return sorted(_extra_names(self, ""))


class TokenizeRequest(_Open):
    """vLLM's /tokenize: a prompt, or chat messages rendered as /v1/chat/completions would."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("prompt", "send exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Open):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class ResponsesRequest(_Open):
    """OpenAI's Responses API request (text in and out, function tools)."""

    model: str
    input: Annotated[str, StringConstraints(min_length=1)] | Annotated[list[dict], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    tools: Annotated[list[dict], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    # Answered at once (queued); run on, then read with GET /v1/responses/{id}, or cancelled.
    background: bool = False
    metadata: dict[str, str] | None = None
    text: dict | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check_background(self):
        if self.background and not self.store:
            raise ParamError("background", "background responses are read back later: they need store true")
        if self.background and self.stream:
            raise ParamError("background", "a background response is not streamed: send stream false and read it "
                             "with GET /v1/responses/{id}")
        return self

    def ignored_fields(self) -> list[str]:
        return sorted(_extra_names(self, ""))


def unsupported_field(data: dict) -> tuple[str, str] | None:
    """(field, why) for the first field of a request body that semline knows but does not serve."""
    for name, why in UNSUPPORTED_FIELDS.items():
        if data.get(name) is not None:
            return name, why
    if data.get("modalities") not in (None, ["text"]):
        return "modalities", "the served models produce text only (['text'])"
    return None


def _extra_names(model: BaseModel, prefix: str) -> set[str]:
    names = {prefix + name for name in (model.model_extra or {})}
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, BaseModel):
                names |= _extra_names(item, f"{prefix}{name}.")
    return names


def _json_object(text: str, field: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{field} is not valid JSON: {exc}") from exc


def window_seconds(window: str) -> float | None:
    """Seconds of a completion window written as a number and a unit ("24h", "90m", "30s",
    "2d"), or None if it is not one."""
    match = re.fullmatch(r"([0-9]{1,6})([smhd])", window)
    if match is None:
        return None
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


class ExpiresAfter(BaseModel):
    """OpenAI's expiry of a file: `seconds` after its creation."""

    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(..., ge=1, le=2592000)


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: Literal["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses"]
    completion_window: Annotated[str, StringConstraints(max_length=16)] = "24h"  # batch.completion_windows
    metadata: dict[str, str] | None = None
    output_expires_after: ExpiresAfter | None = None  # its output and error files' (batch.output_ttl_s)


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a user's rating of an answer (by its id)."""

    model_config = ConfigDict(extra="forbid")
    response_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    score: float | Literal["up", "down"] = Field(description="A number, or a thumbs up (1) / down (0).")
    label: Annotated[str, StringConstraints(max_length=256)] | None = None
    comment: Annotated[str, StringConstraints(max_length=8192)] | None = None

    @field_validator("score")
    @classmethod
    def _finite(cls, value):
        if isinstance(value, float) and not -1e9 < value < 1e9:
            raise ValueError("score must be a finite number")
        return value

    def numeric_score(self) -> float:
        return {"up": 1.0, "down": 0.0}.get(self.score, self.score) if isinstance(self.score, str) else self.score


class LoadLoRARequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's): serve a PEFT folder under a model name."""

    model_config = ConfigDict(extra="forbid")
    lora_name: Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[\w.:/-]+$")]
    lora_path: Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class ExperimentWeightsRequest(BaseModel):
    """POST /v1/experiments/{name}: new weights for its arms (all of them)."""

    model_config = ConfigDict(extra="forbid")
    weights: dict[str, Annotated[float, Field(ge=0, le=1e9)]]


# --- responses: what the routes answer, published in the OpenAPI schema -------------------
# (tests/deployments/test_fuzz.py validates every fuzzed answer against them)

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer of a /v1 route."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = None  # the base model, or the adapter's folder
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None  # tokens of context (prompt and output), as vLLM's cards say


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class FeedbackObject(BaseModel):
    object: Literal["feedback"]
    id: str
    created: float
    response_id: str
    model: str
    experiment: str | None
    arm: str | None
    score: float
    label: str | None
    comment: str | None


class LoRAAdapterStatus(BaseModel):
    object: Literal["lora_adapter"]
    id: str
    status: Literal["loaded", "unloaded"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV blocks came from the prefix cache


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int  # a reasoning model's thinking, its tags included


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    # null for an echoed prompt's first token (nothing predicts it)
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry for one token id at one prompt position."""

    logprob: float
    rank: int | None
    decoded_token: str


# Per prompt token: null (the first), or the token's own entry and its top alternatives by id.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    prompt_logprobs: PromptLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None
    # A reasoning model's thinking (http.reasoning_parser), under both of vLLM's names.
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ToolCallFunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed tool call (or a piece of one): a client joins pieces with the same index."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunctionDelta | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # a str: base64 of little-endian float32s


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class Detokenized(BaseModel):
    prompt: str


class ResponseObject(BaseModel):
    """A Response of /v1/responses (output items: `message` with `output_text` parts, `function_call`)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "queued", "failed", "cancelled"]
    model: str
    output: list[dict]
    error: dict | None
    incomplete_details: dict | None
    usage: dict | None


class ResponseItemList(BaseModel):
    """GET /v1/responses/{id}/input_items: the input of a stored response, as items."""

    object: Literal["list"]
    data: list[dict]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class ResponseEvent(BaseModel):
    """One `data:` event of a streamed response (its `event:` line names the same type)."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    expires_at: int | None = None  # deleted then (expires_after; a batch's outputs: batch.output_ttl_s)
    filename: str
    purpose: str
    status: str
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class Batch(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                    "cancelling", "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool
