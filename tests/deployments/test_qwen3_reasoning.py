"""A Qwen3-style reasoning model served end to end: a tiny random-weight Qwen3 folder built
here with Qwen3's real chat template (tests/templates.py) and its thinking tags as tokens of
their own (added, not special, as in Qwen3's vocabulary), in an application beside the
session's (removed at the end). A random model does not think of itself: a logit bias makes
it open the block, the thinking budget closes it, and the grammar of the answer applies
after it (engine/thinking.py)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch
import transformers

from tests.deployments.conftest import API_KEY
from tests.templates import llama_cpp_template

NAME = "tiny-qwen3"
ANSWER = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["answer"],
          "additionalProperties": False}
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}  # bounded: a random model would write digits forever
ADD = {"type": "function", "function": {"name": "add", "description": "Add two digits.", "parameters": {
    "type": "object", "properties": {"a": DIGIT, "b": DIGIT}, "required": ["a", "b"], "additionalProperties": False}}}
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    from engine.config import EngineConfig
    from engine.loader import resolve_model_dir

    folder = tmp_path_factory.mktemp("qwen3")
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_dir(None, EngineConfig().resolve_cache_dir()))
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = llama_cpp_template("Qwen-Qwen3-0.6B")
    tokenizer.save_pretrained(folder)
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer) + 6, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder, tokenizer


@pytest.fixture(scope="module")
def qwen3(serve_app, app_config, qwen3_folder, tmp_path_factory):
    """An OpenAI client of the application serving the tiny Qwen3, and its tokenizer."""
    from ray import serve

    from deployments.app import build_app

    folder, tokenizer = qwen3_folder
    config = app_config.model_copy(update={
        "model_name": NAME, "served_model_names": [], "experiments": [],
        "engine": {"model": str(folder), "device": "cpu", "dtype": "float32", "quantization": "none",
                   "kv_cache_memory_gb": 0.05},
        "quality": app_config.quality.model_copy(update={"filters": []}),
        "router": app_config.router.model_copy(update={"actor_name": "semline-router-qwen3"}),
        "batch": app_config.batch.model_copy(update={"storage_dir": str(tmp_path_factory.mktemp("qwen3-batch"))}),
    })
    serve.run(build_app(config), name="qwen3", route_prefix="/qwen3")
    yield openai.OpenAI(base_url=f"{serve_app}/qwen3/v1", api_key=API_KEY, max_retries=0, timeout=120), tokenizer
    serve.delete("qwen3")


def _thinking(tokenizer, budget: int) -> dict:
    """A bias that makes the random model open its thinking (and keep writing the tag while it
    thinks), closed after `budget` tokens."""
    return {"logit_bias": {str(tokenizer.convert_tokens_to_ids("<think>")): 100}, "thinking_budget": budget}


def test_the_template_is_read_as_qwen3s(qwen3, serve_app):
    client, tokenizer = qwen3
    on = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=4, temperature=0)
    off = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=4, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    empty_block = tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert off.usage.prompt_tokens == on.usage.prompt_tokens + len(empty_block)  # thinking off: an empty block
    assert off.choices[0].message.model_extra.get("reasoning_content") is None
    assert off.usage.completion_tokens_details.reasoning_tokens == 0
    card = httpx.get(f"{serve_app}/qwen3/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
    assert [c["id"] for c in card] == [NAME] and card[0]["max_model_len"] == 1024


def test_structured_output_applies_after_the_thinking_streamed_or_not(qwen3):
    """The thinking apart (reasoning_content), the answer in the schema, the reasoning tokens
    counted; streamed deltas the same, thinking first."""
    client, tokenizer = qwen3
    kwargs = dict(model=NAME, messages=QUESTION, max_tokens=40, temperature=0, extra_body=_thinking(tokenizer, 3),
                  response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}})
    answer = client.chat.completions.create(**kwargs)
    message = answer.choices[0].message
    assert message.model_extra["reasoning_content"] == "<think>" * 3  # what the bias wrote while it thought
    jsonschema.validate(json.loads(message.content), ANSWER)
    assert answer.usage.completion_tokens_details.reasoning_tokens == 1 + 3 + 1  # <think>, 3, </think>
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == message.model_extra[
        "reasoning_content"]
    assert "".join(d.content or "" for d in deltas) == message.content
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not d.model_extra.get("reasoning_content") for d in deltas[first_content + 1:])  # thinking first
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 5

    response = client.responses.create(model=NAME, input="What is 2 + 2?", max_output_tokens=40, temperature=0,
                                       extra_body=_thinking(tokenizer, 3), text={"format": {
                                           "type": "json_schema", "name": "answer", "schema": ANSWER}})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "<think>" * 3
    jsonschema.validate(json.loads(response.output_text), ANSWER)
    assert response.usage.output_tokens_details.reasoning_tokens == 5


def test_a_forced_tool_call_follows_the_thinking(qwen3):
    client, tokenizer = qwen3
    answer = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=60, temperature=0,
                                            tools=[ADD], tool_choice="required", parallel_tool_calls=False,
                                            extra_body=_thinking(tokenizer, 2))
    message = answer.choices[0].message
    assert message.model_extra["reasoning_content"] == "<think>" * 2
    assert answer.choices[0].finish_reason == "tool_calls" and message.tool_calls[0].function.name == "add"
    jsonschema.validate(json.loads(message.tool_calls[0].function.arguments), ADD["function"]["parameters"])
