"""Real chat templates of the families semline serves, for tests that need a model's own
template (a reasoning model's, a tool-calling one's) without downloading from a model hub:
llama.cpp keeps them in its sources (models/templates/), which the llama-cpp-python sdist
vendors. That sdist is the one benchmarks/build_llama_cpp.sh builds llama.cpp's binaries
from: read from its cache when there, else fetched from the package index the same way (~4 s)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

BUILD_SCRIPT = Path(__file__).parents[1] / "benchmarks" / "build_llama_cpp.sh"


def llama_cpp_template(name: str) -> str:
    """The template llama.cpp's sources hold as models/templates/<name>.jinja."""
    version = re.search(r"^VERSION=(\S+)$", BUILD_SCRIPT.read_text(), re.M).group(1)
    cache = Path(os.environ.get("SEMLINE_CACHE") or Path.home() / ".cache" / "semline") / "llama.cpp"
    member = f"llama_cpp_python-{version}/vendor/llama.cpp/models/templates/{name}.jinja"
    if (cache / member).is_file():
        return (cache / member).read_text()
    sdist = cache / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(sdist.parent)], check=True)
    with tarfile.open(sdist) as tar:
        return tar.extractfile(member).read().decode()
