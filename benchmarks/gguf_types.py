"""The GGUF types people download, each kept packed, against llama.cpp's own binaries on the same file.

For each type (files written by llama.cpp's `llama-quantize` in its own mix of tensor types:
benchmarks/gguf_models.py), at a model shape (`135m`: the embedded SmolLM2; `1b`, `8b`:
random weights at Llama-3.2-1B / Llama-3.1-8B shape), the same threads on both sides:

- semline, `quantization: auto` (the file's blocks kept packed), in a fresh process: load time
  (the file already in the page cache and indexed) against reading it once, and peak RSS
  growth over the load against the file's size; decode rate (output tokens per second after
  the first token) at batch 1, 8 and 32; prefill rate of one 512-token prompt; decode after a
  2,000-token context; the roofline of a single-stream step (the weight bytes it streams at
  the machine's read bandwidth, measured in the same process);
- llama.cpp: `llama-bench` tg128 (run just before and just after semline's process: their mean;
  semline's single stream is the median of three runs at its start and three at its end),
  pp512 and tg64 after a 2,000-token context (`-d 2000`), and
  `llama-batched-bench` for decode at 8 and 32 sequences (its S_TG: all sequences' tokens per
  second of generation);
- with --perplexity (trained weights only: 135m): llama-perplexity's computation (512-token
  chunks, the second half of each scored) through semline and through `llama-perplexity`
  on tests/data/public_domain.txt, and semline on the file's float weights (quantization none).

Targets (issue 34): single stream >= 1.3x llama-bench tg128 (135m: every type; 1B: Q4_K_M, Q6_K,
Q8_0), >= 2x at batch 8, prefill >= 3x pp512, >= 60 % of the roofline single stream at 1B;
perplexity within 1 % of llama.cpp's; load <= 2x a cached read, peak RSS <= 1.2x the file.
Writes benchmarks/results/gguf_types[_SHAPE].json with the CPU flags and the commit.

    .venv/bin/python benchmarks/gguf_types.py [--shape 135m] [--types Q4_K_M,Q5_K_M,Q6_K,Q8_0]
        [--threads 2] [--perplexity] [--no-llama-cpp]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_info, read_bandwidth_gbs  # noqa: E402
from benchmarks.gguf_models import llama_cpp_bin, llama_cpp_build, model_file, run_llama_cpp  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "public_domain.txt"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def read_seconds(path: Path) -> float:
    """Seconds to read the file once from the page cache (after a read that puts it there)."""
    for _ in range(2):
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
        seconds = time.perf_counter() - start
    return seconds


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def semline_worker(path: Path, threads: int, batches: list[int], tokens: int, perplexity: bool) -> dict:
    """Everything measured inside one fresh process (printed as JSON by --worker)."""
    import torch

    torch.set_num_threads(threads)
    from engine import LLM, SamplingParams
    from engine.kernels import load_paged_attention
    from engine.loader import resolve_model_dir
    from engine.config import EngineConfig
    from benchmarks.decode import streamed_bytes
    from engine.quantization import layer_kinds

    load_paged_attention()  # the extension compiled and loaded: not a load's cost
    import transformers.models.llama  # noqa: F401  the libraries' code: memory of no file's
    from transformers import AutoTokenizer  # noqa: F401
    resolve_model_dir(str(path), EngineConfig().resolve_cache_dir())  # the file indexed once: neither
    result: dict = {"file_mib": path.stat().st_size / 2**20, "read_s": read_seconds(path)}
    before = rss_mib()
    start = time.perf_counter()
    llm = LLM(model=str(path), quantization="auto", max_num_seqs=max(batches), max_model_len=4096)
    result["load_s"] = time.perf_counter() - start
    # Peak RSS over the load (the process's high-water mark: nothing before it came close).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["load_peak_rss_growth_mib"] = peak - before
    result["rss_after_load_growth_mib"] = rss_mib() - before
    model = llm.engine.runner.model
    result["layers"] = layer_kinds(model)
    step_bytes = streamed_bytes(model)
    result["weight_bytes_per_step"] = step_bytes
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm up
    decode = {}
    first_runs: list[float] = []
    for batch in batches:  # the median of three runs (a shared VM's bandwidth moves between runs)
        rates = []
        for run in range(3):
            outs = llm.generate([f"{PROMPT} ({run}, {i})" for i in range(batch)], params)
            rates.append(batch / statistics.median(o.metrics.time_per_output_token for o in outs))
        decode[str(batch)] = statistics.median(rates)
        if batch == 1:
            first_runs = rates
    result["decode_tok_s"] = decode
    bandwidth = read_bandwidth_gbs()
    result["read_bandwidth_gbs"] = bandwidth
    result["roofline_tok_s"] = bandwidth * 1e9 / step_bytes
    result["roofline_fraction_1"] = decode["1"] / result["roofline_tok_s"]
    tokenizer = llm.engine.tokenizer
    ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    long = (ids * (4000 // len(ids) + 1))
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rates = []
    for offset in range(3):  # three distinct prompts: no prefix cache hit
        start = time.perf_counter()
        llm.generate([long[offset * 7: offset * 7 + 512]], one)
        rates.append(512 / (time.perf_counter() - start))
    result["prefill_512_tok_s"] = max(rates)
    out = llm.generate([long[1000:3000]], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))[0]
    result["decode_after_2000_tok_s"] = 1 / out.metrics.time_per_output_token
    # The single stream again, a minute later: the median of all six runs is the figure (the
    # shared VM's read bandwidth moves by half between minutes).
    again = [1 / llm.generate([f"{PROMPT} (again {run})"], params)[0].metrics.time_per_output_token
             for run in range(3)]
    result["decode_1_runs_tok_s"] = first_runs + again
    decode["1"] = statistics.median(first_runs + again)
    if perplexity:
        result["perplexity"] = engine_perplexity(llm)
        del llm
        result["perplexity_float"] = engine_perplexity(LLM(model=str(path), quantization="none", max_num_seqs=4))
    return result


def engine_perplexity(llm, n_ctx: int = 512) -> float:
    """llama-perplexity's computation: the text in chunks of n_ctx tokens (the tokenizer's own
    special tokens; SmolLM2 adds no BOS), each chunk's second half scored."""
    ids = llm.engine.tokenizer.encode(TEXT.read_text(), add_special_tokens=True)
    nll, count = 0.0, 0
    for c in range(len(ids) // n_ctx):
        logprobs = llm.engine.score(ids[c * n_ctx:(c + 1) * n_ctx], chunk_size=n_ctx)
        part = logprobs[n_ctx // 2: n_ctx - 1]
        nll -= sum(part)
        count += len(part)
    return math.exp(nll / count)


def llama_bench(path: Path, threads: int) -> dict:
    out = run_llama_cpp("llama-bench", "-m", str(path), "-t", str(threads), "-p", "512", "-n", "128", "-r", "3",
                        "-o", "json").stdout
    deep = run_llama_cpp("llama-bench", "-m", str(path), "-t", str(threads), "-p", "0", "-n", "64", "-d", "2000",
                         "-r", "2", "-o", "json").stdout
    result = {}
    for row in json.loads(out) + json.loads(deep):
        if row["n_prompt"] == 512 and row["n_gen"] == 0:
            result["pp512_tok_s"] = row["avg_ts"]
        elif row["n_gen"] == 128:
            result["tg128_tok_s"] = row["avg_ts"]
        elif row["n_gen"] == 64 and row.get("n_depth") == 2000:
            result["tg64_after_2000_tok_s"] = row["avg_ts"]
    return result


def llama_tg(path: Path, threads: int) -> float:
    out = run_llama_cpp("llama-bench", "-m", str(path), "-t", str(threads), "-p", "0", "-n", "128", "-r", "3",
                        "-o", "json").stdout
    return json.loads(out)[0]["avg_ts"]


def llama_batched(path: Path, threads: int, batches: list[int]) -> dict:
    """llama-batched-bench: `batch` sequences of a 32-token prompt generating 64 tokens each;
    its S_TG (generated tokens per second over all sequences) per batch."""
    wide = [b for b in batches if b > 1]
    if not wide:
        return {}
    out = run_llama_cpp("llama-batched-bench", "-m", str(path), "-t", str(threads), "-c", str(96 * max(wide)),
                        "-npp", "32", "-ntg", "64", "-npl", ",".join(map(str, wide)), "-b", "2048", "-ub", "512",
                        timeout=1800).stdout
    rates = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit() and cells[2].isdigit():
            # PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s
            rates[cells[2]] = float(cells[7])
    return rates


def llama_perplexity(path: Path, threads: int) -> float:
    out = run_llama_cpp("llama-perplexity", "-m", str(path), "-f", str(TEXT), "-c", "512", "-t", str(threads))
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="135m", choices=["135m", "1b", "8b"])
    parser.add_argument("--types", default="Q4_K_M,Q5_K_M,Q6_K,Q8_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--perplexity", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--output", help="result file (default: results/gguf_types[_SHAPE].json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        print(json.dumps(semline_worker(Path(args.worker), args.threads, batches, args.tokens, args.perplexity)))
        return
    results = {"machine": machine_info(), "shape": args.shape, "threads": args.threads, "types": {}}
    if not args.no_llama_cpp:
        results["llama_cpp_build"] = llama_cpp_build(llama_cpp_bin())
    for kind in args.types.split(","):
        path = model_file(args.shape, kind)
        print(f"== {args.shape} {kind}: {path.name} ({path.stat().st_size / 2**20:.0f} MiB)", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        # llama-bench's single stream just before and just after semline's run, averaged.
        before = None if args.no_llama_cpp else llama_tg(path, args.threads)
        worker = subprocess.run([sys.executable, __file__, "--worker", str(path), "--threads", str(args.threads),
                                 "--batches", args.batches, "--tokens", str(args.tokens)]
                                + (["--perplexity"] if args.perplexity else []),
                                env=env, check=True, capture_output=True, text=True)
        entry = {"semline": json.loads(worker.stdout.strip().splitlines()[-1])}
        if not args.no_llama_cpp:
            peer = llama_bench(path, args.threads)
            peer["tg128_tok_s_around_semline"] = [before, peer["tg128_tok_s"]]
            peer["tg128_tok_s"] = (before + peer["tg128_tok_s"]) / 2
            peer["batched_tg_tok_s"] = llama_batched(path, args.threads, batches)
            if args.perplexity:
                peer["perplexity"] = llama_perplexity(path, args.threads)
            entry["llama_cpp"] = peer
            ours = entry["semline"]
            entry["ratios"] = {
                "decode_1_vs_tg128": ours["decode_tok_s"]["1"] / peer["tg128_tok_s"],
                "prefill_512_vs_pp512": ours["prefill_512_tok_s"] / peer["pp512_tok_s"],
                "decode_after_2000_vs_tg64_d2000": ours["decode_after_2000_tok_s"] / peer["tg64_after_2000_tok_s"],
                **{f"decode_{b}_vs_batched": ours["decode_tok_s"][b] / rate
                   for b, rate in peer["batched_tg_tok_s"].items() if b in ours["decode_tok_s"]},
            }
            if args.perplexity:
                entry["ratios"]["perplexity_vs_llama_cpp"] = ours["perplexity"] / peer["perplexity"]
        results["types"][kind] = entry
        print(json.dumps(entry, indent=1), flush=True)
    RESULTS.mkdir(exist_ok=True)
    name = "gguf_types.json" if args.shape == "135m" else f"gguf_types_{args.shape}.json"
    output = Path(args.output) if args.output else RESULTS / name
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
