"""What every benchmark result records about where it ran: the CPU (model, cores, the
instruction-set flags that pick kernels), the GPU if any, and the commit measured."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The flags that decide which kernels run (oneDNN, PyTorch's CPU paths, ours).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                "amx_int8")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model, [flag for flag in KERNEL_FLAGS if flag in flags]


def git_commit() -> str:
    """HEAD (with -dirty for uncommitted changes); $SEMLINE_COMMIT where the tree has no .git
    (a copy sent to a GPU machine: benchmarks/gpu_check.sh)."""
    if os.environ.get("SEMLINE_COMMIT"):
        return os.environ["SEMLINE_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict:
    model, flags = cpu_model_and_flags()
    info = {"cpu": model, "cores": os.cpu_count(), "cpu_flags": flags, "torch": torch.__version__,
            "commit": git_commit()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def copy_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes read + written per second by a large tensor copy: the memory bandwidth a decode
    step's weight streaming runs into (the roofline's denominator)."""
    import time

    a = torch.empty(megabytes * 2**20, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() / best / 1e9


def read_bandwidth_gbs(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes read per second by a reduction over a large tensor (median of `repeats` passes
    after a warm one): how fast a decode step can stream its weights, the roofline's
    denominator. A copy's figure (copy_bandwidth_gbs) moved between 39 and 67 GB/s from run to
    run on the same machine; this one stays within a few percent."""
    import statistics
    import time

    a = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    a.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - start)
    return a.numel() * 4 / statistics.median(times) / 1e9


def matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matrix product in `dtype` on this machine (the compute roof)."""
    import time

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
