"""Decode speed of every dtype and quantization against Hugging Face and llama.cpp, in one run.

The embedded SmolLM2-135M (a Q4_1 GGUF) decodes 64 greedy tokens after a short prompt:
- semline at batch 1, 8 and 32 (all requests at once) in float32, bfloat16, int8
  (float32 activations), w8a8, int4 (quantized at load from the float weights) and `auto`
  (the GGUF's own 4-bit blocks kept), with 2 threads; the quantized ones in the dtype
  `dtype: auto` picks on this CPU (bfloat16 with AVX512-BF16/AMX, else float32), named by it;
- the int4 configuration again with the weights and KV cache on 4 KiB pages
  (cpu_huge_pages off: the previous path), named ".../4k_pages";
- Hugging Face `generate` on transformers' own conversion of the file, one request, float32 and bfloat16;
- llama.cpp's own `llama-bench` (built natively, with the other binaries, by
  benchmarks/build_llama_cpp.sh from the sources the `llama-cpp-python` sdist vendors; the
  AMX-off build on a CPU that lists AMX, whose tiles a kernel may refuse) on the very GGUF
  file, tg of the same number of tokens and the same threads: the peer the targets compare
  with; and, labelled as such, its Python binding (`llama-cpp-python`, `pip install -e
  '.[bench]'`), whose Python loop ran the same file at less than half llama-bench's rate;
- one request after a long prompt (--long-context, 2000 tokens of tests/data), semline in
  every configuration and llama.cpp (llama-bench `-d`, the binding on the same tokens),
  where each step also reads the whole K/V cache (its roofline counts those bytes too).

Decode rate = output tokens per second after the first token (the time per output
token), so prompt processing is left out on every side. Beside each semline run:
the roofline, i.e. the weight bytes a decode step streams (every linear layer and the
head, as stored) against the machine's read bandwidth (a reduction over 1 GiB) measured
just before and after that run (it moves between runs on a shared VM; the run's start
figure and a copy's rate are recorded too), and at batch 32 the fraction of the dtype's
measured matrix-product rate the step's FLOPs reach.
Also timed: every compiled path of the W4A8/W8A8 kernels (scalar, AVX2, AVX512-VNNI)
over the model's own quantized layers, so the AVX2 path has a number on any machine, and
the step's 4-bit products called one by one against the same bytes as one product (what
the step loses to starting and ending ~120 short products; --kernels-only runs just these), and
the decode attention kernel alone at batch 32 x 200 keys and 1 x 2000, blocks consecutive and
scattered.
The other GGUF types (Q4_K_M, Q5_K_M, Q6_K, Q8_0) at 135M, 1B and 8B, against llama-bench,
llama-batched-bench and llama-perplexity: benchmarks/gguf_types.py.
Targets (issue 16): single stream >= 1.5x llama.cpp and >= 50 % of the bandwidth bound;
batch 32 >= 50 % of the compute bound. Writes benchmarks/results/decode.json with the
CPU flags and the commit.

    .venv/bin/python benchmarks/decode.py [--threads 2] [--tokens 64] [--kernels-only]
        [--bandwidth-sweep MINUTES] [--pages-sweep MINUTES]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import copy_bandwidth_gbs, machine_info, matmul_flops, read_bandwidth_gbs  # noqa: E402
from benchmarks.throughput import _StepClock  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.loader import embedded_gguf_path, hf_folder  # noqa: E402
from engine.models.linear import OneDNNLinear  # noqa: E402
from engine.quantization import (CpuInt4Linear, CpuInt8Linear, CpuW8A8Linear, PackedEmbedding,  # noqa: E402
                                WeightOnlyInt8Linear)

RESULTS = Path(__file__).parent / "results"
TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "public_domain.txt"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# (dtype, quantization, weights and KV cache on huge pages)
CONFIGS = [("float32", "none", True), ("bfloat16", "none", True), ("float32", "int8", True), ("auto", "w8a8", True),
           ("auto", "int4", True), ("auto", "auto", True), ("auto", "int4", False)]


def streamed_bytes(model: nn.Module) -> int:
    """Bytes of weights a decode step reads: every matrix of the linear layers and the head,
    as stored (packed, int8 or int4 with their scales); embedding rows are a few lookups (an
    untied packed embedding's own table too)."""
    tables = {id(m.table) for m in model.modules() if isinstance(m, PackedEmbedding) and hasattr(m, "table")}
    total = 0
    for module in model.modules():
        if id(module) in tables:
            continue
        if isinstance(module, nn.Linear):
            tensors = [module.weight]
        elif isinstance(module, OneDNNLinear):
            tensors = [module.packed_weight]
        elif isinstance(module, (CpuInt8Linear, WeightOnlyInt8Linear)):
            tensors = [module.qweight, module.scales]
        elif isinstance(module, (CpuInt4Linear, CpuW8A8Linear)):
            tensors = module.weight_buffers
        else:
            continue
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def kernel_paths(model: nn.Module, rows_list=(1, 32), seconds: float = 0.5) -> dict:
    """Every compiled path of the W4A8 and W8A8 kernels (scalar, AVX2, AVX512-VNNI: the ones an
    AVX2-only or older CPU would run) over the model's own quantized layers, in sequence as a
    decode step calls them: weight GB/s and GFLOP/s at 1 and 32 activation rows."""
    q4 = [m for m in model.modules() if isinstance(m, CpuInt4Linear) and m.kernel is not None]
    q8 = [m for m in model.modules() if isinstance(m, CpuW8A8Linear)]
    out = {}
    for name, layers, call in (
            ("w4a8", q4, lambda m, x, path: m.kernel.q4_linear(x, m.q4_packed, m.out_features, None, path)),
            ("w8a8", q8, lambda m, x, path: m.kernel.q8_linear(x, m.q8_packed, m.scales, None, path))):
        if not layers:
            continue
        nbytes = sum(t.numel() * t.element_size() for m in layers for t in m.weight_buffers)
        flops_per_row = 2 * sum(m.in_features * m.out_features for m in layers)
        for path, label in enumerate(layers[0].kernel.q4_paths()):
            for rows in rows_list:
                if label == "scalar" and rows > 1:
                    continue  # minutes per pass; one row says enough
                xs = {m.in_features: torch.randn(rows, m.in_features, dtype=torch.bfloat16) for m in layers}
                elapsed = seconds_per_pass(lambda: [call(m, xs[m.in_features], path) for m in layers], seconds)
                out[f"{name}/{label}/rows{rows}"] = {"weight_gbs": round(nbytes / elapsed / 1e9, 1),
                                                     "gflops": round(flops_per_row * rows / elapsed / 1e9, 1)}
    if q4:
        out.update(one_product(q4, seconds))
    return out


def seconds_per_pass(call, seconds: float) -> float:
    """call() once to warm up, then as many times as fit in `seconds` (at least once): its mean time."""
    call()
    passes, start = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - start < seconds:
        call()
        passes += 1
    return (time.perf_counter() - start) / passes


def one_product(layers: list[nn.Module], seconds: float) -> dict:
    """What the step's many short products cost at one row: the W4A8 layers that share the
    most common input width, called one after another as a step calls them, against their
    blocks joined into one matrix and multiplied in one call (the same bytes, one stream per
    thread instead of one per product), on 2 threads and on 1."""
    width = statistics.mode(m.in_features for m in layers)
    same = [m for m in layers if m.in_features == width]
    joined = torch.cat([m.q4_packed for m in same])
    rows = joined.shape[0] * 16
    kernel = same[0].kernel
    x = torch.randn(1, width, dtype=torch.bfloat16)

    def rate(call) -> float:
        return round(joined.numel() / seconds_per_pass(call, seconds) / 1e9, 1)

    out, threads = {}, torch.get_num_threads()
    for n in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        out[f"w4a8/best/rows1/threads{n}"] = {
            "layers": len(same), "mb": round(joined.numel() / 1e6, 1),
            "separate_calls_gbs": rate(lambda: [kernel.q4_linear(x, m.q4_packed, m.out_features) for m in same]),
            "one_call_gbs": rate(lambda: kernel.q4_linear(x, joined, rows)),
            "read_bandwidth_gbs": round(read_bandwidth_gbs(), 1)}
    torch.set_num_threads(threads)
    return out


def kv_bytes_per_step(llm: LLM, context: int) -> int:
    """Bytes of K and V one decode step reads at `context` keys: every layer's, as cached."""
    runner = llm.engine.runner
    k_cache = runner.kv_caches[0][0]
    per_token = k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size() * 2  # K and V
    return len(runner.kv_caches) * context * per_token


def long_prompt(tokenizer, context: int) -> list[int]:
    """The first `context` tokens of tests/data/public_domain.txt (repeated if it is shorter)."""
    ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    return (ids * (context // len(ids) + 1))[:context]


def semline_long_rate(llm: LLM, prompt: list[int], tokens: int) -> float:
    """One request's decode rate after a long prompt (its attention reads the whole context)."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    return 1 / llm.generate([prompt], params)[0].metrics.time_per_output_token


def semline_rate(llm: LLM, batch: int, tokens: int) -> float:
    """Output tokens per second of `batch` requests decoding together (after their first)."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    outs = llm.generate([f"{PROMPT} ({i})" for i in range(batch)], params)
    tpot = statistics.median(o.metrics.time_per_output_token for o in outs)
    return batch / tpot


def hf_rate(folder: Path, dtype: torch.dtype, tokens: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers import StoppingCriteriaList

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids
    clock = _StepClock()  # records when each token arrives
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([clock]))
    return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def llama_bench_rates(threads: int, tokens: int, depth: int) -> dict | None:
    """llama-bench's decode rate on the same GGUF: tg`tokens` (3 runs), and after a `depth`-token
    context (`-d`, 2 runs) where depth > 0; None where its binaries cannot be built here."""
    import subprocess

    from benchmarks.gguf_models import llama_cpp_bin, llama_cpp_build, run_llama_cpp

    common = ["-m", str(embedded_gguf_path()), "-t", str(threads), "-p", "0", "-n", str(tokens), "-o", "json"]
    try:
        rates = {"build": llama_cpp_build(llama_cpp_bin()),  # native, or noamx on a CPU with AMX
                 "tg": json.loads(run_llama_cpp("llama-bench", *common, "-r", "3").stdout)[0]["avg_ts"]}
        if depth:
            deep = run_llama_cpp("llama-bench", *common, "-r", "2", "-d", str(depth)).stdout
            rates["tg_after_depth"] = json.loads(deep)[0]["avg_ts"]
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError, IndexError) as exc:
        print(f"llama-bench unavailable ({exc}): no llama.cpp binary baseline")
        return None
    return rates


def llama_cpp_rate(threads: int, tokens: int, prompt_ids: list[int] | None = None) -> float | None:
    """llama.cpp's Python binding's greedy decode rate on the same GGUF after PROMPT, or after
    `prompt_ids` (its Python loop; the third column, labelled)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed (pip install -e '.[bench]'): no llama.cpp baseline")
        return None
    n_ctx = 512 if prompt_ids is None else len(prompt_ids) + tokens + 64
    llm = Llama(model_path=str(embedded_gguf_path()), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                verbose=False)
    prompt = llm.tokenize(PROMPT.encode()) if prompt_ids is None else prompt_ids
    rates = []
    for _ in range(2):  # the first run warms up
        llm.reset()
        stamps = []
        for _ in llm.generate(prompt, temp=0.0, top_k=1):  # greedy, past any end-of-text token
            stamps.append(time.perf_counter())
            if len(stamps) == tokens:
                break
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return rates[-1]


def attention_rates(seconds: float = 1.0) -> dict:
    """The decode attention kernel alone over SmolLM2's shapes (9 query heads, 3 KV heads of
    64, 30 layers, caches on 2 MiB pages as the engine's): K/V GB/s at batch 32 x 200 keys
    and one sequence of 2000, its blocks consecutive (a lone stream's) or scattered over the
    cache (a busy server's, after many requests came and went)."""
    from engine import huge_pages
    from engine.kernels import load_paged_attention

    kernel = load_paged_attention()
    out, layers, heads, kv_heads, dim, block = {}, 30, 9, 3, 64, 16
    for dtype in (torch.bfloat16, torch.float32):
        for batch, keys in ((32, 200), (1, 2000)):
            per_seq = -(-keys // block)
            blocks = batch * per_seq
            caches = huge_pages.zeros((blocks, block, kv_heads, dim), dtype, 2 * layers)
            for cache in caches:
                cache.copy_(torch.randn(cache.shape))
            q = torch.randn(batch, heads, dim).to(dtype)
            lens = torch.full((batch,), keys, dtype=torch.long)
            nbytes = 2 * layers * batch * keys * kv_heads * dim * q.element_size()
            for order in ("consecutive", "scattered"):
                ids = torch.arange(blocks) if order == "consecutive" else torch.randperm(blocks)
                tables = ids.view(batch, per_seq)
                elapsed = seconds_per_pass(lambda: [kernel.paged_decode_attention(
                    q, caches[2 * i], caches[2 * i + 1], tables, lens, dim**-0.5) for i in range(layers)], seconds)
                out[f"{str(dtype).removeprefix('torch.')}/batch{batch}x{keys}/{order}"] = {
                    "kv_gbs": round(nbytes / elapsed / 1e9, 1), "ms_30_layers": round(1e3 * elapsed, 2)}
    return out


def kernels_only(threads: int) -> None:
    paths = {}
    for quantization in ("int4", "w8a8"):
        dtype = "bfloat16" if quantization == "int4" else "float32"
        llm = LLM(device="cpu", dtype=dtype, quantization=quantization, num_threads=threads, kv_cache_memory_gb=0.5)
        paths.update(kernel_paths(llm.engine.runner.model))
        del llm
    result = {"benchmark": "decode_kernels", "machine": machine_info(), "threads": threads, "kernel_paths": paths,
              "attention": attention_rates(), "read_bandwidth_gbs": round(read_bandwidth_gbs(), 1)}
    output = RESULTS / "decode_kernels.json"
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def between_reads(run, *args) -> tuple[float, float, float]:
    """run(*args)'s result with the read bandwidth (GB/s) measured just before and just after it."""
    before = read_bandwidth_gbs()
    result = run(*args)
    return result, before, read_bandwidth_gbs()


def bandwidth_sweep(threads: int, tokens: int, minutes: float, configs: dict[str, dict], name: str) -> None:
    """The single stream's roofline ratio across the shared VM's bandwidth moods: for
    `minutes`, each of `configs` (label -> LLM settings) by turns, each run between two
    reads of the bandwidth (they move 40 <-> 75 GB/s within minutes here, and a batch of
    configurations' runs may all land in one mood). Writes results/<name>.json, one row
    per run."""
    llms = {label: LLM(device="cpu", num_threads=threads, kv_cache_memory_gb=0.5, **settings)
            for label, settings in configs.items()}
    step_bytes = {label: streamed_bytes(llm.engine.runner.model) for label, llm in llms.items()}
    for llm in llms.values():
        semline_rate(llm, 1, 8)  # warm-up
    samples, deadline = [], time.time() + 60 * minutes
    while time.time() < deadline:
        for label, llm in llms.items():
            rate, before, after = between_reads(semline_rate, llm, 1, tokens)
            roofline = (before + after) / 2 * 1e9 / step_bytes[label]
            samples.append({"config": label, "read_gbs_before": round(before, 1),
                            "read_gbs_after": round(after, 1), "tokens_per_s": round(rate, 1),
                            "vs_roofline": round(rate / roofline, 3)})
            print(samples[-1], flush=True)
    result = {"benchmark": name, "machine": machine_info(), "threads": threads, "tokens": tokens,
              "configs": configs, "samples": samples}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--long-context", type=int, default=2000,
                        help="also one stream after a prompt this long, its K/V read every step (0: skip)")
    parser.add_argument("--output", default=str(RESULTS / "decode.json"))
    parser.add_argument("--kernels-only", action="store_true",
                        help="only time the quantized kernels' paths over the model's layers (and the "
                             "step's products one by one against one product of the same bytes); writes "
                             "results/decode_kernels.json")
    parser.add_argument("--bandwidth-sweep", type=float, metavar="MINUTES",
                        help="only the single stream (int4 and auto by turns) between bandwidth reads for "
                             "MINUTES; writes results/decode_sweep.json")
    parser.add_argument("--pages-sweep", type=float, metavar="MINUTES",
                        help="only the single stream of int4 with its weights and KV cache on 2 MiB and on "
                             "4 KiB pages by turns, between bandwidth reads, for MINUTES; writes "
                             "results/decode_pages.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.kernels_only:
        kernels_only(args.threads)
        return
    if args.bandwidth_sweep:
        bandwidth_sweep(args.threads, args.tokens, args.bandwidth_sweep,
                        {q: {"dtype": "bfloat16", "quantization": q} for q in ("int4", "auto")}, "decode_sweep")
        return
    if args.pages_sweep:
        bandwidth_sweep(args.threads, args.tokens, args.pages_sweep,
                        {f"int4/{pages}": {"quantization": "int4", "cpu_huge_pages": pages == "2m_pages"}
                         for pages in ("2m_pages", "4k_pages")}, "decode_pages")
        return
    bandwidth = read_bandwidth_gbs() * 1e9
    roofs = {dtype: matmul_flops(getattr(torch, dtype)) for dtype in ("float32", "bfloat16")}
    runs, folder, paths = {}, None, {}
    for dtype, quantization, huge_pages in CONFIGS:
        llm = LLM(device="cpu", dtype=dtype, quantization=quantization, num_threads=args.threads,
                  kv_cache_memory_gb=0.5, cpu_huge_pages=huge_pages)
        folder = hf_folder(llm.config.model, llm.config.resolve_cache_dir())
        semline_rate(llm, 1, 8)  # warm-up
        model = llm.engine.runner.model
        step_bytes = streamed_bytes(model)
        params = llm.engine.runner.args.num_parameters
        dtype = str(llm.engine.runner.dtype).removeprefix("torch.")  # what "auto" chose
        name = f"{dtype}/{quantization}" + ("" if huge_pages else "/4k_pages")
        run = {"streamed_weight_mb": round(step_bytes / 1e6, 1)}
        for batch in args.batches:
            # The VM's bandwidth moves between runs (45-68 GB/s here): the single stream's
            # roofline is taken from reads measured just before and after it.
            if batch == 1:
                rate, before, after = between_reads(semline_rate, llm, 1, args.tokens)
                here = (before + after) / 2
                run["read_bandwidth_gbs"] = round(here, 1)
                run["roofline_tokens_per_s_batch1"] = round(here * 1e9 / step_bytes, 1)
            else:
                rate = semline_rate(llm, batch, args.tokens)
            run[f"batch{batch}_tokens_per_s"] = round(rate, 1)
        run["batch1_vs_roofline"] = round(run["batch1_tokens_per_s"] / run["roofline_tokens_per_s_batch1"], 3)
        if 32 in args.batches:
            roof = roofs["bfloat16" if dtype == "bfloat16" or quantization in ("int4", "w8a8", "auto") else "float32"]
            run["batch32_vs_compute_roof"] = round(run["batch32_tokens_per_s"] * 2 * params / roof, 3)
        if args.long_context:
            prompt = long_prompt(llm.tokenizer, args.long_context)
            semline_long_rate(llm, prompt, 8)  # warm-up
            rate, before, after = between_reads(semline_long_rate, llm, prompt, args.tokens)
            here = (before + after) / 2
            step = step_bytes + kv_bytes_per_step(llm, args.long_context + args.tokens // 2)
            run["long_context_tokens_per_s"] = round(rate, 1)
            run["long_context_streamed_mb"] = round(step / 1e6, 1)
            run["long_context_vs_roofline"] = round(rate / (here * 1e9 / step), 3)
        if quantization in ("int4", "w8a8") and huge_pages:
            paths.update(kernel_paths(model))
        runs[name] = run
        print(name, run, flush=True)
        del llm
    hf = {dtype: round(hf_rate(folder, getattr(torch, dtype), args.tokens), 1) for dtype in ("float32", "bfloat16")}
    print("hf", hf, flush=True)
    bench = llama_bench_rates(args.threads, args.tokens, args.long_context)
    print("llama-bench", bench, flush=True)
    llama = llama_cpp_rate(args.threads, args.tokens)
    print("llama-cpp-python", llama, flush=True)
    llama_long = None
    if args.long_context:
        from transformers import AutoTokenizer

        prompt = long_prompt(AutoTokenizer.from_pretrained(folder), args.long_context)
        llama_long = llama_cpp_rate(args.threads, args.tokens, prompt)
        print("llama-cpp-python long context", llama_long, flush=True)
    best = max((n for n in runs if not n.endswith("/4k_pages")), key=lambda n: runs[n]["batch1_tokens_per_s"])
    # What the huge pages give: each rate over the same configuration's on 4 KiB pages.
    pages_gain = {}
    for name in runs:
        base = name.removesuffix("/4k_pages")
        if base != name and base in runs:
            pages_gain[base] = {key: round(runs[base][key] / runs[name][key], 3) for key in runs[name]
                                if key.endswith("tokens_per_s") and key in runs[base]}
    result = {
        "benchmark": "decode",
        "machine": machine_info(),
        "threads": args.threads,
        "tokens": args.tokens,
        "read_bandwidth_gbs": round(bandwidth / 1e9, 1),
        "copy_bandwidth_gbs": round(copy_bandwidth_gbs(), 1),
        "matmul_gflops": {k: round(v / 1e9, 1) for k, v in roofs.items()},
        "semline": runs,
        # The quantized kernels' every compiled path on this CPU (the AVX2 and scalar ones are
        # what machines without AVX512-VNNI run), over the model's layers, 2 threads.
        "kernel_paths": paths,
        "attention": attention_rates(),
        "hf_generate_batch1_tokens_per_s": hf,
        "llama_bench_build": None if bench is None else bench["build"],
        "llama_bench_batch1_tokens_per_s": None if bench is None else round(bench["tg"], 1),
        "llama_bench_long_context_tokens_per_s": None if bench is None or "tg_after_depth" not in bench
        else round(bench["tg_after_depth"], 1),
        # llama.cpp's Python binding: a third column, not the peer (its loop is the bottleneck).
        "llama_cpp_python_batch1_tokens_per_s": None if llama is None else round(llama, 1),
        "long_context": args.long_context,
        "llama_cpp_python_long_context_tokens_per_s": None if llama_long is None else round(llama_long, 1),
        "huge_pages_vs_4k_pages": pages_gain,
        "best_single_stream": best,
        "best_single_stream_vs_llama_bench": None if bench is None else
        round(runs[best]["batch1_tokens_per_s"] / bench["tg"], 3),
        "auto_single_stream_vs_llama_bench": None if bench is None or "bfloat16/auto" not in runs else
        round(runs["bfloat16/auto"]["batch1_tokens_per_s"] / bench["tg"], 3),
        "targets": {"single_stream_vs_llama_bench": 1.5, "single_stream_vs_roofline": 0.5,
                    "batch32_vs_compute_roof": 0.5},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
