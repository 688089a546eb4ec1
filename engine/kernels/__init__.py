"""semline's own CPU kernels, compiled on first use with the host's compiler.

The paged decode-attention kernel reads K/V in place through the block table,
where the pure-PyTorch path must first gather them into a padded buffer. It is
built once per machine (cached under $SEMLINE_CACHE/kernels) with ninja and the
system C++ compiler; when that is impossible the engine falls back to the
PyTorch path and says so in its log.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name) for name in ("paged_attention.cpp", "int4_gemm.cpp")]


@functools.lru_cache(maxsize=1)
def load_paged_attention():
    """The compiled extension module, or None if it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        cache = os.environ.get("SEMLINE_CACHE") or Path.home() / ".cache" / "semline"
        build_dir = Path(cache) / "kernels"
        build_dir.mkdir(parents=True, exist_ok=True)
        return load(
            name="semline_paged_attention",
            sources=[str(source) for source in _SOURCES],
            # No contraction into FMAs: the fused RMSNorm and rotary round as PyTorch does.
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, unsupported platform...
        logger.warning("paged attention kernel unavailable (%s); using the PyTorch path", exc)
        return None
