"""Speculative decoding's three proposers against plain decoding, in one run.

Workloads, one request at a time (the batch-1 decode case speculation is for),
greedy, --max-tokens output tokens each:
- input-grounded: "edit" and "repeat/summarise" prompts over passages of
  tests/data/public_domain.txt, where the output repeats the input (the target);
- open-ended: chat questions with nothing to copy.
Engines (otherwise identical), alternating per prompt: none; prompt_lookup;
self_speculative (the model's first --draft-layers layers + its head); draft_model
(--draft-model, default the embedded model itself: the only model on this
machine, so it shows the machinery's acceptance ceiling, not a speed-up: a real
draft is several times smaller than its target). Reported per proposer: decode
tokens/s (tokens after the first / time after the first token), speedup over
none, acceptance rate, mean tokens per verifying step, and whether greedy outputs
were identical.
Target (issue 6): >= 1.8x decode tokens/s on the input-grounded workload with
prompt lookup. Writes benchmarks/results/speculative.json.

    .venv/bin/python benchmarks/speculative.py [--max-tokens 96] [--k 4] [--draft-layers 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.llm import apply_chat_template

RESULTS = Path(__file__).parent / "results"
TEXT = Path(__file__).parent.parent / "tests" / "data" / "public_domain.txt"
OPEN_ENDED = ["What is a good way to learn a new language?", "Write a short poem about winter.",
              "Why do cats purr?", "Give me three ideas for a birthday party."]


def grounded_prompts(tokenizer) -> list[str]:
    paragraphs = [p for p in TEXT.read_text().split("\n\n") if len(p) > 400][:4]
    asks = ["Repeat the following passage exactly, then stop:", "Rewrite the passage below in modern "
            "spelling, keeping every sentence:", "Copy this text, correcting any typos:",
            "Quote the passage below word for word:"]
    return [apply_chat_template(tokenizer, [{"role": "user", "content": f"{ask}\n\n{text}"}])
            for ask, text in zip(asks, paragraphs)]


def decode_rate(output) -> float:
    m = output.metrics
    return 1.0 / m.time_per_output_token if m.time_per_output_token else 0.0


def run(engines: dict, prompts: list[str], params: SamplingParams) -> dict:
    rates = {name: [] for name in engines}
    tokens = {name: [] for name in engines}
    before = {name: dataclasses.replace(llm.engine.stats) for name, llm in engines.items()}
    for prompt in prompts:
        for name, llm in engines.items():
            out = llm.generate([prompt], params)[0]
            rates[name].append(decode_rate(out))
            tokens[name].append(out.token_ids)
    median = {name: statistics.median(r) for name, r in rates.items()}
    result = {"prompts": len(prompts)}
    for name, llm in engines.items():
        row = {"decode_tokens_per_s": round(median[name], 2), "runs": [round(x, 2) for x in rates[name]]}
        if name != "none":
            stats, start = llm.engine.stats, before[name]
            steps = stats.spec_num_verify_steps - start.spec_num_verify_steps
            drafts = stats.spec_num_draft_tokens - start.spec_num_draft_tokens
            accepted = stats.spec_num_accepted_tokens - start.spec_num_accepted_tokens
            row.update({
                "speedup": round(median[name] / median["none"], 3),
                "acceptance_rate": round(accepted / drafts, 3) if drafts else 0.0,
                "tokens_per_verify_step": round((accepted + steps) / steps, 3) if steps else 0.0,
                "greedy_outputs_identical": tokens[name] == tokens["none"],
            })
        result[name] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--draft-layers", type=int, default=8, help="self_speculative: layers in the draft")
    parser.add_argument("--draft-model", default=None, help="draft_model: a local model (default: the embedded one)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = {"device": "cpu", "dtype": "float32", "quantization": "none", "kv_cache_memory_gb": 0.25, "num_threads": args.threads,
            "num_speculative_tokens": args.k}
    engines = {"none": LLM(**base),
               "prompt_lookup": LLM(**base, speculative_method="prompt_lookup"),
               "self_speculative": LLM(**base, speculative_method="self_speculative",
                                       speculative_draft_layers=args.draft_layers),
               "draft_model": LLM(**base, speculative_method="draft_model", speculative_model=args.draft_model)}
    tok = engines["none"].tokenizer
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    for llm in engines.values():
        llm.generate(["warm up"], SamplingParams(max_tokens=8))
    open_prompts = [apply_chat_template(tok, [{"role": "user", "content": q}]) for q in OPEN_ENDED]
    result = {
        "benchmark": "speculative",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "config": {"num_speculative_tokens": args.k, "max_tokens": args.max_tokens, "prompt_lookup_max": 3,
                   "prompt_lookup_min": 1, "self_speculative_draft_layers": args.draft_layers,
                   "model_layers": engines["none"].engine.runner.args.num_layers,
                   "draft_model": args.draft_model or "embedded SmolLM2-135M-Instruct (the target itself)"},
        "input_grounded": run(engines, grounded_prompts(tok), params),
        "open_ended": run(engines, open_prompts, params),
    }
    result["target_met"] = result["input_grounded"]["prompt_lookup"]["speedup"] >= 1.8
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speculative.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
