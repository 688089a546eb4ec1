"""Tenants on the session's application (tests/deployments/conftest.py): the legacy api_key
(the 'default' inference tenant), an admin tenant and an inference tenant with a priority
limit. Every route of the route table is called without a key, with each role's key: a
route added without a declared role fails the table itself (routes.Route)."""

from __future__ import annotations

import json

import re

import httpx
import pytest

from deployments.api.routes import ROUTES, Route
from tests.deployments.conftest import ADMIN_KEY, API_KEY, MODEL, TEAM_KEY

KEYS = {"default": API_KEY, "team": TEAM_KEY, "ops": ADMIN_KEY}


def _call(base: str, route: Route, key: str | None) -> httpx.Response:
    path = re.sub(r"\{[^}]+\}", "no-such-id", route.path)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(route.method.upper(), base + path, headers=headers, timeout=60,
                         json={} if route.method == "post" else None)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method.upper()} {r.path}")
def test_every_route_answers_each_role_as_declared(serve_app, route):
    """Public routes answer anyone; the others 401 without a key; admin routes 403 for the
    inference tenants (the OpenAI-style body names the role) and let the admin through; the
    inference routes let every tenant through (their answer to an empty body is theirs)."""
    anonymous = _call(serve_app, route, None)
    if route.role == "public":
        assert anonymous.status_code == 200, anonymous.text
        return
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    for tenant, key in KEYS.items():
        answer = _call(serve_app, route, key)
        if route.role == "admin" and tenant != "ops":
            assert answer.status_code == 403, (tenant, answer.text)
            error = answer.json()["error"]
            assert error["type"] == "permission_error" and error["code"] == "insufficient_role"
            assert f"tenant {tenant!r}" in error["message"]
        else:
            assert answer.status_code not in (401, 403), (tenant, answer.status_code, answer.text)


def test_a_tenant_may_not_ask_for_a_more_urgent_priority(serve_app):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    team = {"Authorization": f"Bearer {TEAM_KEY}"}
    refused = httpx.post(f"{serve_app}/v1/completions", headers=team, json={**body, "priority": -1}, timeout=60)
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "priority"
    assert "max_priority is 0" in refused.json()["error"]["message"]
    assert httpx.post(f"{serve_app}/v1/completions", headers=team, json={**body, "priority": 0},
                      timeout=60).status_code == 200
    legacy = {"Authorization": f"Bearer {API_KEY}"}  # no limit of its own
    assert httpx.post(f"{serve_app}/v1/completions", headers=legacy, json={**body, "priority": -1},
                      timeout=60).status_code == 200


def test_adapters_load_only_from_the_configured_folders(serve_app, tmp_path_factory):
    """Outside lora_adapter_dirs the refusal is the same whether the path exists or not."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    answers = [httpx.post(f"{serve_app}/v1/load_lora_adapter", headers=admin, timeout=60,
                          json={"lora_name": "x", "lora_path": path}) for path in ("/etc", "/no/such/folder")]
    assert [a.status_code for a in answers] == [403, 403]
    assert answers[0].json() == answers[1].json() and answers[0].json()["error"]["code"] == "path_not_allowed"
    inside = tmp_path_factory.getbasetemp() / "no-adapter-here"
    answer = httpx.post(f"{serve_app}/v1/load_lora_adapter", headers=admin, timeout=60,
                        json={"lora_name": "x", "lora_path": str(inside)})
    assert answer.status_code == 400  # inside: read, and refused for what it is


def test_a_route_must_declare_its_role():
    with pytest.raises(ValueError, match="declare its role"):
        Route("get", "/v1/new", ROUTES[0].handler, "", "text/plain")


def _as(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_files_batches_responses_and_feedback_belong_to_their_tenant(serve_app):
    """What a tenant makes, another tenant cannot see, list, use or delete (404, as for what
    does not exist); an admin sees all of it; the maker can do everything with it."""
    import json
    import time

    team, other, admin = _as(TEAM_KEY), _as(API_KEY), _as(ADMIN_KEY)
    line = {"custom_id": "t1", "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "Hi", "max_tokens": 1}}
    upload = httpx.post(f"{serve_app}/v1/files", headers=team, data={"purpose": "batch"}, timeout=60,
                        files={"file": ("t.jsonl", (json.dumps(line) + "\n").encode())}).json()
    file_url = f"{serve_app}/v1/files/{upload['id']}"
    for path in ("", "/content"):
        assert httpx.get(file_url + path, headers=other).status_code == 404
        assert httpx.get(file_url + path, headers=admin).status_code == 200
        assert httpx.get(file_url + path, headers=team).status_code == 200
    listed = {who: [f["id"] for f in httpx.get(f"{serve_app}/v1/files", headers=h).json()["data"]]
              for who, h in (("other", other), ("admin", admin), ("team", team))}
    assert upload["id"] not in listed["other"] and upload["id"] in listed["admin"] and upload["id"] in listed["team"]
    create = {"input_file_id": upload["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    assert httpx.post(f"{serve_app}/v1/batches", headers=other, json=create, timeout=60).status_code == 404
    batch = httpx.post(f"{serve_app}/v1/batches", headers=team, json=create, timeout=60).json()
    batch_url = f"{serve_app}/v1/batches/{batch['id']}"
    assert httpx.get(batch_url, headers=other).status_code == 404
    assert httpx.post(f"{batch_url}/cancel", headers=other, timeout=60).status_code == 404
    assert batch["id"] not in [b["id"] for b in httpx.get(f"{serve_app}/v1/batches?limit=100",
                                                          headers=other).json()["data"]]
    assert httpx.get(batch_url, headers=admin).json()["id"] == batch["id"]
    for _ in range(300):
        done = httpx.get(batch_url, headers=team).json()
        if done["status"] in ("completed", "failed", "expired", "cancelled"):
            break
        time.sleep(0.1)
    assert done["status"] == "completed" and done["output_file_id"]
    output = f"{serve_app}/v1/files/{done['output_file_id']}/content"  # the batch's output is its tenant's too
    assert httpx.get(output, headers=other).status_code == 404 and httpx.get(output, headers=team).status_code == 200
    assert httpx.delete(file_url, headers=other).status_code == 404
    assert httpx.delete(file_url, headers=team).status_code == 200

    made = httpx.post(f"{serve_app}/v1/responses", headers=team, timeout=60,
                      json={"model": MODEL, "input": "Hi", "max_output_tokens": 2}).json()
    stored = f"{serve_app}/v1/responses/{made['id']}"
    for method, path in (("GET", ""), ("GET", "/input_items"), ("POST", "/cancel"), ("DELETE", "")):
        assert httpx.request(method, stored + path, headers=other, timeout=60).status_code == 404, (method, path)
    follow = httpx.post(f"{serve_app}/v1/responses", headers=other, timeout=60, json={
        "model": MODEL, "input": "More", "max_output_tokens": 2, "previous_response_id": made["id"]})
    assert follow.status_code == 404
    assert httpx.get(stored, headers=admin).status_code == 200 and httpx.get(stored, headers=team).status_code == 200

    answer = httpx.post(f"{serve_app}/v1/chat/completions", headers=team, timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).json()
    rating = {"response_id": answer["id"], "score": 1}
    assert httpx.post(f"{serve_app}/v1/feedback", headers=other, json=rating, timeout=60).status_code == 404
    assert httpx.post(f"{serve_app}/v1/feedback", headers=team, json=rating, timeout=60).status_code == 200


def test_a_tenants_storage_bound_refuses_its_upload_not_anothers(serve_app):
    from tests.deployments.conftest import TEAM_STORAGE

    team, other = _as(TEAM_KEY), _as(API_KEY)
    line = b'{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {}}\n'
    big = line * (TEAM_STORAGE // len(line) // 2 + 1)  # just over half the bound
    first = httpx.post(f"{serve_app}/v1/files", headers=team, data={"purpose": "batch"}, timeout=60,
                       files={"file": ("a.jsonl", big)})
    assert first.status_code == 200, first.text
    second = httpx.post(f"{serve_app}/v1/files", headers=team, data={"purpose": "batch"}, timeout=60,
                        files={"file": ("b.jsonl", big)})
    assert second.status_code == 413 and second.json()["error"]["code"] == "tenant_storage_full", second.text
    assert "'team'" in second.json()["error"]["message"]
    theirs = httpx.post(f"{serve_app}/v1/files", headers=other, data={"purpose": "batch"}, timeout=60,
                        files={"file": ("c.jsonl", big)})
    assert theirs.status_code == 200  # another tenant's upload still succeeds
    for key, upload in ((TEAM_KEY, first), (API_KEY, theirs)):
        assert httpx.delete(f"{serve_app}/v1/files/{upload.json()['id']}", headers=_as(key)).status_code == 200


def test_files_expire_on_schedule(serve_app, client):
    """expires_after (OpenAI's, as its SDK sends it): the file says when, and is gone then."""
    import time

    kept = client.files.create(file=("k.jsonl", b'{"a": 1}\n'), purpose="batch")
    made = client.files.create(file=("e.jsonl", b'{"a": 1}\n'), purpose="batch",
                               expires_after={"anchor": "created_at", "seconds": 1})
    assert made.expires_at == made.created_at + 1 and kept.expires_at is None
    deadline = time.time() + 10
    while time.time() < deadline and made.id in [f.id for f in client.files.list()]:
        time.sleep(0.2)
    assert made.id not in [f.id for f in client.files.list()]
    assert client.files.retrieve(kept.id).id == kept.id
    client.files.delete(kept.id)
    bad = httpx.post(f"{serve_app}/v1/files", headers=_as(API_KEY), timeout=60,
                     data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "0"},
                     files={"file": ("x.jsonl", b'{"a": 1}\n')})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "expires_after"


def test_feedback_finds_another_replicas_answers_without_scanning(tmp_path):
    """Two ingress replicas' stores on one folder: an answer one recorded is found by the other
    (it reads only what was appended since its last look), and an unknown id is answered from
    memory after that look."""
    from deployments.quality.feedback import FeedbackStore

    first, second = (FeedbackStore(str(tmp_path), True, 3600, 100) for _ in range(2))
    first.record_response("chatcmpl-1", MODEL, None, None, "hi", "hello", "team")()
    assert second.response("chatcmpl-1")["tenant"] == "team"
    read_to = second._read_to
    assert second.response("chatcmpl-unknown") is None and second._read_to == read_to
    first.record_response("chatcmpl-2", MODEL, None, None, "hi", "hey", "team")()
    assert second.response("chatcmpl-2")["output"] == "hey" and second._read_to > read_to
    with pytest.raises(LookupError):
        second.add("chatcmpl-2", 1.0, None, None, caller=("other", False))
    assert second.add("chatcmpl-2", 1.0, None, None, caller=("team", False))["tenant"] == "team"


def test_the_feedback_logs_keep_to_their_bounds_and_the_retention(tmp_path):
    """Past max_log_bytes the responses log drops its oldest answers down to half the bound
    (they can no longer be rated); another replica reads the rewritten file afresh; an answer
    takes at most max_ratings_per_response ratings, whichever replica they go to; answers past
    the retention leave the file on the next append after its period."""
    import time

    from deployments.quality.feedback import FeedbackStore

    first, second = (FeedbackStore(str(tmp_path / "bound"), True, 3600, 10, max_log_bytes=8192) for _ in range(2))
    for i in range(60):
        first.record_response(f"chatcmpl-{i}", MODEL, None, None, "hi", "x" * 200, "team")()
        assert first.responses_file.stat().st_size <= 8192
    assert second.response("chatcmpl-59")["output"] == "x" * 200  # the newest, after the rewrites
    assert second.response("chatcmpl-0") is None  # dropped from the file (and never in memory here)
    kept = [json.loads(line)["id"] for line in first.responses_file.read_text().splitlines()]
    assert kept == [f"chatcmpl-{i}" for i in range(60 - len(kept), 60)] and 10 <= len(kept) < 40

    # Ratings: at most max_ratings_per_response per answer, counted across replicas.
    from deployments.quality.feedback import RatingLimitError

    rated, other = (FeedbackStore(str(tmp_path / "ratings"), False, 3600, 10, max_ratings_per_response=2)
                    for _ in range(2))
    rated.record_response("chatcmpl-r", MODEL, None, None, tenant="team")()
    rated.add("chatcmpl-r", 1.0, None, None, caller=("team", False))
    other.add("chatcmpl-r", 0.0, None, None, caller=("team", False))
    for store in (rated, other):
        with pytest.raises(RatingLimitError):
            store.add("chatcmpl-r", 1.0, None, None, caller=("team", False))
    assert len(rated.feedback_file.read_text().splitlines()) == 2

    old = FeedbackStore(str(tmp_path / "retention"), True, 0.5, 100)
    old.record_response("chatcmpl-old", MODEL, None, None, "hi", "secret", "team")()
    time.sleep(0.6)
    old.record_response("chatcmpl-new", MODEL, None, None, "hi", "fresh", "team")()
    assert "secret" not in old.responses_file.read_text() and "fresh" in old.responses_file.read_text()


def test_a_tenant_flooding_the_feedback_log_drops_only_its_own_answers(tmp_path):
    """The log's bound and the memory's are taken from the tenants that hold the most: a tenant
    that answers 60 long requests loses its oldest, another's two answers stay ratable from a
    replica that reads the rewritten file, and from the one that keeps them in memory."""
    from deployments.quality.feedback import FeedbackStore, fair_level

    assert fair_level({"a": 900, "b": 100}, 500) == 400 and fair_level({"a": 100, "b": 100}, 500) == 100
    assert fair_level({"a": 300, "b": 300, "c": 50}, 350) == 150

    first, second = (FeedbackStore(str(tmp_path), True, 3600, 10, max_log_bytes=8192) for _ in range(2))
    first.record_response("light-1", MODEL, None, None, "hi", "x" * 200, "light")()
    first.record_response("light-2", MODEL, None, None, "hi", "x" * 200, "light")()
    for i in range(60):
        first.record_response(f"flood-{i}", MODEL, None, None, "hi", "x" * 200, "flood")()
        assert first.responses_file.stat().st_size <= 8192
    kept = [json.loads(line)["id"] for line in first.responses_file.read_text().splitlines()]
    assert kept[:2] == ["light-1", "light-2"] and "flood-0" not in kept and "flood-59" in kept
    for store in (first, second):  # first: from memory (10 answers, the flooder's 8 newest)
        assert store.response("light-1")["tenant"] == "light" and store.response("flood-59") is not None
    assert first.response("flood-50") is None and first.response("flood-52") is not None


def test_the_ratings_log_keeps_to_its_bound_and_retention(tmp_path):
    """The ratings log has the answers' bound and retention: a tenant posting many long
    comments loses its oldest ratings, another's stay; the score totals are counted afresh
    from the rewritten file (by this replica and another); ratings past the retention go."""
    import time

    from deployments.quality.feedback import FeedbackStore

    first, second = (FeedbackStore(str(tmp_path / "bound"), False, 3600, 1000, max_log_bytes=8192,
                                   max_ratings_per_response=1) for _ in range(2))
    first.record_response("light-answer", MODEL, None, None, tenant="light")()
    first.add("light-answer", 1.0, None, "fine", caller=("light", False))
    for i in range(40):
        first.record_response(f"flood-{i}", MODEL, None, None, tenant="flood")()
        first.add(f"flood-{i}", 0.0, None, "x" * 300, caller=("flood", False))
        assert first.feedback_file.stat().st_size <= 8192
    rated = [json.loads(line)["response_id"] for line in first.feedback_file.read_text().splitlines()]
    assert rated[0] == "light-answer" and "flood-0" not in rated and rated[-1] == "flood-39"
    for store in (first, second):
        assert store.summary()[(MODEL, "", "")] == (1.0, len(rated))

    old = FeedbackStore(str(tmp_path / "retention"), False, 0.5, 100)
    old.record_response("a1", MODEL, None, None, tenant="team")()
    old.add("a1", 1.0, None, "secret", caller=("team", False))
    time.sleep(0.6)
    old.record_response("a2", MODEL, None, None, tenant="team")()
    old.add("a2", 0.0, None, "fresh", caller=("team", False))
    assert "secret" not in old.feedback_file.read_text() and old.summary()[(MODEL, "", "")] == (0.0, 1)


def test_a_batchs_outputs_expire_as_it_asked(client):
    import json
    import time

    line = {"custom_id": "o1", "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "Hi", "max_tokens": 1}}
    upload = client.files.create(file=("o.jsonl", (json.dumps(line) + "\n").encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h",
                                  output_expires_after={"anchor": "created_at", "seconds": 2})
    deadline = time.time() + 60
    while time.time() < deadline and client.batches.retrieve(batch.id).status != "completed":
        time.sleep(0.2)
    output = client.batches.retrieve(batch.id).output_file_id
    meta = client.files.retrieve(output)
    assert meta.expires_at is not None and meta.expires_at - meta.created_at == 2
    while time.time() < deadline and output in [f.id for f in client.files.list()]:
        time.sleep(0.2)
    assert output not in [f.id for f in client.files.list()]
    client.files.delete(upload.id)


def test_requests_are_counted_per_tenant(serve_app):
    """semline_tenant_* on /metrics, labelled with the tenant (names from the config) and lane."""
    import time

    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    for key in (TEAM_KEY, ADMIN_KEY):
        assert httpx.post(f"{serve_app}/v1/completions", headers=_as(key), json=body, timeout=60).status_code == 200
    deadline, seen = time.time() + 30, set()
    while time.time() < deadline and not {"team", "ops"} <= seen:
        text = httpx.get(f"{serve_app}/metrics", timeout=30).text
        seen = set(re.findall(r'semline_tenant_requests_total\{[^}]*tenant="([^"]+)"', text))
        time.sleep(1)
    assert {"team", "ops"} <= seen, seen
    assert re.search(r'semline_tenant_tokens_total\{[^}]*kind="generation"[^}]*\} [1-9]', text) or re.search(
        r'semline_tenant_tokens_total\{[^}]*\} [1-9]', text)
