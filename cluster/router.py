"""The router actor: one per application, through which both lanes reach the LLM servers.

A named async Ray actor around AdmissionController. Lanes ask it for a ticket
before they send work to the LLM server and give the ticket back when the
request ends; token streams then go from the LLM server to the ingress
directly, so tokens make no extra hop through the router.
"""

from __future__ import annotations

import ray

from cluster.admission import AdmissionConfig, AdmissionController


class Router:
    def __init__(self, config: dict) -> None:
        self.admission = AdmissionController(AdmissionConfig(**config))

    async def acquire(self, lane: str, timeout_s: float | None = None) -> int:
        return await self.admission.acquire(lane, timeout_s)

    async def release(self, ticket: int) -> None:
        self.admission.release(ticket)

    async def stats(self) -> dict:
        return self.admission.stats()

    async def grant_log(self) -> list[tuple[str, int]]:
        return list(self.admission.grant_log)


def get_or_create_router(name: str, config: dict):
    """The named router actor, created on first use (it reserves no CPU)."""
    return ray.remote(Router).options(
        name=name, get_if_exists=True, num_cpus=0, max_concurrency=100_000, max_restarts=-1,
    ).remote(config)
