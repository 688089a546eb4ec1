"""One local Ray cluster for every test of the cluster package."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()
