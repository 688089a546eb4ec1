"""Shared fixtures: the real embedded model, loaded once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One config for every engine in the parity tests: float32 on the CPU (CI has no GPU), the
# GGUF file dequantized (quantization "none": the float reference path; the default, "auto",
# keeps the file's 4-bit layers). SEMLINE_TEST_DEVICE=cuda runs them on a GPU, Hugging
# Face's reference model included.
DEVICE = os.environ.get("SEMLINE_TEST_DEVICE", "cpu")
BASE_CONFIG = {"device": DEVICE, "dtype": "float32", "quantization": "none", "kv_cache_memory_gb": 0.5}
# Without a GPU, Triton kernels (engine/kernels/triton_attention.py) run under Triton's
# interpreter; it must be on before they are first imported.
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def llm():
    from engine import LLM

    return LLM(**BASE_CONFIG)


@pytest.fixture(scope="session")
def make_llm(llm):
    """Build another engine over the same (cached) weights with other settings."""
    from engine import LLM

    def make(**overrides):
        return LLM(**{**BASE_CONFIG, **overrides})

    return make


@pytest.fixture(scope="session")
def tokenizer(llm):
    return llm.tokenizer


@pytest.fixture(scope="session")
def hf_dir(llm):
    """The embedded model as a Hugging Face folder with weights: transformers' own
    dequantization of the GGUF file (the engine reads the file itself)."""
    from engine.loader import hf_folder

    return hf_folder(None, llm.engine.config.resolve_cache_dir())


@pytest.fixture(scope="session")
def hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return model.to(DEVICE).eval()


# --- where the suite's time goes ---------------------------------------------------------------

_MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::")[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Each module's seconds (setup, calls and teardown, session fixtures included where they
    were first set up): the suite should take ~15 minutes on 2 cores, and this says where not."""
    if not _MODULE_SECONDS:
        return
    total = sum(_MODULE_SECONDS.values())
    terminalreporter.section("seconds per module")
    for module, seconds in sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1])[:30]:
        terminalreporter.write_line(f"{seconds:8.1f} s {100 * seconds / total:5.1f} %  {module}")
    terminalreporter.write_line(f"{total:8.1f} s in all")
