"""Streams at engine speed: `semline serve` against the engine alone and llama.cpp's server.

One workload, three servers, on the same GGUF (the embedded SmolLM2-135M Q4_1) and the same
threads: chat requests of ~160 prompt tokens asking for 128 output tokens (EOS ignored),
sent by a closed loop of C clients (each sends its next request when its last one ends) at
concurrency 1, 16 and 64, streamed and not.

- semline: `semline serve` (its default config; --stream-interval-ms overrides the server's
  stream_interval_ms), started here on a free port, as a user would.
- engine: the same engine in this process (AsyncEngine, quantization auto), no HTTP: the
  ceiling the service is measured against.
- llama-server: llama.cpp's own server, built from the sources the llama-cpp-python sdist
  vendors (benchmarks/build_llama_cpp.sh), `-t THREADS -np 64`, continuous batching on.

The client is one asyncio process (httpx), light on purpose: on 2 cores a heavy client takes
a core from the server. Per run: output tokens/s (all requests' output tokens / wall time),
TTFT p50/p99 (first content chunk), time between chunks p50/p99 (consecutive content chunks
of one stream). Then, against semline only, one chat request of 1 MiB sent while 16 streams
run: its answer and how long the streams' chunks waited while it was in flight. Writes
benchmarks/results/streaming.json with the commit and CPU flags.

    .venv/bin/python benchmarks/streaming.py [--concurrency 1 16 64] [--threads 2] [--skip llama-server]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402
from benchmarks.gguf_models import llama_cpp_bin, llama_cpp_build  # noqa: E402
from deployments.cli import free_port  # noqa: E402
from engine.metrics import percentile  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = "SmolLM2-135M-Instruct"
TEXT = (ROOT / "tests" / "data" / "public_domain.txt").read_text().split()


def messages(i: int, prompt_words: int) -> list[dict]:
    """A distinct ~160-token conversation per request number (words from a public-domain text,
    after the number: each run numbers its requests apart, so no run finds its prompts in a
    prefix cache beyond the shared system prompt)."""
    start = (i * 37) % max(1, len(TEXT) - prompt_words)
    return [{"role": "system", "content": "You are a helpful assistant. Answer at length."},
            {"role": "user", "content": f"[{i}] Summarise this passage: " + " ".join(TEXT[start:start + prompt_words])}]


def num_requests(concurrency: int) -> int:
    return max(4, 2 * concurrency) if concurrency < 64 else concurrency


def summarize(results: list[dict], wall: float) -> dict:
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "errors": sum(1 for r in results if r["error"]),
        "error_messages": sorted({r["error"] for r in results if r["error"]})[:3],
        "output_tokens": tokens,
        "seconds": round(wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": _round(percentile(ttfts, 50)),
        "ttft_p99_s": _round(percentile(ttfts, 99)),
        "chunk_gap_p50_ms": _round(percentile(gaps, 50), 1000),
        "chunk_gap_p99_ms": _round(percentile(gaps, 99), 1000),
        "chunks_per_request": round(sum(len(r["gaps"]) + 1 for r in results if r["ttft"]) / max(1, len(ttfts)), 1),
    }


def _round(value, scale: float = 1.0):
    return None if value is None else round(value * scale, 4)


_RUNS = iter(range(1, 1 << 30))


async def closed_loop(concurrency: int, total: int, send) -> dict:
    """`concurrency` clients sending `total` requests between them, each the next when its last ended
    (request numbers of their own: see messages)."""
    first = next(_RUNS) * 1000
    counter = iter(range(first, first + total))
    results: list[dict] = []

    async def client():
        for i in counter:
            results.append(await send(i))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return summarize(results, time.perf_counter() - start)


async def warm_up(send, args) -> None:
    """One unmeasured wave at the largest concurrency: the first use of KV-cache memory (pages
    the kernel maps on first touch) and of each batch shape costs more than later ones, and
    would be charged to whichever run came first."""
    top = max(args.concurrency)
    await closed_loop(top, top, send)


def note_chunk(result: dict, start: float, last: float | None) -> float:
    """A content chunk arrived: the first is the TTFT, each later one a gap since the last.
    Returns its time."""
    now = time.perf_counter()
    if last is None:
        result["ttft"] = now - start
    else:
        result["gaps"].append(now - last)
    return now


# --- HTTP servers (semline serve, llama-server): one OpenAI chat client ---------------------


async def http_request(http: httpx.AsyncClient, i: int, stream: bool, args, timeline: list | None = None) -> dict:
    body = {"model": MODEL, "messages": messages(i, args.prompt_words), "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    result = {"ttft": None, "gaps": [], "tokens": 0, "error": None}
    try:
        if not stream:
            reply = await http.post("/v1/chat/completions", json=body)
            reply.raise_for_status()
            result["ttft"] = time.perf_counter() - start  # the whole answer
            result["tokens"] = reply.json()["usage"]["completion_tokens"]
            return result
        last = None
        async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
            reply.raise_for_status()
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result["tokens"] = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                    last = note_chunk(result, start, last)
                    if timeline is not None and result["gaps"]:
                        timeline.append((last, result["gaps"][-1]))
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        result["error"] = repr(exc)
    return result


async def large_prompt(http: httpx.AsyncClient, args) -> dict:
    """16 streams, and one chat request of `args.large_prompt_mib` MiB sent 3 s into them (when
    they all decode: their first tokens come within ~2 s here): how long the large request
    took to be answered (a context-length 400 for the default model), and the longest time
    between two chunks of any stream whose wait overlapped it, less the streams' median time
    between chunks: the delay it added (the issue's target: at most 100 ms)."""
    streams, results, marks = 16, [], {}
    timeline: list[tuple[float, float]] = []  # (chunk time, gap before it) of every stream

    async def stream(i: int) -> None:
        result = await http_request(http, i, True, args, timeline)
        results.append(result)

    async def large() -> None:
        await asyncio.sleep(3.0)
        text, size = " ".join(TEXT) + " ", args.large_prompt_mib * 2**20
        body = {"model": MODEL, "messages": [{"role": "user", "content": (text * (size // len(text) + 1))[:size]}],
                "max_tokens": 8, "stream": True}
        marks["sent"] = time.perf_counter()
        reply = await http.post("/v1/chat/completions", json=body)
        marks["answered"] = time.perf_counter()
        marks["status"], marks["answer"] = reply.status_code, reply.text[:200]

    first = next(_RUNS) * 1000
    start = time.perf_counter()
    await asyncio.gather(large(), *(stream(first + i) for i in range(streams)))
    during = [gap for at, gap in timeline if at >= marks["sent"] and at - gap <= marks["answered"]]
    before = [gap for at, gap in timeline if at < marks["sent"]]
    typical = percentile([gap for _, gap in timeline], 50)
    return {"prompt_mib": args.large_prompt_mib, "status": marks["status"], "answer": marks["answer"],
            "added_delay_ms": _round(max(during) - typical, 1000) if during and typical else None,
            "answered_after_s": round(marks["answered"] - marks["sent"], 3),
            "max_chunk_gap_while_in_flight_ms": _round(max(during, default=None), 1000),
            "chunk_gaps_while_in_flight": len(during),
            "max_chunk_gap_before_ms": _round(max(before, default=None), 1000),
            "chunk_gap_p50_ms": _round(typical, 1000),
            "streams": summarize(results, time.perf_counter() - start)}


async def run_http(url: str, args, large: bool = False) -> dict:
    runs = {}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await warm_up(lambda i: http_request(http, i, True, args), args)
        for concurrency in args.concurrency:
            for stream in (True, False):
                name = f"c{concurrency}_{'streamed' if stream else 'not_streamed'}"
                runs[name] = await closed_loop(concurrency, num_requests(concurrency),
                                               lambda i, s=stream: http_request(http, i, s, args))
                print(name, runs[name], flush=True)
        if large and args.large_prompt_mib:
            runs["large_prompt"] = await large_prompt(http, args)
            print("large_prompt", runs["large_prompt"], flush=True)
    return runs


def wait_until_up(url: str, process: subprocess.Popen, path: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}) before it answered {path}")
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"no answer from {url}{path} within {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def run_semline(args) -> dict:
    port = free_port()
    config = {"server": {"stream_interval_ms": args.stream_interval_ms}, "http": {"port": port},
              "metrics_export_port": free_port()}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(config, f)  # YAML is a superset of JSON
    log = open(RESULTS / "streaming_semline.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve", "--config", f.name], cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, "/health")
        return {"config": config, "runs": asyncio.run(run_http(url, args, large=True))}
    finally:
        stop(process)
        os.unlink(f.name)


def run_llama_server(args) -> dict:
    from engine.loader import embedded_gguf_path

    build = llama_cpp_bin(args.llama_build)
    slots = max(args.concurrency)
    port = free_port()
    command = [f"{build}/llama-server", "-m", str(embedded_gguf_path()), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(args.threads), "-tb", str(args.threads), "-np", str(slots), "-c", str(slots * 384),
               "--alias", MODEL]
    log = open(RESULTS / "streaming_llama_server.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, "/health")
        return {"command": " ".join(command[1:]), "build": llama_cpp_build(build), "runs": asyncio.run(run_http(url, args))}
    finally:
        stop(process)


# --- the engine alone, in this process ---------------------------------------------------


def run_engine(args) -> dict:
    import torch

    from engine import AsyncEngine, EngineConfig, SamplingParams
    from engine.llm import apply_chat_template

    torch.set_num_threads(args.threads)
    engine = AsyncEngine(EngineConfig(num_threads=args.threads))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True, output_kind="delta")

    async def request(i: int, stream: bool) -> dict:
        prompt = apply_chat_template(engine.tokenizer, messages(i, args.prompt_words))
        start, last = time.perf_counter(), None
        result = {"ttft": None, "gaps": [], "tokens": 0, "error": None}
        async for out in engine.generate(prompt, params):
            if stream and out.delta_text:
                last = note_chunk(result, start, last)
            if out.finished:
                result["tokens"] = len(out.token_ids)
        if not stream:
            result["ttft"] = time.perf_counter() - start
        return result

    async def main() -> dict:
        runs = {}
        await warm_up(lambda i: request(i, True), args)
        for concurrency in args.concurrency:
            for stream in (True, False):
                name = f"c{concurrency}_{'streamed' if stream else 'not_streamed'}"
                runs[name] = await closed_loop(concurrency, num_requests(concurrency),
                                               lambda i, s=stream: request(i, s))
                print("engine", name, runs[name], flush=True)
        return runs

    try:
        return {"config": dataclass_fields(engine.engine.config), "runs": asyncio.run(main())}
    finally:
        engine.shutdown()


def dataclass_fields(config) -> dict:
    return {k: v for k, v in vars(config).items() if k in ("quantization", "dtype", "max_num_seqs",
                                                          "max_num_batched_tokens", "num_threads")}


def ratios(result: dict) -> dict:
    out = {}
    semline = result["servers"].get("semline", {}).get("runs", {})
    engine = result["servers"].get("engine", {}).get("runs", {})
    llama = result["servers"].get("llama_server", {}).get("runs", {})
    for name, run in semline.items():
        concurrency = name.split("_")[0]
        if not name.endswith("_not_streamed") and f"{concurrency}_not_streamed" in semline:
            out[f"{concurrency}_streamed_vs_not_streamed"] = round(
                run["output_tokens_per_s"] / semline[f"{concurrency}_not_streamed"]["output_tokens_per_s"], 3)
        if name in engine:
            out[f"{name}_vs_engine"] = round(run["output_tokens_per_s"] / engine[name]["output_tokens_per_s"], 3)
        if name in llama:
            out[f"{name}_vs_llama_server"] = round(run["output_tokens_per_s"] / llama[name]["output_tokens_per_s"], 3)
            if run["ttft_p50_s"] and llama[name]["ttft_p50_s"]:
                out[f"{name}_ttft_p50_vs_llama_server"] = round(run["ttft_p50_s"] / llama[name]["ttft_p50_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=110, help="words of text in each prompt (~160 tokens)")
    parser.add_argument("--stream-interval-ms", type=float, default=20.0, help="semline's server.stream_interval_ms")
    parser.add_argument("--llama-build", choices=["native", "noamx"],
                        help="llama.cpp build (default: build_llama_cpp.sh's, noamx on a CPU that lists AMX)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["semline", "engine", "llama-server"])
    parser.add_argument("--large-prompt-mib", type=int, default=1,
                        help="after semline's runs: one prompt of this many MiB sent while 16 streams run (0: none)")
    parser.add_argument("--output", default=str(RESULTS / "streaming.json"))
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": "streaming", "machine": machine_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "workload": {"prompt_words": args.prompt_words, "max_tokens": args.max_tokens,
                           "concurrency": args.concurrency, "threads": args.threads,
                           "requests": {c: num_requests(c) for c in args.concurrency}},
              "servers": {}}
    runners = {"engine": run_engine, "semline": run_semline, "llama-server": run_llama_server}
    for name, run in runners.items():
        if name not in args.skip:
            result["servers"][name.replace("-", "_")] = run(args)
    result["ratios"] = ratios(result)
    result["targets"] = {"streamed_vs_not_streamed": 0.9, "semline_vs_engine": 0.9,
                         "c16_streamed_vs_llama_server": 3.0, "ttft_p50_vs_llama_server": 0.25,
                         "large_prompt_added_delay_ms": 100}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
