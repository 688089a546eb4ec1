"""One local Ray cluster for every test of the cluster package."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def step(engine, final: dict, max_steps: int) -> None:
    """Run up to `max_steps` engine steps (fewer once nothing is left), keeping each request's
    latest output in `final`. Bounded: a hang fails the test instead of stalling it."""
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            final[out.request_id] = out
