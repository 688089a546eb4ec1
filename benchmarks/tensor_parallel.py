"""Tensor parallelism on this machine: a Llama-3.2-1B-shaped model through TP 1 and TP 2, in one run.

The model: Llama 3.2 1B's shapes (16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV
heads, vocabulary 128256, tied head) with random bf16 weights, built once from a
transformers config and cached as a local folder (SmolLM2's tokenizer beside it; the
prompts are token ids). Workload: 32 requests at once (64-token prompts, 16 output
tokens, greedy, EOS ignored), so decode steps run batches of 32.

- TP 1: the whole model in this process, all cores.
- TP 2: two Ray worker actors, half the cores each, one process group; the engine
  (driver) sends each step's plan to both and gets the logits from rank 0. All-reduces
  through shared memory (the default for CPU ranks on one host), and again over gloo's
  loopback TCP (`tp_backend: gloo`, the path ranks on different hosts take).

Reported per run: output tokens/s, TTFT p50, the decode step time at batch 32; for
the TP 2 runs also the all-reduces per step (count, bytes, time per rank) and the driver's
share (step wall time minus the slower rank's compute), and the TP 2 step overhead
(all-reduces + driver) as a fraction of the TP 1 step (target: <= 25 %). The roofline:
the time to stream the weights once at this machine's measured copy bandwidth, which
bounds a decode step from below. Writes benchmarks/results/tensor_parallel.json.

    .venv/bin/python benchmarks/tensor_parallel.py [--batch 32] [--prompt-tokens 64] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import copy_bandwidth_gbs, machine_info  # noqa: E402
from cluster.executors import ParallelConfig, RayExecutor  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.loader import resolve_model_dir  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                bos_token_id=1, eos_token_id=2, initializer_range=0.02)


def llama_1b_folder(cache: Path) -> Path:
    """The random-weight 1B-shaped model, built once (about 2.5 GB of bf16 safetensors)."""
    folder = cache / "bench-models" / "llama-3.2-1b-shape-random-bf16"
    if (folder / "config.json").is_file():
        return folder
    import transformers

    print(f"building {folder} (once)", flush=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**LLAMA_1B), dtype=torch.bfloat16)
    tmp = folder.with_suffix(".tmp")
    model.save_pretrained(tmp)
    for file in resolve_model_dir(None, str(cache)).iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, tmp / file.name)
    tmp.rename(folder)
    return folder


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, tp: int) -> dict:
    """Submit all prompts, step the engine, time every step; a decode step is one where every
    request already had its first token (a batch of len(prompts) decodes)."""
    engine = llm.engine
    runner = engine.runner
    ids = [engine.add_request(p, params).request_id for p in prompts]
    started: set[str] = set()
    final, decode_times = {}, []
    before = after = None
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        all_started = len(started) == len(ids)
        if all_started and before is None and tp > 1:
            before = runner.worker_info()
        step_start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - step_start
        if all_started and not any(o.finished for o in outputs):
            decode_times.append(elapsed)
            if tp > 1:
                after = runner.worker_info()  # outside the timed step
        for out in outputs:
            final[out.request_id] = out
            if out.token_ids:
                started.add(out.request_id)
    wall = time.perf_counter() - start
    outs = [final[i] for i in ids]
    result = {
        "tensor_parallel_size": tp,
        "output_tokens_per_s": round(sum(len(o.token_ids) for o in outs) / wall, 2),
        "seconds": round(wall, 2),
        "ttft_p50_s": round(statistics.median(o.metrics.time_to_first_token for o in outs), 3),
        "decode_steps": len(decode_times),
        "decode_step_ms": round(statistics.median(decode_times) * 1000, 2),
        "tokens": [o.token_ids for o in outs],
    }
    if tp > 1 and before is not None and after is not None:
        # Deltas over the decode steps measured (the info calls bracket them).
        steps = after[0]["num_runs"] - before[0]["num_runs"]
        per_rank = [{key: (a[key] - b[key]) / steps for key in
                     ("busy_seconds", "collective_seconds", "collective_bytes", "num_collectives")}
                    for a, b in zip(after, before)]
        wall_per_step = sum(decode_times[-steps:]) / steps
        allreduce_s = statistics.mean(r["collective_seconds"] for r in per_rank)
        slowest_busy = max(r["busy_seconds"] for r in per_rank)
        result.update({
            "allreduces_per_step": per_rank[0]["num_collectives"],
            "allreduce_bytes_per_step": int(per_rank[0]["collective_bytes"]),
            "allreduce_ms_per_step": round(allreduce_s * 1000, 2),
            "allreduce_us_each": round(allreduce_s / per_rank[0]["num_collectives"] * 1e6, 1),
            "rank_compute_ms_per_step": [round((r["busy_seconds"] - r["collective_seconds"]) * 1000, 2)
                                         for r in per_rank],
            "driver_ms_per_step": round((wall_per_step - slowest_busy) * 1000, 2),
        })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", default=str(RESULTS / "tensor_parallel.json"))
    args = parser.parse_args()
    cache = Path(os.environ.get("SEMLINE_CACHE") or Path.home() / ".cache" / "semline")
    folder = llama_1b_folder(cache)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49152) for _ in range(args.prompt_tokens)] for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    config = dict(model=str(folder), device="cpu", dtype="bfloat16", max_num_seqs=args.batch,
                  max_num_batched_tokens=512, kv_cache_memory_gb=0.5, max_model_len=1024)
    bandwidth = copy_bandwidth_gbs()
    ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="ERROR")
    runs = {}
    torch.set_num_threads(args.threads)
    llm = LLM(**config, num_threads=args.threads)
    weight_bytes = llm.engine.runner.num_parameters * 2
    llm.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm-up
    runs["tp1"] = run(llm, prompts, params, 1)
    llm.close()
    for name, backend in (("tp2", "auto"), ("tp2_gloo", "gloo")):
        llm = LLM(**config, num_threads=max(1, args.threads // 2), tensor_parallel_size=2,
                  executor=RayExecutor(ParallelConfig(tp_backend=backend)))
        llm.generate(prompts[:2], SamplingParams(max_tokens=2))
        runs[name] = run(llm, prompts, params, 2)
        runs[name]["all_reduce"] = llm.engine.runner.worker_info()[0]["all_reduce"]
        llm.close()
    tp1, tp2 = runs["tp1"], runs["tp2"]

    def overhead_ms(r: dict) -> float:
        return r["allreduce_ms_per_step"] + max(0.0, r["driver_ms_per_step"])

    roofline_ms = weight_bytes / (bandwidth / 2 * 1e9) * 1000  # read once; the copy moved 2x
    result = {
        "benchmark": "tensor_parallel",
        "machine": machine_info(),
        "model": {"shape": "Llama-3.2-1B (random weights)", "dtype": "bfloat16",
                  "weight_bytes": weight_bytes, **{k: LLAMA_1B[k] for k in (
                      "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "vocab_size")}},
        "workload": {"requests": args.batch, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                     "threads_total": args.threads},
        "copy_bandwidth_gbs": round(bandwidth, 1),
        "roofline_decode_step_ms": round(roofline_ms, 1),
        "runs": {name: {k: v for k, v in r.items() if k != "tokens"} for name, r in runs.items()},
        "tp2_step_overhead_ms": {name: round(overhead_ms(runs[name]), 2) for name in ("tp2", "tp2_gloo")},
        "tp2_step_overhead_vs_tp1_step": {name: round(overhead_ms(runs[name]) / tp1["decode_step_ms"], 3)
                                          for name in ("tp2", "tp2_gloo")},
        "target_overhead_vs_tp1_step": 0.25,
        "throughput_vs_tp1": {name: round(runs[name]["output_tokens_per_s"] / tp1["output_tokens_per_s"], 3)
                              for name in ("tp2", "tp2_gloo")},
        # bf16 sums in another order over two ranks: random weights give near-ties, so this is
        # information, not the correctness check (tests/cluster/test_tensor_parallel.py is, in fp32).
        "requests_with_identical_tokens": sum(a == b for a, b in zip(tp1["tokens"], tp2["tokens"])),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
