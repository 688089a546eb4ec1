"""Throughput: semline's engine against Hugging Face generate, in one process and one run.

Workload: 32 chat-like requests, prompt lengths spread from 16 to 512 tokens and
output lengths (max_tokens, EOS ignored) from 32 to 512, greedy. Three ways:

1. HF generate, one request after another (sequential);
2. HF generate on the whole set as one left-padded batch (static batching: the
   batch runs until its longest member is done; only the tokens each request
   asked for count as useful);
3. semline's engine with every request submitted at once.

Same model (fp32 by default), same threads, same device (--device cuda runs both on a GPU). Prints a table and writes
benchmarks/results/throughput.json. Usage:

    .venv/bin/python benchmarks/throughput.py [--num-requests 32] [--sequential-sample 32]

`--sequential-sample N` runs only the first N requests (in a spread of sizes) for
the sequential baseline and reports its tokens/s from them (it is by far the
slowest run: ~15 tokens/s here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_info  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.loader import hf_folder  # noqa: E402
from engine.metrics import percentile  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TEXT = Path(__file__).parent.parent / "tests" / "data" / "long_prompt.txt"


def make_workload(tokenizer, num_requests: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) pairs; prompt and output lengths spread evenly, shuffled apart."""
    rng = random.Random(seed)
    source = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    spread = lambda lo, hi: [round(lo + (hi - lo) * i / (num_requests - 1)) for i in range(num_requests)]  # noqa: E731
    prompt_lens, output_lens = spread(16, 512), spread(32, 512)
    rng.shuffle(output_lens)
    workload = []
    for i, (plen, olen) in enumerate(zip(prompt_lens, output_lens)):
        start = rng.randrange(len(source))
        ids = (source[start:] + source)[:plen]  # a different window of real text each time
        workload.append((ids, olen))
    rng.shuffle(workload)
    return workload


class _StepClock(StoppingCriteria):
    """Records when each generated token (for the whole batch) is ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _hf_generate(model, input_ids, attention_mask, max_new_tokens, pad_id):
    clock = _StepClock()
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=attention_mask, generation_config=config,
                       stopping_criteria=StoppingCriteriaList([clock]))
    return start, clock.times


def run_hf_sequential(model, workload, pad_id) -> dict:
    ttfts, tpots, tokens, elapsed = [], [], 0, 0.0
    for ids, max_tokens in workload:
        x = torch.tensor([ids], device=model.device)
        start, times = _hf_generate(model, x, torch.ones_like(x), max_tokens, pad_id)
        assert len(times) == max_tokens
        elapsed += times[-1] - start
        ttfts.append(times[0] - start)
        tpots.append((times[-1] - times[0]) / max(1, max_tokens - 1))
        tokens += max_tokens
    return _summary(tokens, elapsed, ttfts, tpots)


def run_hf_static(model, workload, pad_id) -> dict:
    longest = max(len(ids) for ids, _ in workload)
    batch = torch.full((len(workload), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, (ids, _) in enumerate(workload):  # left padding, as HF wants for generation
        batch[row, longest - len(ids):] = torch.tensor(ids)
        mask[row, longest - len(ids):] = 1
    max_new = max(mt for _, mt in workload)
    start, times = _hf_generate(model, batch.to(model.device), mask.to(model.device), max_new, pad_id)
    elapsed = times[-1] - start
    # Every request's first token comes with the batch's first step; each request is
    # done (for its user) when its own max_tokens-th token is out.
    ttfts = [times[0] - start] * len(workload)
    tpots = [(times[mt - 1] - times[0]) / max(1, mt - 1) for _, mt in workload]
    useful = sum(mt for _, mt in workload)
    return _summary(useful, elapsed, ttfts, tpots, computed_tokens=max_new * len(workload))


def run_semline(llm: LLM, workload) -> dict:
    params = [SamplingParams(temperature=0, max_tokens=mt, ignore_eos=True) for _, mt in workload]
    start = time.perf_counter()
    outputs = llm.generate([ids for ids, _ in workload], params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == mt for o, (_, mt) in zip(outputs, workload))
    ttfts = [o.metrics.time_to_first_token for o in outputs]
    tpots = [o.metrics.time_per_output_token for o in outputs]
    stats = llm.engine.stats
    result = _summary(sum(len(o.token_ids) for o in outputs), elapsed, ttfts, tpots)
    result.update(
        num_preemptions=stats.num_preemptions,
        num_steps=stats.num_steps,
        flops_per_second=sum(o.metrics.flops for o in outputs) / elapsed,
        joules_per_output_token=sum(o.metrics.energy_joules for o in outputs) / result["output_tokens"],
        energy_source=outputs[0].metrics.energy_source,
    )
    return result


def _summary(tokens, elapsed, ttfts, tpots, computed_tokens=None) -> dict:
    return {
        "output_tokens": tokens,
        "computed_output_tokens": computed_tokens or tokens,
        "seconds": elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_mean_s": statistics.fmean(tpots),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--sequential-sample", type=int, default=None,
                        help="run only this many requests for the sequential baseline")
    parser.add_argument("--skip-hf", action="store_true", help="measure semline alone (for profiling)")
    parser.add_argument("--output", default=str(RESULTS / "throughput.json"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both runs on it)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (both runs)")
    parser.add_argument("--attention-backend", default="auto", help="the engine's attention_backend")
    parser.add_argument("--quantization", default="none",
                        help="the engine's quantization: none (default) runs the weights HF runs, in --dtype; "
                             "auto keeps the GGUF file's 4-bit layers (the library's and server's default)")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    llm = LLM(device=args.device, dtype=args.dtype, attention_backend=args.attention_backend,
              quantization=args.quantization)
    workload = make_workload(llm.tokenizer, args.num_requests)
    results = {"semline": run_semline(llm, workload)}
    if not args.skip_hf:
        model = AutoModelForCausalLM.from_pretrained(hf_folder(llm.config.model, llm.config.resolve_cache_dir()),
                                                     dtype=getattr(torch, args.dtype))
        model = model.to(args.device).eval()
        model.generation_config.eos_token_id = None  # every request runs to its max_tokens
        pad_id = llm.tokenizer.pad_token_id or 0
        results["hf_static_batch"] = run_hf_static(model, workload, pad_id)
        sample = workload
        if args.sequential_sample:
            # Sizes spread over the workload, not just its first entries.
            by_size = sorted(workload, key=lambda w: len(w[0]) + w[1])
            step = len(by_size) / args.sequential_sample
            sample = [by_size[int(i * step)] for i in range(args.sequential_sample)]
        results["hf_sequential"] = run_hf_sequential(model, sample, pad_id)
        results["hf_sequential"]["num_requests_run"] = len(sample)
        sem = results["semline"]["output_tokens_per_s"]
        results["ratios"] = {
            "vs_sequential": sem / results["hf_sequential"]["output_tokens_per_s"],
            "vs_static_batch": sem / results["hf_static_batch"]["output_tokens_per_s"],
            "ttft_p50_vs_static_batch": results["semline"]["ttft_p50_s"] / results["hf_static_batch"]["ttft_p50_s"],
        }
    results["setup"] = {
        "num_requests": args.num_requests,
        "prompt_tokens": sum(len(ids) for ids, _ in workload),
        "max_tokens": sum(mt for _, mt in workload),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "model": f"SmolLM2-135M-Instruct ({args.dtype}, quantization {args.quantization})",
        "attention_backend": args.attention_backend,
        **machine_info(),
    }
    _print_table(results)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.output}")


def _print_table(results: dict) -> None:
    print(f"\n{'run':<18}{'useful tok/s':>14}{'TTFT p50 s':>12}{'TTFT p99 s':>12}{'TPOT ms':>10}{'wall s':>9}")
    for name in ("hf_sequential", "hf_static_batch", "semline"):
        if name in results:
            r = results[name]
            print(f"{name:<18}{r['output_tokens_per_s']:>14.1f}{r['ttft_p50_s']:>12.2f}"
                  f"{r['ttft_p99_s']:>12.2f}{r['tpot_mean_s'] * 1000:>10.1f}{r['seconds']:>9.1f}")
    for key, value in results.get("ratios", {}).items():
        print(f"{key}: {value:.2f}x")


if __name__ == "__main__":
    main()
