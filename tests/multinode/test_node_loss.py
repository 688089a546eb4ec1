"""Many nodes: two LLM server replicas on two worker nodes of a three-raylet Ray cluster on
this machine; a worker node is killed while realtime requests and a batch run on it
(tests/multinode/scenario.py, in its own process: its own cluster beside the session's);
then a pipeline spread over the worker nodes loses one of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCENARIO = Path(__file__).with_name("scenario.py")


def test_losing_a_node_under_load_loses_nothing():
    proc = subprocess.run([sys.executable, str(SCENARIO)], capture_output=True, text=True, timeout=900,
                          cwd=SCENARIO.parents[2])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("OBSERVED ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-4000:])
    seen = json.loads(lines[-1][len("OBSERVED "):])
    # Two replicas (at most one per node: on the two worker nodes).
    assert len(seen["replicas_before"]) == 2, seen
    # Requests in flight: each answered, or ended with a clear error (503 replica_lost) - none hung.
    for result in seen["inflight"]:
        assert result["status"] == 200 or (result["status"] == 503 and result["code"] == "replica_lost"), result
        assert result["seconds"] < 80, result
    assert any(r["status"] == 200 for r in seen["inflight"])  # the survivor's own requests finished
    # New requests go to the surviving replica.
    survivors = set(seen["replicas_after"])
    assert len(seen["replicas_after"]) == 6 and len(survivors) == 1 and survivors < set(seen["replicas_before"]), seen
    # The batch running at the time completes, every custom_id exactly once.
    assert seen["batch_status"] == "completed" and seen["batch_ok"], seen
    assert seen["batch_ids"] == sorted(f"b{i}" for i in range(16)), seen
    # The node comes back, and so does the second replica.
    assert len(seen["replicas_back"]) == 2, seen
    # A pipeline spread over two nodes loses one: its stage is placed again, its requests end
    # with the tokens of an undisturbed run.
    pipeline = seen["pipeline"]
    assert pipeline["stage_nodes"] == 2 and pipeline["rebuilds"] >= 1, pipeline
    assert pipeline["finished"] and all(pipeline["same_tokens"]), pipeline
