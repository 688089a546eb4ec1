"""Where one decode step's time goes: torch.profiler over engine steps at a fixed batch.

`--batch` requests with short prompts are admitted and prefilled, then `--steps` pure
decode steps are profiled for each attention backend named: the step's wall time,
the host CPU time of the profiled ops (on a GPU: what launching costs), the device
time (CUDA kernels, when on a GPU), and the top ops by self time (CUDA
kernels first on a GPU). Writes a JSON result with the machine and the commit.

    .venv/bin/python benchmarks/profile_step.py [--device cpu] [--dtype float32] [--batch 64]
        [--attention-backend auto triton]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_info  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile_backend(args, backend: str) -> dict:
    llm = LLM(device=args.device, dtype=args.dtype, quantization="none", attention_backend=backend, max_num_seqs=max(64, args.batch))
    engine = llm.engine
    prompt = llm.tokenizer.encode("The production line turns text into tokens, and tokens into text.")
    # Long enough that nobody finishes inside the timed and the profiled steps.
    params = SamplingParams(temperature=0, max_tokens=args.warmup + 2 * args.steps + 8, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(prompt + [i % 100 + 100], params)
    for _ in range(args.warmup):  # prefill everything, warm kernels (and Triton's compiles)
        engine.step()
    _sync(args.device)
    walls = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        _sync(args.device)
        walls.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            engine.step()
        _sync(args.device)
    events = prof.key_averages()
    on_gpu = args.device.startswith("cuda")
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:args.top]
    result = {
        "batch": args.batch,
        "step_ms_p50": 1000 * statistics.median(walls),
        "step_ms_min": 1000 * min(walls),
        "host_cpu_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1000 / args.steps,
        "top": [{"name": e.key[:80], "calls_per_step": e.count / args.steps,
                 "ms_per_step": getattr(e, key, 0) / 1000 / args.steps} for e in top],
    }
    if on_gpu:
        result["device_ms_per_step"] = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1000 / args.steps
    while engine.has_unfinished_requests():
        engine.step()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--attention-backend", nargs="+", default=["auto"])
    parser.add_argument("--output", default=str(RESULTS / "profile_step.json"))
    args = parser.parse_args()
    runs = {}
    for backend in args.attention_backend:
        runs[backend] = run = profile_backend(args, backend)
        print(f"\n{backend}: step {run['step_ms_p50']:.2f} ms p50 at batch {args.batch}, host CPU "
              f"{run['host_cpu_ms_per_step']:.2f} ms/step"
              + (f", device {run['device_ms_per_step']:.2f} ms/step" if "device_ms_per_step" in run else ""))
        for entry in run["top"]:
            print(f"  {entry['ms_per_step']:8.3f} ms  {entry['calls_per_step']:6.1f}x  {entry['name']}")
    report = {"benchmark": "profile_step", "device": args.device, "dtype": args.dtype, "runs": runs,
              "machine": machine_info()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
