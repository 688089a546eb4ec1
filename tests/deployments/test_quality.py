"""The quality loop on the session's application: LoRA adapters over HTTP (PEFT's tokens, mixed
with the base, loaded and unloaded at run time), an A/B experiment with sticky arms, output
filters (streamed and not), the result cache in both lanes, and feedback that survives a
restart of the ingress. The filter chain and the arm assignment are also checked alone."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest
import torch

from deployments.config import SemlineConfig
from deployments.quality.catalog import ModelCatalog
from deployments.quality.filters import FilterChain
from tests.deployments.conftest import ADAPTER, ADMIN_KEY, API_KEY, BLOCKED_PHRASE, EXPERIMENT, FILTERED, MODEL, \
    TEAM_KEY
from tests.deployments.promql import by_label, wait_for

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}  # the routes that change what is served
PROMPT = "The capital of France is"


def _post(url: str, body: dict, headers: dict = HEADERS, **kwargs) -> httpx.Response:
    return httpx.post(url, json=body, headers=headers, timeout=120, **kwargs)


def _complete(serve_app: str, model: str, **extra) -> httpx.Response:
    return _post(f"{serve_app}/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 12,
                                                  "temperature": 0, **extra})


@pytest.fixture(scope="module")
def peft_text(adapter_dir):
    """HF's greedy text for PROMPT: the base, and the base with a PEFT adapter folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.config import EngineConfig
    from engine.loader import hf_folder

    model_dir = hf_folder(None, EngineConfig().resolve_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])

    def greedy(model) -> str:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def text(folder=None) -> str:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        return greedy(model if folder is None else PeftModel.from_pretrained(model, folder).eval())

    return text


# --- LoRA adapters ---------------------------------------------------------------------


def test_models_lists_adapters_with_their_base_and_experiments(serve_app):
    cards = {c["id"]: c for c in httpx.get(f"{serve_app}/v1/models", headers=HEADERS).json()["data"]}
    assert cards[MODEL]["parent"] is None and cards[ADAPTER]["parent"] == MODEL
    arms = {a["name"]: (a["model"], a["weight"]) for a in cards[EXPERIMENT]["experiment"]["arms"]}
    assert arms == {"control": (MODEL, 70), "treatment": (ADAPTER, 30)}


def test_adapter_and_base_in_one_batch_match_peft(serve_app, peft_text, adapter_dir):
    want = {MODEL: peft_text(), ADAPTER: peft_text(adapter_dir)}
    assert want[MODEL] != want[ADAPTER]
    models = [MODEL, ADAPTER] * 3
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(lambda m: _complete(serve_app, m, user=f"u-{time.time()}"), models))
    for model, answer in zip(models, answers):
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == want[model], model


def test_load_and_unload_an_adapter_at_run_time(serve_app, peft_text, tmp_path):
    from engine.config import EngineConfig
    from engine.loader import hf_folder
    from tests.engine.test_lora import build_adapter

    folder = tmp_path / "second"
    build_adapter(hf_folder(None, EngineConfig().resolve_cache_dir()), folder, 11,
                  ["q_proj", "k_proj", "o_proj", "down_proj"], 4)
    bad = _post(f"{serve_app}/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": str(tmp_path)}, ADMIN)
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    clash = _post(f"{serve_app}/v1/load_lora_adapter", {"lora_name": MODEL, "lora_path": str(folder)}, ADMIN)
    assert clash.status_code == 400
    assert _complete(serve_app, "second").status_code == 404
    loaded = _post(f"{serve_app}/v1/load_lora_adapter", {"lora_name": "second", "lora_path": str(folder)}, ADMIN)
    assert loaded.status_code == 200, loaded.text
    cards = {c["id"]: c for c in httpx.get(f"{serve_app}/v1/models", headers=HEADERS).json()["data"]}
    assert cards["second"]["parent"] == MODEL
    answer = _complete(serve_app, "second")
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == peft_text(folder)
    assert _post(f"{serve_app}/v1/unload_lora_adapter", {"lora_name": "second"}, ADMIN).status_code == 200
    gone = _complete(serve_app, "second")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert _post(f"{serve_app}/v1/unload_lora_adapter", {"lora_name": "second"}, ADMIN).status_code == 404
    assert _post(f"{serve_app}/v1/unload_lora_adapter", {"lora_name": ADAPTER}, ADMIN).status_code == 404  # configured


def test_admin_routes_need_the_api_key(serve_app):
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", f"/v1/experiments/{EXPERIMENT}", "/v1/feedback"):
        assert httpx.post(f"{serve_app}{path}", json={}).status_code == 401, path


# --- experiments ---------------------------------------------------------------------------


def _arms(serve_app: str, users: list[str]) -> dict[str, str]:
    def one(user: str) -> str:
        answer = _post(f"{serve_app}/v1/completions", {"model": EXPERIMENT, "prompt": "Hi", "max_tokens": 1,
                                                        "user": user})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == EXPERIMENT
        return answer.headers["x-semline-arm"]

    # Fewer clients than the session router's 4 seats + 4 queued: a release still on its way to
    # the router must not make a request look like overload (429).
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        return dict(zip(users, pool.map(one, users)))


def test_experiment_splits_users_70_30_sticky_and_reweights_without_restart(serve_app, prometheus, app_config):
    """Each user gets the arm the experiment's weights give them (the split itself is checked
    on 5,000 users below, without HTTP), keeps it, and a reweight moves them at once and back."""
    users = [f"user-{i}" for i in range(48)]
    catalog = ModelCatalog(app_config)
    arms = _arms(serve_app, users)
    assert arms == {u: catalog.resolve(EXPERIMENT, u).arm for u in users}
    assert set(arms.values()) == {"control", "treatment"}
    again = _arms(serve_app, users[:12])
    assert again == {u: arms[u] for u in users[:12]}  # each user stays on their arm
    url = f"{serve_app}/v1/experiments/{EXPERIMENT}"
    try:
        changed = _post(url, {"weights": {"control": 0, "treatment": 1}}, ADMIN)
        assert changed.status_code == 200, changed.text
        assert set(_arms(serve_app, users[:12]).values()) == {"treatment"}
        assert _post(url, {"weights": {"control": 1}}, ADMIN).status_code == 400  # every arm, by name
    finally:
        assert _post(url, {"weights": {"control": 70, "treatment": 30}}, ADMIN).status_code == 200
    back = _arms(serve_app, users[:12])
    assert back == {u: arms[u] for u in users[:12]}  # back where they were
    # Prometheus counts each arm's answers (at least this test's: the counters are the session's).
    sent = {arm: sum(a == arm for answers in (arms, again, back) for a in answers.values()) for arm in arms.values()}
    sent["treatment"] += 12
    promql = f'sum by (arm) (ray_semline_arm_requests_total{{experiment="{EXPERIMENT}"}})'
    wait_for(prometheus, lambda: by_label(prometheus, promql, "arm"),
             lambda counts: all(counts.get(arm, 0) >= n for arm, n in sent.items()), f"{promql} >= {sent}")


def test_arm_assignment_alone_is_sticky_weighted_and_moves_few_users():
    config = SemlineConfig(experiments=[{"name": "e", "arms": [{"name": "a", "model": MODEL, "weight": 70},
                                                               {"name": "b", "model": MODEL, "weight": 30}]}])
    catalog = ModelCatalog(config)
    users = [f"u{i}" for i in range(5000)]
    before = {u: catalog.resolve("e", u).arm for u in users}
    assert abs(sum(a == "a" for a in before.values()) / len(users) - 0.7) < 0.03
    catalog.update({"weights": {"e": {"a": 60, "b": 40}}})
    after = {u: catalog.resolve("e", u).arm for u in users}
    moved = sum(before[u] != after[u] for u in users) / len(users)
    assert 0.07 < moved < 0.13  # only the users whose place the change crossed (10 %)
    assert all(after[u] == "b" for u in users if before[u] == "b")


# --- output filters --------------------------------------------------------------------------


def _forced(serve_app: str, text: str, stream: bool = False):
    """An answer of FILTERED whose raw output is exactly `text` (forced by a regex grammar)."""
    body = {"model": FILTERED, "prompt": "Say it:", "max_tokens": 64, "temperature": 0,
            "structured_outputs": {"regex": "".join("\\" + c if c in ".()+?*[]{}|^$\\" else c for c in text)}}
    if not stream:
        answer = _post(f"{serve_app}/v1/completions", body)
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        return choice["text"], choice["finish_reason"]
    text, reason = "", None
    with httpx.stream("POST", f"{serve_app}/v1/completions", json={**body, "stream": True}, headers=HEADERS,
                      timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                reason = choice["finish_reason"] or reason
    return text, reason


@pytest.mark.parametrize("stream", [False, True])
def test_filters_mask_and_refuse_streamed_or_not(serve_app, stream):
    masked = _forced(serve_app, "Mail bob@example.com or call 555-123-4567 now.", stream)
    assert masked == ("Mail [email] or call [phone] now.", "stop")
    refused = _forced(serve_app, f"I like the {BLOCKED_PHRASE} a lot.", stream)
    assert refused == ("I like the ", "content_filter")
    # The same text under a name without filters passes untouched.
    plain = _post(f"{serve_app}/v1/completions", {"model": MODEL, "prompt": "Say it:", "max_tokens": 64,
                                                   "guided_regex": "Mail bob@example\\.com now\\."})
    assert plain.json()["choices"][0]["text"] == "Mail bob@example.com now."


def test_filter_chain_alone_streams_what_it_would_send_whole():
    config = SemlineConfig(quality={"filters": [
        {"type": "pii"}, {"type": "blocklist", "phrases": ["bad  word"], "patterns": ["x{3,}"], "replacement": "#"},
        {"type": "max_length", "max_chars": 90}]})
    chain = FilterChain(config.quality.filters)
    text = ("card 4111 1111 1111 1111, mail a.b@c.org, xxxxx and a bad\nword; the phone (555) 123-4567 "
            "and more text after it, to pass the limit")
    whole = chain.apply(text)
    for size in (1, 3, 7):
        stream = chain.stream()
        sent = "".join(stream.feed(text[i:i + size]) for i in range(0, len(text), size)) + stream.feed("", True)
        assert sent == whole.text and stream.stopped == whole.stopped, size
    assert whole.text.startswith("card [card], mail [email], # and a #; the phone [phone]")
    assert whole.stopped and len(whole.text) == 90
    # Held back only while a match may be in progress: plain words go at once.
    stream = chain.stream()
    assert stream.feed("hello there ") == "hello there "


def test_classifier_plugin_withholds_a_flagged_output():
    config = SemlineConfig(quality={"filters": [{"type": "classifier", "callable": "operator:truth"}]})
    result = FilterChain(config.quality.filters).apply("anything")
    assert result.text == "" and result.stopped and result.hits == {"classifier": 1}
    with pytest.raises(ValueError, match="cannot load the classifier"):
        FilterChain(SemlineConfig(quality={"filters": [{"type": "classifier", "callable": "no.such:thing"}]})
                    .quality.filters)


# --- result cache ---------------------------------------------------------------------------


def test_result_cache_answers_repeats_byte_identical_in_both_lanes(serve_app, client):
    body = {"model": ADAPTER, "prompt": "List three colours:", "max_tokens": 8, "temperature": 0}
    first = _post(f"{serve_app}/v1/completions", body)
    second = _post(f"{serve_app}/v1/completions", body)
    assert first.headers["x-semline-cache"] == "miss" and second.headers["x-semline-cache"] == "hit"
    assert second.content == first.content
    # Another tenant asking the same is answered afresh: never another tenant's answer (or its id).
    other = _post(f"{serve_app}/v1/completions", body, {"Authorization": f"Bearer {TEAM_KEY}"})
    assert other.headers["x-semline-cache"] == "miss" and other.json()["id"] != first.json()["id"]
    sampled = {**body, "temperature": 1.0}
    for _ in range(2):
        answer = _post(f"{serve_app}/v1/completions", sampled)
        assert answer.status_code == 200 and "x-semline-cache" not in answer.headers
    # The batch lane answers the same request from the same cache.
    line = json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/completions", "body": body})
    upload = client.files.create(file=("cache.jsonl", line.encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.time() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.time() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    [result] = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert result["response"]["body"] == first.json()


# --- feedback --------------------------------------------------------------------------------


def test_feedback_is_kept_exported_and_survives_an_ingress_restart(serve_app, prometheus):
    import ray

    answers = {}
    for user in ("fb-1", "fb-2", "fb-3", "fb-4", "fb-5", "fb-6"):
        answer = _post(f"{serve_app}/v1/chat/completions", {
            "model": EXPERIMENT, "user": user, "max_tokens": 4,
            "messages": [{"role": "user", "content": f"Say hello to {user}"}]})
        answers[answer.json()["id"]] = (answer.headers["x-semline-arm"], answer.json())
    ids = list(answers)
    up = _post(f"{serve_app}/v1/feedback", {"response_id": ids[0], "score": "up", "label": "helpful"})
    assert up.status_code == 200, up.text
    assert up.json()["arm"] == answers[ids[0]][0] and up.json()["score"] == 1.0
    assert _post(f"{serve_app}/v1/feedback", {"response_id": "chatcmpl-nope", "score": 1}).status_code == 404
    assert _post(f"{serve_app}/v1/feedback", {"response_id": ids[0], "score": "sideways"}).status_code == 400
    # Restart the ingress replica: ratings and the responses they may rate come back from disk.
    [ingress] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if "OpenAIIngress" in a["name"] and "SERVE_REPLICA" in a["name"]]
    ray.kill(ray.get_actor(ingress["name"], namespace=ingress["namespace"]), no_restart=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{serve_app}/v1/models", headers=HEADERS, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    down = _post(f"{serve_app}/v1/feedback", {"response_id": ids[1], "score": "down", "comment": "too short"})
    assert down.status_code == 200, down.text
    since = up.json()["created"]
    exported = [json.loads(line) for line in httpx.get(f"{serve_app}/v1/feedback", params={"since": since},
                                                        headers=ADMIN).text.splitlines()]
    mine = {r["response_id"]: r for r in exported if r["response_id"] in ids}
    assert set(mine) == {ids[0], ids[1]}
    rated = answers[ids[1]][1]["choices"][0]["message"]["content"]
    assert mine[ids[1]]["output"] == rated and "Say hello to fb-2" in json.dumps(mine[ids[1]]["prompt"])
    want = {}
    for response_id in (ids[0], ids[1]):
        want[answers[response_id][0]] = want.get(answers[response_id][0], 0) + 1
    promql = f'max by (arm) (ray_semline_feedback_count{{experiment="{EXPERIMENT}"}})'
    wait_for(prometheus, lambda: by_label(prometheus, promql, "arm"),
             lambda counts: all(counts.get(arm, 0) >= n for arm, n in want.items()), f"{promql} >= {want}")
