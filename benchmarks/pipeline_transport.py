"""Stage-to-stage transport: plain Ray actor calls against a Ray Compiled Graph, in one run.

What a pipeline step moves, without the model: the driver sends a step plan
(the plain lists of a decode batch of --batch sequences) to P stage actors; the
first stage turns it into hidden states [batch, 576] float32 (SmolLM2-135M's
width), each next stage takes the previous stage's array and returns one of the
same shape, the last returns what semline's last stage returns: "logits"
[batch, 49152] (the vocabulary) for rows that sample, or only the argmax token
ids (int32) for greedy rows. Both are measured: every row sampling (logits) and
every row greedy (token ids). The stages do no compute, so the time per step is
the transport alone.

- plain: semline's ParallelRunner way: ray.put(plan), then stage.run.remote(plan_ref,
  hidden_ref) chained by object refs, ray.get on the last;
- compiled: the same chain as a Compiled Graph (ray.dag InputNode, bind,
  experimental_compile): shared-memory channels, actors in a resident loop.
Each is measured one step at a time (latency) and with --inflight steps in
flight (throughput per step), for both outputs. Writes benchmarks/results/pipeline_transport.json.

    .venv/bin/python benchmarks/pipeline_transport.py [--stages 2] [--batch 32] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import ray

from engine.model_runner import StepPlan

RESULTS = Path(__file__).parent / "results"
HIDDEN, VOCAB = 576, 49152


@ray.remote(num_cpus=0)
class Stage:
    def __init__(self, last: bool) -> None:
        self.last = last

    def run(self, plan: StepPlan, hidden):
        rows = len(plan.input_ids)
        if not self.last:
            return np.ones((rows, HIDDEN), dtype=np.float32)
        greedy = len(plan.argmax_rows)
        return np.ones((rows - greedy, VOCAB), dtype=np.float32), np.zeros(greedy, dtype=np.int32)


def decode_plan(batch: int, block_size: int = 16, context: int = 200) -> StepPlan:
    """A decode step of `batch` sequences with `context` tokens each."""
    tables = [list(range(i * 16, i * 16 + (context + block_size - 1) // block_size)) for i in range(batch)]
    return StepPlan(input_ids=[7] * batch, positions=[context - 1] * batch,
                    slots=[t[-1] * block_size + 3 for t in tables], logits_indices=list(range(batch)),
                    decode_tokens=list(range(batch)), decode_tables=tables, decode_lens=[context] * batch,
                    prefill=[])


def timed(submit, wait, steps: int, inflight: int) -> float:
    """Mean milliseconds per step with up to `inflight` steps outstanding."""
    pending = []
    start = time.perf_counter()
    for _ in range(steps):
        pending.append(submit())
        if len(pending) >= inflight:
            wait(pending.pop(0))
    for handle in pending:
        wait(handle)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--inflight", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ray.init(include_dashboard=False, logging_level="ERROR")
    sampling_plan = decode_plan(args.batch)  # every row needs its logits
    greedy_plan = decode_plan(args.batch)
    greedy_plan.argmax_rows = list(range(args.batch))  # every row travels as a token id
    stages = [Stage.remote(i == args.stages - 1) for i in range(args.stages)]

    def measure(submit) -> dict:
        runs = {}
        for name, plan in (("logits", sampling_plan), ("token_ids", greedy_plan)):
            ray.get(submit(plan))
            for n in (1, args.inflight):
                runs[f"{name}_{n}_in_flight"] = [timed(lambda: submit(plan), ray.get, args.steps, n)
                                                 for _ in range(args.repeats)]
        return runs

    def plain_submit(plan):
        plan_ref, hidden = ray.put(plan), None
        for stage in stages:
            hidden = stage.run.remote(plan_ref, hidden)
        return hidden

    plain = measure(plain_submit)

    from ray.dag import InputNode

    with InputNode() as plan_node:
        hidden = None
        for stage in stages:
            hidden = stage.run.bind(plan_node, hidden)
    compiled_dag = hidden.experimental_compile(_max_inflight_executions=args.inflight)
    compiled = measure(compiled_dag.execute)
    compiled_dag.teardown(kill_actors=True)

    def summary(runs: dict) -> dict:
        return {f"{key}_ms_per_step": round(statistics.median(ms), 3) for key, ms in runs.items()}

    result = {
        "benchmark": "pipeline_transport",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "workload": {"stages": args.stages, "decode_batch": args.batch, "hidden_bytes": args.batch * HIDDEN * 4,
                     "logits_bytes": args.batch * VOCAB * 4, "token_ids_bytes": args.batch * 4,
                     "steps": args.steps, "repeats": args.repeats},
        "plain_actor_calls": summary(plain),
        "compiled_graph": summary(compiled),
        "compiled_vs_plain_speedup": {
            key: round(statistics.median(plain[key]) / statistics.median(compiled[key]), 2) for key in plain},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_transport.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
