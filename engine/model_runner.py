"""Turns a scheduled step into tensors, runs the model, returns logits.

The runner owns the weights and the KV cache tensors; the block manager owns
the accounting. Everything here is per step: one forward for all chunks.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import huge_pages
from engine.attention import (AttentionMetadata, DecodeBatch, build_decode_batch, build_decode_groups,
                              make_prefill_chunk, windowed)
from engine.config import ConfigError, EngineConfig
from engine.gguf_weights import GGUFCheckpoint, keep_gguf_precision, packed_weights
from engine.kernels.decode_stack import DecodeStack
from engine.loader import gguf_source, load_weights
from engine.lora import LoRAAdapter, LoRALinear, LoRAState, LoRAStep, wrap_lora_projections
from engine.models import TruncatedModel, build_model
from engine.models.layers import GatedMLP, MoE, RMSNorm, RotaryEmbedding
from engine.models.linear import OneDNNLinear, onednn_available, onednn_dtypes, prepack_linears
from engine.parallel import TensorParallel
from engine.quantization import CpuInt4Linear, CpuW8A8Linear, quantize_model
from engine.scheduler import ScheduledChunk

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_GB = 2.0
CUDA_KV_CACHE_FRACTION = 0.8


@dataclass
class ModelInput:
    """One step's batch, flattened across sequences."""

    # [T] token ids, chunk after chunk.
    input_ids: torch.Tensor
    # [T] position of each token in its sequence.
    positions: torch.Tensor
    # Attention metadata per window of the model's layers (None: full attention).
    attn: dict[int | None, AttentionMetadata]
    # [N] flat index of the last token of each chunk that samples (chunk order).
    logits_indices: torch.Tensor
    # LoRA: the rows of each adapter slot read (engine/lora.py); None: the base model only.
    lora: LoRAStep | None = None
    # A decode step staged in DecodeGraphs' static buffers, padded to this many rows (0: not).
    graph_size: int = 0
    # Every token decodes (one new token per sequence, no prefill chunk).
    decode_only: bool = False


def kv_bytes_per_block(num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                       num_layers: int) -> int:
    """K and V for `block_size` tokens over `num_layers` layers."""
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


@dataclass
class StepPlan:
    """One step's batch as plain lists: what every pipeline stage needs to build its own
    tensors and attention metadata (picklable, device-free)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    logits_indices: list[int] = field(default_factory=list)
    # Decode tokens: flat index, block table, context length.
    decode_tokens: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)
    # Prefill chunks: (flat start, flat end, tokens already cached, block table).
    prefill: list[tuple[int, int, int, list[int]]] = field(default_factory=list)
    # Logits rows whose argmax is all the driver needs (greedy, no penalties, no logprobs):
    # a pipeline's last stage returns those as token ids instead of vocabulary-wide rows.
    argmax_rows: list[int] = field(default_factory=list)
    # LoRA: (flat start, flat end, slot) of the tokens of requests served by an adapter, and
    # the adapters to put into (or None: take out of) slots before this step runs.
    lora: list[tuple[int, int, int]] = field(default_factory=list)
    lora_updates: dict[int, LoRAAdapter | None] = field(default_factory=dict)

    def add(self, request, start: int, end: int, num_logits: int, block_size: int) -> None:
        """Tokens [start, end) of `request` (its proposed tokens past the end included), with
        logits for the last `num_logits` of them."""
        bs = block_size
        offset = len(self.input_ids)
        self.input_ids += request.token_ids_slice(start, end)
        self.positions += range(start, end)
        if request.lora_slot is not None:
            self.lora.append((offset, offset + end - start, request.lora_slot))
        table = request.block_table
        self.slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
        if end - start == 1:
            self.decode_tokens.append(offset)
            self.decode_tables.append(table[: (end + bs - 1) // bs])
            self.decode_lens.append(end)
        else:
            self.prefill.append((offset, offset + end - start, start, list(table)))
        self.logits_indices += range(len(self.input_ids) - num_logits, len(self.input_ids))


def plan_step(chunks: list[ScheduledChunk], block_size: int) -> StepPlan:
    plan = StepPlan()
    for chunk in chunks:
        start = chunk.request.num_computed_tokens
        plan.add(chunk.request, start, start + chunk.num_new_tokens, chunk.num_logits, block_size)
    return plan


class ModelRunner:
    """The model (or, in a pipeline stage, layers [first_layer, last_layer) of it; under
    tensor parallelism, rank tp.rank's share of those) and the KV cache of its layers.
    `device_share`: the fraction of a CUDA device's memory this runner may use."""

    def __init__(self, config: EngineConfig, hf_config, model_dir: Path, device: torch.device,
                 dtype: torch.dtype, max_model_len: int, first_layer: int = 0, last_layer: int | None = None,
                 tp: TensorParallel = TensorParallel(), device_share: float = 1.0) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.tp = tp
        self.device_share = device_share
        with torch.device("meta"):
            model = build_model(hf_config, first_layer, last_layer, tp)
        self.args = model.args
        # Built on the meta device (no random init), then filled from the checkpoint; the
        # rotary tables are computed outside the meta context.
        model = model.to(dtype=dtype).to_empty(device=device)
        model.set_rotary(hf_config, max_model_len, device)
        # A GGUF file's weights come from the file itself; under `auto` on the CPU its 4-bit
        # and 8-bit layers are never dequantized (their float weights are skipped, then replaced).
        source = gguf_source(config)
        checkpoint = GGUFCheckpoint.open(source, model_dir, hf_config) if source is not None else None
        keep_4bit = checkpoint is not None and config.quantization == "auto" and device.type == "cpu"
        skip = frozenset(packed_weights(model, checkpoint)) if keep_4bit else frozenset()
        parts = model.weight_parts(skip)
        model.load_weights(checkpoint.read(parts, dtype) if checkpoint is not None
                           else load_weights(model_dir, parts, dtype), skip)
        onednn = config.onednn_linear and device.type == "cpu" and dtype in onednn_dtypes() and onednn_available()
        arenas = huge_pages.Arenas() if device.type == "cpu" and config.cpu_huge_pages else None
        if config.quantization in ("int8", "w8a8", "int4"):
            if config.quantization in ("int4", "w8a8") and device.type != "cpu":
                raise ConfigError(f"quantization {config.quantization!r} runs on the CPU (semline's CPU kernels); "
                                  "use int8 on CUDA")
            quantize_model(model, device, dtype, config.quantization)
        else:
            if keep_4bit:  # its quantized layers stay packed, packed where they stay
                keep_gguf_precision(model, checkpoint, skip, arenas)
            if onednn:
                prepack_linears(model, onednn_dtypes())
        if device.type == "cpu" and config.cpu_huge_pages:  # before anything holds the weights
            placed = huge_pages.place_model(model, arenas)
            if placed:
                logger.info("weights on huge pages: %.0f MiB", placed / 2**20)
        self.lora: LoRAState | None = None
        if config.lora_enabled:  # after quantization: the LoRA pairs wrap whatever runs the base
            self.lora = LoRAState(prepack=onednn)
            wrap_lora_projections(model, model.weight_map(), self.lora)
        self.model = model.eval()
        self.decode_kernel = self._pick_decode_kernel()
        if self.decode_kernel is not None:  # its fused RMSNorm, rotary and SiLU product too
            for module in [*model.modules(), *model.rotary.values()]:  # rotary tables: a plain dict
                if isinstance(module, (RMSNorm, RotaryEmbedding, GatedMLP)):
                    module.kernel = self.decode_kernel
        self.triton_attention = self._use_triton()
        # The layers of pure decode steps in one call to the CPU extension, where they qualify.
        self.decode_stack = None
        if self.lora is None and not self.triton_attention:
            self.decode_stack = DecodeStack.build(self.decode_kernel, model)
        self.stack_layers = len(model.layers)
        self.max_model_len = max_model_len
        self.num_blocks = self._num_kv_blocks()
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        self.decode_graphs = self._decode_graphs()

    def shutdown(self) -> None:
        """Let go of the weights, the KV cache and the CUDA graphs (their memory returns once
        nothing else holds them: the huge-page arenas are unmapped with their last view)."""
        self.model = None
        self.kv_caches = []
        self.decode_stack = self.decode_graphs = self.lora = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def first_layers(self, num_layers: int) -> "ModelRunner":
        """A runner over this one's first `num_layers` layers and its output head, sharing its
        weights and those layers' KV cache (the self-speculative draft)."""
        if not (self.model.is_first and self.model.is_last):
            raise ValueError("first_layers needs the whole model in this process")
        view = copy.copy(self)
        view.model = TruncatedModel(self.model, num_layers)
        view.kv_caches = self.kv_caches[:num_layers]
        view.stack_layers = num_layers
        view.decode_graphs = None
        return view

    def set_lora(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Put an adapter's share (this runner's layers, this rank's slices) into a slot of
        every LoRA projection, or empty the slot."""
        if self.lora is None:
            raise ConfigError("this engine was started without LoRA (set enable_lora or lora_modules)")
        for module in self.model.modules():
            if isinstance(module, LoRALinear):
                module.set_slot(slot, adapter, self.dtype, self.device)

    def resize_kv_cache(self, num_blocks: int) -> None:
        """Reallocate the (empty) KV cache with `num_blocks` blocks."""
        if num_blocks != self.num_blocks:
            self.num_blocks = num_blocks
            self.kv_caches = self._allocate_kv_cache(num_blocks)
            self.decode_graphs = self._decode_graphs()  # the graphs read the old cache

    @property
    def num_parameters(self) -> int:
        """Weights this runner holds, each tensor once (a pipeline stage: only its share).
        Counts parameters, int8 weight buffers and oneDNN-prepacked weights."""
        seen: set[int] = set()
        total = 0
        tensors = list(self.model.parameters()) + [b for n, b in self.model.named_buffers() if n.endswith("qweight")]
        for tensor in tensors:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel()
        for module in self.model.modules():
            if isinstance(module, (OneDNNLinear, CpuInt4Linear, CpuW8A8Linear)):  # weights packed, not parameters
                total += module.num_parameters
        return total

    def _pick_decode_kernel(self):
        """semline's compiled paged-attention kernel on the CPU, unless told otherwise."""
        backend = self.config.attention_backend
        if backend == "torch" or self.device.type != "cpu":
            return None
        from engine.kernels import load_paged_attention

        kernel = load_paged_attention()
        if kernel is None and backend == "cpu_kernel":
            raise RuntimeError("attention_backend 'cpu_kernel' requested but the kernel could not be built")
        return kernel

    def _use_triton(self) -> bool:
        if self.config.attention_backend != "triton":
            return False
        if self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("attention_backend 'triton' runs on CUDA, or on a CPU under TRITON_INTERPRET=1 (tests)")
        try:
            from engine.kernels import triton_attention  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"attention_backend 'triton' needs the triton package: {exc}") from exc
        return True

    @property
    def query_group(self) -> int:
        """Query heads per KV head (the same on every layer and rank)."""
        attention = self.model.layers[0].self_attn
        return attention.num_heads // attention.num_kv_heads

    def _decode_graphs(self):
        """CUDA graphs for decode steps where they can run: the Triton attention kernel (its
        metadata lives in device buffers), the whole model here, no data-dependent shapes
        (MoE routing) and no LoRA (its weights change between steps). On a CPU the same
        static-buffer path runs without capture (what the tests check)."""
        if (not self.triton_attention or self.config.enforce_eager or self.tp.enabled or self.lora is not None
                or not (self.model.is_first and self.model.is_last)
                or any(isinstance(m, MoE) for m in self.model.modules())):
            return None
        from engine.cuda_graphs import DecodeGraphs

        return DecodeGraphs(self, self.config.max_num_seqs, self.max_model_len, capture=self.device.type == "cuda")

    # --- KV cache -----------------------------------------------------------

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        per_block = kv_bytes_per_block(self.model.num_kv_heads, self.args.head_dim, self.block_size, self.dtype,
                                       len(self.model.layers))
        if self.config.kv_cache_memory_gb is not None:
            budget = self.config.kv_cache_memory_gb * 2**30
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = min(free, total * self.device_share) * CUDA_KV_CACHE_FRACTION
        else:
            budget = DEFAULT_CPU_KV_CACHE_GB * 2**30
        return max(1, int(budget // per_block))

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`num_blocks` blocks for the block manager and one more: the scratch block that
        padding rows of a CUDA-graph decode step write to."""
        shape = (num_blocks + 1, self.block_size, self.model.num_kv_heads, self.args.head_dim)
        logger.info("KV cache: %d blocks x %d tokens (%s)", num_blocks, self.block_size, self.dtype)
        if self.device.type == "cpu" and self.config.cpu_huge_pages:
            caches = huge_pages.zeros(shape, self.dtype, 2 * len(self.model.layers))
            return list(zip(caches[0::2], caches[1::2]))
        return [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in self.model.layers
        ]

    # --- one step -----------------------------------------------------------

    def prepare(self, chunks: list[ScheduledChunk]) -> ModelInput:
        return self.build(plan_step(chunks, self.block_size))

    def build(self, plan: StepPlan) -> ModelInput:
        """The step's tensors and attention metadata on this runner's device (one metadata per
        window of the model's layers; what all windows share is built once)."""
        device = self.device
        for slot, adapter in plan.lora_updates.items():  # sent along by a parallel executor
            self.set_lora(slot, adapter)
        if self.decode_graphs is not None and self.decode_graphs.accepts(plan):
            size = self.decode_graphs.stage(plan)
            n = len(plan.input_ids)
            return ModelInput(input_ids=self.decode_graphs.dev["input_ids"][:n],
                              positions=self.decode_graphs.dev["positions"][:n], attn={},
                              logits_indices=torch.arange(n, device=device), graph_size=size)
        slot_mapping = torch.tensor(plan.slots, dtype=torch.long, device=device)
        if self.triton_attention:
            attn = self._triton_metadata(plan, slot_mapping)
        else:
            attn = self._sdpa_metadata(plan, slot_mapping)
        return ModelInput(
            input_ids=torch.tensor(plan.input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(plan.positions, dtype=torch.long, device=device),
            attn=attn,
            logits_indices=torch.tensor(plan.logits_indices, dtype=torch.long, device=device),
            lora=LoRAStep(plan.lora, device) if plan.lora and self.lora is not None else None,
            decode_only=bool(plan.decode_tokens) and not plan.prefill,
        )

    def _triton_metadata(self, plan: StepPlan, slot_mapping: torch.Tensor) -> dict:
        """One TritonBatch for every layer: decodes and prefill chunks alike are sequences."""
        from engine.kernels.triton_attention import build_triton_batch

        starts = plan.decode_tokens + [a for a, _, _, _ in plan.prefill]
        lens = [1] * len(plan.decode_tokens) + [b - a for a, b, _, _ in plan.prefill]
        contexts = plan.decode_lens + [cached + b - a for a, b, cached, _ in plan.prefill]
        tables = plan.decode_tables + [table for _, _, _, table in plan.prefill]
        batch = build_triton_batch(starts, lens, contexts, tables, self.query_group, self.device)
        return {window: AttentionMetadata(slot_mapping=slot_mapping, block_size=self.block_size, triton=batch,
                                          window=window) for window in self.model.windows}

    def _sdpa_metadata(self, plan: StepPlan, slot_mapping: torch.Tensor) -> dict:
        device = self.device
        decode_batch = None
        if plan.decode_tokens and self.decode_kernel is not None:
            decode_batch = build_decode_batch(plan.decode_tokens, plan.decode_tables, plan.decode_lens, device,
                                              self.decode_kernel)
        return {window: self._attention_metadata(plan, slot_mapping, decode_batch, window)
                for window in self.model.windows}

    def _attention_metadata(self, plan: StepPlan, slot_mapping: torch.Tensor, decode_batch: DecodeBatch | None,
                            window: int | None) -> AttentionMetadata:
        device, bs = self.device, self.block_size
        attn = AttentionMetadata(
            slot_mapping=slot_mapping,
            prefill_chunks=[make_prefill_chunk(a, b, start, table, bs, device, window)
                            for a, b, start, table in plan.prefill],
            block_size=bs,
        )
        if decode_batch is not None:
            attn.decode_batch = windowed(decode_batch, window)
        elif plan.decode_tokens:
            attn.decode_groups = build_decode_groups(plan.decode_tokens, plan.decode_tables, plan.decode_lens, bs,
                                                     device, self.dtype, window)
        return attn

    # In process there is nothing to overlap: a batch is computed when submitted.
    max_inflight = 1

    def submit(self, model_input: ModelInput) -> torch.Tensor:
        return self.execute(model_input)

    def result(self, handle: torch.Tensor) -> torch.Tensor:
        return handle

    def _forward(self, model_input: ModelInput, hidden: torch.Tensor | None) -> torch.Tensor:
        """[T, D] hidden states of this runner's layers: from the token ids (first stage) or
        from the previous stage's `hidden`."""
        if self.lora is not None:
            self.lora.step = model_input.lora
        stack = self.decode_stack
        if stack is not None and model_input.decode_only and stack.accepts(model_input.input_ids.numel()):
            meta = next(iter(model_input.attn.values()))  # windows share tables and slots
            batch = meta.decode_batch
            return stack.forward(model_input.input_ids, model_input.positions, self.kv_caches, meta.slot_mapping,
                                 batch.block_tables, batch.context_lens, self.stack_layers)
        x = model_input.input_ids if self.model.is_first else hidden.to(self.device)
        return self.model(x, model_input.positions, self.kv_caches, model_input.attn)

    @torch.inference_mode()
    def embed(self, model_input: ModelInput) -> torch.Tensor:
        """[N, D] fp32 last-layer hidden states after the final norm, at the sampling positions."""
        if self.tp.enabled or not (self.model.is_first and self.model.is_last):
            raise RuntimeError("embeddings need the whole model in one process (no tensor or pipeline split)")
        hidden = self._forward(model_input, None)
        return self.model.norm(hidden[model_input.logits_indices]).float()

    @torch.inference_mode()
    def execute(self, model_input: ModelInput) -> torch.Tensor:
        """Run the whole model in this process: [N, V] fp32 logits for the chunks that sample."""
        if self.tp.enabled:
            raise RuntimeError("a tensor-parallel rank returns its logits through execute_split")
        if model_input.graph_size:
            return self.decode_graphs.run(model_input.graph_size)[:model_input.logits_indices.numel()]
        hidden = self._forward(model_input, None)
        if model_input.logits_indices.numel() == 0:
            return torch.empty(0, self.args.vocab_size, device=self.device)
        return self.model.compute_logits(hidden[model_input.logits_indices])

    @torch.inference_mode()
    def execute_split(self, model_input: ModelInput, hidden: torch.Tensor | None,
                      argmax_rows: list[int]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """The forward as a worker of a pipeline or tensor-parallel group runs it: a stage
        before the last returns its [T, D] hidden states; the last returns (the logits rows
        not in argmax_rows, the argmax token id of each row in argmax_rows), on tensor-parallel
        rank 0 only (other ranks: None)."""
        hidden = self._forward(model_input, hidden)
        if not self.model.is_last:
            return hidden if self.tp.rank == 0 else None
        local = self.model.compute_logits(hidden[model_input.logits_indices])
        return self.tp.gather_logits(local, argmax_rows, self.args.vocab_size)
