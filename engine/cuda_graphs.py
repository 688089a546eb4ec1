"""Decode steps replayed from CUDA graphs: one launch for the whole forward.

A step of a small model on a GPU is bound by launching kernels (hundreds per step),
not by running them. A decode-only step (every sequence adds one token, no LoRA rows)
has the same shapes every time at a given batch size, so the forward is captured once
per padded batch size (1, 2, 4, 8, then multiples of 16 up to `max_num_seqs`) and
replayed: the step's inputs are copied into static buffers the graph reads (token ids,
positions, KV slots, context lengths, block tables), the rows past the real batch are
padding whose K/V go to a scratch block of the cache (the block past the block
manager's) and whose outputs are dropped. Attention must read its metadata from
device memory, so graphs need the Triton kernel (attention_backend "triton"); prefill
and mixed steps run eagerly. `enforce_eager` turns graphs off.

Without a GPU the same static-buffer path runs eagerly (`capture=False`): the padding,
the scratch block and the buffer staging are what the CPU tests check; the capture
itself waits for a GPU (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import logging

import torch

from engine.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def graph_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes with a graph each: 1, 2, 4, 8, then multiples of 16 (>= max_batch)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch + 16, 16)) if max_batch > 8 else [8 if max_batch > 4 else max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    """Static buffers for decode steps of up to `max_batch` sequences, and (with `capture`)
    a CUDA graph per padded size, captured on first use."""

    def __init__(self, runner, max_batch: int, max_model_len: int, capture: bool) -> None:
        from engine.kernels.triton_attention import TritonBatch, tile_shape

        self.runner, self.capture = runner, capture
        self.sizes = graph_sizes(max_batch)
        size, device, bs = self.sizes[-1], runner.device, runner.block_size
        self.scratch_slot = runner.num_blocks * bs  # the first slot of the cache's scratch block
        width = -(-max_model_len // bs)
        block_m, block_q = tile_shape(runner.query_group, decode_only=True)
        # Host staging (pinned on a GPU: the copies do not wait) and the device buffers.
        pin = device.type == "cuda"
        self.host = {
            "input_ids": torch.zeros(size, dtype=torch.long, pin_memory=pin),
            "positions": torch.zeros(size, dtype=torch.long, pin_memory=pin),
            "slots": torch.zeros(size, dtype=torch.long, pin_memory=pin),
            "ctx_len": torch.ones(size, dtype=torch.int32, pin_memory=pin),
            "tables": torch.zeros(size, width, dtype=torch.int32, pin_memory=pin),
        }
        self.dev = {name: torch.zeros_like(t, device=device) for name, t in self.host.items()}
        arange = torch.arange(size, dtype=torch.int32, device=device)
        self.metas: dict[int, dict] = {}
        for n in self.sizes:
            batch = TritonBatch(q_start=arange[:n], q_len=torch.ones(n, dtype=torch.int32, device=device),
                                ctx_len=self.dev["ctx_len"][:n], block_tables=self.dev["tables"][:n],
                                tile_seq=arange[:n], tile_index=torch.zeros(n, dtype=torch.int32, device=device),
                                block_m=block_m, block_q=block_q)
            self.metas[n] = {window: AttentionMetadata(slot_mapping=self.dev["slots"][:n], block_size=bs,
                                                       triton=batch, window=window)
                             for window in runner.model.windows}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.num_staged = 0  # decode steps run through the static buffers
        self.padded_sizes_used: set[int] = set()

    def accepts(self, plan) -> bool:
        """A decode-only step (one new token per sequence, each sampling) that fits."""
        n = len(plan.input_ids)
        return (0 < n <= self.sizes[-1] and not plan.prefill and not plan.lora and len(plan.decode_tokens) == n
                and len(plan.logits_indices) == n)

    def stage(self, plan) -> int:
        """Copy the step's inputs into the static buffers; returns the padded size."""
        n = len(plan.input_ids)
        size = next(s for s in self.sizes if s >= n)
        host = self.host
        host["input_ids"][:n] = torch.tensor(plan.input_ids)
        host["positions"][:n] = torch.tensor(plan.positions)
        host["slots"][:n] = torch.tensor(plan.slots)
        host["ctx_len"][:n] = torch.tensor(plan.decode_lens, dtype=torch.int32)
        tables = host["tables"]
        for row, table in enumerate(plan.decode_tables):
            tables[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
        # Padding rows: one key, in the scratch block (positions 0, token 0).
        host["input_ids"][n:size] = 0
        host["positions"][n:size] = 0
        host["slots"][n:size] = self.scratch_slot
        host["ctx_len"][n:size] = 1
        tables[n:size, 0] = self.scratch_slot // self.runner.block_size
        for name, buffer in self.dev.items():
            buffer[:size].copy_(host[name][:size], non_blocking=True)
        self.num_staged += 1
        self.padded_sizes_used.add(size)
        return size

    def run(self, size: int) -> torch.Tensor:
        """[size, V] fp32 logits of the staged step (rows past the real batch are padding).
        The tensor is reused by the next step of this size: read it before then."""
        if not self.capture:
            return self._forward(size)
        entry = self.graphs.get(size)
        if entry is None:
            entry = self.graphs[size] = self._capture(size)
        entry[0].replay()
        return entry[1]

    def _forward(self, size: int) -> torch.Tensor:
        model = self.runner.model
        hidden = model(self.dev["input_ids"][:size], self.dev["positions"][:size], self.runner.kv_caches,
                       self.metas[size])
        return model.compute_logits(hidden)

    def _capture(self, size: int):
        # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture.
        # The staged inputs are the current step's: the warm-up writes the same K/V the
        # replay will write again.
        free_before = torch.cuda.mem_get_info(self.runner.device)[0]
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # one pool: sizes share their memory
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size)
        used = free_before - torch.cuda.mem_get_info(self.runner.device)[0]
        logger.info("captured a CUDA graph for decode batch %d (%.1f MiB more in use)", size, used / 2**20)
        return graph, logits
