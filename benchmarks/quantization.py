"""Int8 weights against float32, in one run: batch-1 decode speed, weight memory, quality.

- Decode: one request at a time, greedy, --max-tokens tokens with ignore_eos, over
  --repeats prompts; the two engines alternate so both see the same machine noise.
  Reported: decode tokens/s (tokens after the first / time after the first).
- Memory: bytes of the weights each engine holds (engine.quantization.weight_bytes:
  float32 includes oneDNN's prepacked copy of the tied output head).
- Quality: the engine's perplexity of tests/data/public_domain.txt (LLMEngine.score,
  32-token chunks: the decode-sized kernel path), and agreement of the first
  32 greedy tokens over 20 prompts (tokens equal up to the first difference / 32).
Targets (issue 6): faster batch-1 decode than float32 on this CPU; perplexity within 3 %.
Writes benchmarks/results/quantization.json.

    .venv/bin/python benchmarks/quantization.py [--max-tokens 64] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.llm import apply_chat_template
from engine.quantization import weight_bytes

RESULTS = Path(__file__).parent / "results"
TEXT = Path(__file__).parent.parent / "tests" / "data" / "public_domain.txt"
PROMPTS = [
    "Explain what a KV cache is.", "Write a haiku about autumn.", "What is the capital of Japan?",
    "Give three tips for better sleep.", "Describe a cat to someone who has never seen one.",
    "What causes rain?", "Summarise the plot of Romeo and Juliet.", "How do vaccines work?",
    "Write a limerick about a programmer.", "What is photosynthesis?", "Name five fruits.",
    "Why is the sky blue?", "Explain recursion simply.", "What is the boiling point of water?",
    "Suggest a name for a bakery.", "How many legs does a spider have?", "What is a prime number?",
    "Write one sentence about the ocean.", "What does a compiler do?", "Describe the taste of lemon.",
]


def decode_rate(llm: LLM, prompt: str, max_tokens: int) -> float:
    """Tokens/s after the first token, for one request alone."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    m = out.metrics
    return (m.num_generated_tokens - 1) / (m.time_per_output_token * (m.num_generated_tokens - 1))


def perplexity(llm: LLM, ids: list[int]) -> float:
    """The engine's own perplexity: teacher forcing in 32-token chunks (the decode-sized path)."""
    logprobs = llm.engine.score(ids, chunk_size=32)
    return math.exp(-sum(logprobs) / len(logprobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = {"device": "cpu", "dtype": "float32", "quantization": "none", "kv_cache_memory_gb": 0.25, "num_threads": args.threads}
    engines = {"float32": LLM(**base), "int8": LLM(**base, quantization="int8")}
    tok = engines["float32"].tokenizer
    chats = [apply_chat_template(tok, [{"role": "user", "content": p}]) for p in PROMPTS]

    for llm in engines.values():  # warm-up
        decode_rate(llm, chats[0], 8)
    rates = {name: [] for name in engines}
    for i in range(args.repeats):
        for name, llm in engines.items():
            rates[name].append(decode_rate(llm, chats[i % len(chats)], args.max_tokens))

    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    ref = [o.token_ids for o in engines["float32"].generate(chats, greedy)]
    got = [o.token_ids for o in engines["int8"].generate(chats, greedy)]
    agreement = []
    for r, g in zip(ref, got):
        same = next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r))
        agreement.append(same / len(r))

    ids = tok.encode(TEXT.read_text(), add_special_tokens=False)
    ppl_fp32, ppl_int8 = perplexity(engines["float32"], ids), perplexity(engines["int8"], ids)

    memory = {name: weight_bytes(llm.engine.runner.model) for name, llm in engines.items()}
    median = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "benchmark": "quantization",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "workload": {"max_tokens": args.max_tokens, "repeats": args.repeats, "agreement_prompts": len(PROMPTS),
                     "perplexity_text": TEXT.name, "perplexity_tokens": len(ids)},
        "decode_tokens_per_s": {name: {"median": round(median[name], 2), "runs": [round(x, 2) for x in r]}
                                for name, r in rates.items()},
        "decode_speedup": round(median["int8"] / median["float32"], 3),
        "weight_bytes": memory,
        "weight_bytes_ratio": round(memory["int8"] / memory["float32"], 3),
        "raw_float32_weight_bytes": engines["float32"].engine.runner.args.num_parameters * 4,
        "perplexity": {"float32": round(ppl_fp32, 3), "int8": round(ppl_int8, 3),
                       "relative_change": round((ppl_int8 - ppl_fp32) / ppl_fp32, 4)},
        "greedy_agreement_first_32": {"mean": round(statistics.mean(agreement), 3),
                                      "identical": sum(a == 1.0 for a in agreement)},
        "targets": {"int8_faster_batch1_decode": median["int8"] > median["float32"],
                    "perplexity_within_3pct": abs(ppl_int8 - ppl_fp32) / ppl_fp32 < 0.03},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantization.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
