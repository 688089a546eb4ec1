"""Structured output's cost: the throughput workload with half the requests under a JSON
schema, against the same workload all free, in one process and one run.

Both runs take benchmarks/throughput.py's 32 requests (prompts of 16-512 tokens, max_tokens
32-512, greedy). The free run ignores EOS, as throughput.py does. In the constrained run
every other request must answer with a JSON object {"summary": string, "keywords": [string]}
(strict schema); a grammar ends its request when the object closes, so the runs' output
lengths differ, and the figures compared are per token and per step: output tokens/s, the
mean engine step, TTFT. Also reported: the grammar compile time (once per schema, off the
step), and whether every constrained output that finished is valid (those cut by max_tokens
are prefixes of valid JSON, as with any JSON mode).

    .venv/bin/python benchmarks/structured_output.py [--num-requests 32]

Writes benchmarks/results/structured_output.json with the CPU flags and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402
from throughput import RESULTS, make_workload  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.metrics import percentile  # noqa: E402
from engine.structured_output import StructuredOutput  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"summary": {"type": "string"},
                   "keywords": {"type": "array", "items": {"type": "string", "maxLength": 40}}},
    "required": ["summary", "keywords"], "additionalProperties": False,
}


def run(llm: LLM, workload, constrained: bool) -> dict:
    spec = StructuredOutput(json_schema=SCHEMA)
    params = [SamplingParams(temperature=0, max_tokens=mt, ignore_eos=not (constrained and i % 2 == 0),
                             structured_output=spec if constrained and i % 2 == 0 else None)
              for i, (_, mt) in enumerate(workload)]
    before = llm.engine.stats.num_steps, llm.engine.stats.busy_seconds
    start = time.perf_counter()
    outputs = llm.generate([ids for ids, _ in workload], params)
    elapsed = time.perf_counter() - start
    steps = llm.engine.stats.num_steps - before[0]
    busy = llm.engine.stats.busy_seconds - before[1]
    tokens = sum(len(o.token_ids) for o in outputs)
    result = {
        "output_tokens": tokens, "seconds": elapsed, "output_tokens_per_s": tokens / elapsed,
        "steps": steps, "step_mean_ms": 1000 * busy / max(1, steps),
        "ttft_p50_s": statistics.median(o.metrics.time_to_first_token for o in outputs),
        "ttft_p99_s": percentile([o.metrics.time_to_first_token for o in outputs], 99),
    }
    if constrained:
        finished, valid, cut = 0, 0, 0
        for i, out in enumerate(outputs):
            if i % 2:
                continue
            if out.finish_reason == "length":
                cut += 1
                continue
            finished += 1
            try:
                jsonschema.validate(json.loads(out.text), SCHEMA)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        result.update(constrained_requests=(len(outputs) + 1) // 2, constrained_finished=finished,
                      constrained_valid=valid, constrained_cut_by_max_tokens=cut,
                      constrained_tokens=sum(len(o.token_ids) for o in outputs[::2]))
    return result


def mask_cost(llm: LLM, rows: int, repeats: int = 20) -> float:
    """Milliseconds one step spends masking `rows` constrained rows (fill + apply on [rows, V] logits)."""
    engine = llm.engine
    compiled = engine.compile_grammar(StructuredOutput(json_schema=SCHEMA))
    matchers = [engine._grammars.matcher(compiled) for _ in range(rows)]
    logits = torch.randn(rows, engine.runner.args.vocab_size)
    start = time.perf_counter()
    for _ in range(repeats):
        matchers[0].backend.mask(logits, list(range(rows)), matchers)
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", default=str(RESULTS / "structured_output.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    llm = LLM(dtype=args.dtype)
    workload = make_workload(llm.tokenizer, args.num_requests)

    start = time.perf_counter()
    llm.engine.compile_grammar(StructuredOutput(json_schema=SCHEMA))  # the first compile (tokenizer tables too)
    first_compile = time.perf_counter() - start
    start = time.perf_counter()
    llm.engine.compile_grammar(StructuredOutput(json_schema={**SCHEMA, "title": "another"}))
    compile_s = time.perf_counter() - start

    mask_ms = mask_cost(llm, rows=16)
    llm.generate([workload[0][0]], SamplingParams(max_tokens=4))  # warm up
    free = run(llm, workload, constrained=False)
    constrained = run(llm, workload, constrained=True)
    results = {
        "free": free, "half_constrained": constrained,
        "grammar_compile_s": {"first_with_tokenizer_tables": first_compile, "another_schema": compile_s},
        "mask_ms_per_step_16_rows": mask_ms,
        "ratios": {"tokens_per_s": constrained["output_tokens_per_s"] / free["output_tokens_per_s"],
                   "step_mean": constrained["step_mean_ms"] / free["step_mean_ms"]},
        "setup": {"num_requests": args.num_requests, "dtype": args.dtype, "threads": torch.get_num_threads(),
                  "schema": SCHEMA, **machine_info()},
    }
    print(f"\n{'run':<18}{'tok/s':>9}{'step ms':>9}{'TTFT p50':>10}{'tokens':>8}")
    for name in ("free", "half_constrained"):
        r = results[name]
        print(f"{name:<18}{r['output_tokens_per_s']:>9.1f}{r['step_mean_ms']:>9.2f}{r['ttft_p50_s']:>10.2f}"
              f"{r['output_tokens']:>8}")
    c = constrained
    print(f"constrained: {c['constrained_valid']}/{c['constrained_finished']} finished outputs valid, "
          f"{c['constrained_cut_by_max_tokens']} cut by max_tokens")
    print(f"tokens/s ratio {results['ratios']['tokens_per_s']:.2f}x, step ratio {results['ratios']['step_mean']:.2f}x; "
          f"grammar compile {compile_s * 1000:.1f} ms (first, with tokenizer tables: {first_compile * 1000:.0f} ms); "
          f"masking 16 rows: {mask_ms:.2f} ms per step")
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
