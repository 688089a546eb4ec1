"""Answers to deterministic requests, kept so that the same request is not computed twice.

A request is deterministic when every sequence it asks for is greedy (temperature 0)
or seeded: the engine then gives the same tokens whatever else it runs. Its key is
the model that answers it (an experiment's arm resolved first; an adapter with its
folder), the route and every field of the body that can change the answer (not
`user`, `metadata` or `store`). Streamed requests are not cached. The answer is kept
as the bytes sent, so a hit is byte-identical to the answer computed (its id and
`created` included), so each tenant has its own answers (the tenant is part of the key).
Bounded by entries, bytes and age (`quality.result_cache`) for each tenant; the answers
are kept by the router actor (cluster/router.py: BoundedStore), so the realtime and the
batch lane answer from one cache.
"""

from __future__ import annotations

import hashlib
import json

from engine.sampling_params import GREEDY_BELOW_TEMPERATURE

# Body fields that do not change the answer.
_IGNORED = {"model", "user", "metadata", "store", "stream", "stream_options", "service_tier"}


def cacheable(plan) -> bool:
    """Whether every sequence of a (not streamed) request is greedy or seeded."""
    if getattr(plan.body, "stream", False):
        return False
    return all(c.params.temperature < GREEDY_BELOW_TEMPERATURE or c.params.seed is not None for c in plan.choices)


def cache_key(url: str, target, body, tenant: str | None = None) -> str:
    """The answer's key: the tenant asking (one tenant never gets another's answer, its id,
    or a hit that tells what the other asked), route, the model that answers (adapter folder
    included) and the body's fields that can change it (fields the API does not know are left
    out: they change nothing)."""
    fields = body.model_dump(mode="json", exclude_none=True, exclude=_IGNORED)
    extra = getattr(body, "model_extra", None) or {}
    payload = {"tenant": tenant, "url": url, "model": target.model, "lora": target.lora,
               "body": {k: v for k, v in fields.items() if k not in extra}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
