"""The models a deployment serves under their public names, and A/B experiments between them.

Names: the base model (`model_name`), each LoRA adapter (listed in `engine.lora_modules`,
or loaded at run time through POST /v1/load_lora_adapter), and each experiment in
`experiments`, whose traffic is split between arms (the base or adapters) by weight.

Arms are sticky: a user's arm is a hash of the experiment's name and the request's `user`
field (else its API key) placed on the arms' cumulative weights, so the same user lands
on the same arm while the weights stay, and a weight change moves only the users whose
place it crosses. Requests with neither field are assigned at random.

Loaded adapters and changed weights live in the router actor (one per application),
so every ingress replica sees them: each pulls the router's copy every few seconds
and after any change it makes itself.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

class UnknownModelError(LookupError):
    """No model, adapter or experiment of that name is served."""


@dataclass(frozen=True)
class Target:
    """What answers one request: the model actually run (the base's name or an adapter's),
    the adapter's (name, folder) for the LLM server, and the experiment arm if any."""

    model: str
    lora: tuple[str, str] | None = None
    experiment: str | None = None
    arm: str | None = None


class ModelCatalog:
    def __init__(self, config) -> None:
        self.base = config.model_name
        self.aliases = frozenset(config.served_model_names)  # other names of the base model
        self.lora_enabled = bool(config.engine.get("enable_lora") or config.engine.get("lora_modules"))
        self.static: dict[str, str] = dict(config.engine.get("lora_modules") or {})
        self.dynamic: dict[str, str] = {}
        self.experiments = {e.name: [(a.name, a.model) for a in e.arms] for e in config.experiments}
        self.weights = {e.name: {a.name: a.weight for a in e.arms} for e in config.experiments}

    # --- state shared through the router -------------------------------------------

    def state(self) -> dict:
        return {"adapters": dict(self.dynamic), "weights": {k: dict(v) for k, v in self.weights.items()}}

    def update(self, state: dict | None) -> None:
        """Take the router's copy (None: it has none yet, e.g. it restarted)."""
        if not state:
            return
        self.dynamic = dict(state.get("adapters", {}))
        for name, weights in state.get("weights", {}).items():
            if name in self.weights and set(weights) == set(self.weights[name]):
                self.weights[name] = dict(weights)

    # --- names -----------------------------------------------------------------

    def adapter_path(self, name: str) -> str | None:
        return self.static.get(name) or self.dynamic.get(name)

    def knows(self, name: str) -> bool:
        return (name == self.base or name in self.aliases or self.adapter_path(name) is not None
                or name in self.experiments)

    def cards(self) -> list[dict]:
        """/v1/models: the base (and its other served names), its adapters (parent: the base)
        and the experiments."""
        cards = [{"id": name, "object": "model", "created": 0, "owned_by": "semline", "root": self.base,
                  "parent": None} for name in (self.base, *sorted(self.aliases))]
        for name, path in {**self.static, **self.dynamic}.items():
            cards.append({"id": name, "object": "model", "created": 0, "owned_by": "semline", "root": path,
                          "parent": self.base})
        for name, arms in self.experiments.items():
            cards.append({"id": name, "object": "model", "created": 0, "owned_by": "semline", "root": self.base,
                          "parent": None, "experiment": {
                              "arms": [{"name": arm, "model": model, "weight": self.weights[name][arm]}
                                       for arm, model in arms]}})
        return cards

    def resolve(self, name: str, sticky: str | None) -> Target:
        """The target of a request for `name`; `sticky`: its user (or API key id), if any."""
        if name == self.base or name in self.aliases:
            return Target(self.base)
        path = self.adapter_path(name)
        if path is not None:
            return Target(name, (name, path))
        if name not in self.experiments:
            raise UnknownModelError(f"model {name!r} does not exist")
        arm, model = self.assign(name, sticky)
        if model != self.base and self.adapter_path(model) is None:
            raise UnknownModelError(f"experiment {name!r}: arm {arm!r} serves {model!r}, which is not loaded")
        inner = self.resolve(model, None)
        return Target(inner.model, inner.lora, name, arm)

    def assign(self, experiment: str, sticky: str | None) -> tuple[str, str]:
        """(arm, its model) for a user of `experiment`."""
        arms, weights = self.experiments[experiment], self.weights[experiment]
        total = sum(weights.values())
        if total <= 0:
            raise UnknownModelError(f"experiment {experiment!r} has no arm with a weight above 0")
        seed = sticky if sticky is not None else uuid.uuid4().hex
        digest = hashlib.sha256(f"{experiment}\0{seed}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64 * total
        for arm, model in arms:
            point -= weights[arm]
            if point < 0:
                return arm, model
        return next((a, m) for a, m in reversed(arms) if weights[a] > 0)
