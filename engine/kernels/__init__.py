"""semline's own CPU kernels, compiled on first use with the host's compiler.

One extension (paged_attention.cpp, int4_gemm.cpp, gguf_pack.cpp, cpu_ops.h): paged decode
attention reading K/V in place through the block tables, fused RMSNorm and rotary, a decode
step's layers in one call (decode_stack.py), the W4A8/W8A8 kernels for 4- and 8-bit weights,
and GGUF blocks packed for them straight from the file.
It is built once per machine (cached under $SEMLINE_CACHE/kernels/<CPU and header key>)
with ninja and the system C++ compiler; when that is impossible the engine falls back to
its PyTorch paths and says so in its log.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name) for name in ("paged_attention.cpp", "int4_gemm.cpp", "gguf_pack.cpp")]


def _ninja() -> str | None:
    """The ninja that builds the extension: this interpreter's (the `ninja` package semline
    depends on) before any other on PATH. Ninja 1.12 changed how .ninja_log hashes commands,
    so two ninjas taking turns on one build folder each found the other's objects stale and
    rebuilt everything (~45 s on 2 cores): the system's 1.11 in a process whose PATH lacks the
    venv, the venv's 1.13 in Ray workers started with it."""
    beside = Path(sys.executable).with_name("ninja")
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("ninja")


def _build_key() -> str:
    """The build folder's name: the CPU's instruction sets, the sources (header included) and
    torch's version. The extension is compiled with -march=native and picks its AVX2/AVX-512/
    VNNI/BF16 paths at compile time, so a cache shared between machines (an NFS home, a Ray
    cluster's nodes) must not hand one CPU's build to another (an illegal instruction); and
    two versions of semline on one machine (two checkouts, two venvs) must not take turns
    rebuilding one folder (torch's own check hashes the .cpp files, but in place: a process
    loading while another rebuilt found no extension)."""
    import hashlib
    import platform

    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    sources = b"".join(path.read_bytes() for path in [*_SOURCES, Path(__file__).with_name("cpu_ops.h")])
    ninja = _ninja()
    ninja = os.path.realpath(ninja) if ninja else ""  # another ninja: a folder of its own (see _ninja)
    return hashlib.sha1(flags.encode() + sources + torch.__version__.encode() + ninja.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def load_paged_attention():
    """The compiled extension module, or None if it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        cache = os.environ.get("SEMLINE_CACHE") or Path.home() / ".cache" / "semline"
        build_dir = Path(cache) / "kernels" / _build_key()
        build_dir.mkdir(parents=True, exist_ok=True)
        ninja, path = _ninja(), os.environ.get("PATH")
        if ninja is not None:  # torch runs `ninja` from PATH: the one _ninja chose, first (while it builds)
            os.environ["PATH"] = os.path.dirname(ninja) + os.pathsep + (path or "")
        try:
            module = load(
                name="semline_paged_attention",
                sources=[str(source) for source in _SOURCES],
                # No contraction into FMAs: the fused RMSNorm and rotary round as PyTorch does.
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
        finally:
            if path is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = path
        module.set_unpack_rows(unpack_rows())
        return module
    except Exception as exc:  # no compiler, no ninja, unsupported platform...
        logger.warning("paged attention kernel unavailable (%s); using the PyTorch path", exc)
        return None


# From this many activation rows (a prefill chunk's tokens), the 4- and 8-bit layers multiply
# bfloat16 activations by their weights unpacked to bfloat16 through torch's matmul, where
# oneDNN runs it on the AMX tiles: on a 2-core Xeon, a 2048 x 8192 layer (unpacking included)
# ran 2.9-3.9x the int8 kernels' rate at 512 rows, 1.4-2.1x at 128, about even at 64.
UNPACK_ROWS_WITH_AMX = 128


def unpack_rows() -> int:
    """Where the packed layers switch to unpacked bfloat16 weights: $SEMLINE_UNPACK_ROWS if set
    (0: never), else UNPACK_ROWS_WITH_AMX on a CPU whose AMX tiles the kernel grants to this
    process, else never (AVX-512 bf16 dot products alone are no faster than the int8 kernels'
    VNNI: not measured here, so not assumed)."""
    configured = os.environ.get("SEMLINE_UNPACK_ROWS")
    if configured:
        return max(int(configured), 0)
    try:
        amx = torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()
    except (AttributeError, RuntimeError):  # a torch without the probes
        amx = False
    return UNPACK_ROWS_WITH_AMX if amx else 0


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's index of its largest value, the first of ties (the first NaN where a row has
    one), as torch.argmax(dim=-1): through the extension's vectorised loop for float32 rows
    on the CPU (torch's reads a 49k-token row at ~7 GB/s: 30 us a row, 0.47 ms a step at
    batch 32; the extension's 7 and 108 us). Every greedy pick (sampler, drafts, verification)
    goes through here."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1]:
        kernel = load_paged_attention()
        if kernel is not None:
            return kernel.argmax_rows(logits)
    return logits.argmax(dim=-1)
