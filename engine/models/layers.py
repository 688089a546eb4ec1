"""The building blocks every model family shares: norms, rotary embeddings, paged
attention, the gated MLP and the routed-experts (MoE) block.

A family file (engine/models/<family>.py) only fills a `ModelArgs` (engine/models/base.py)
from its Hugging Face config and names its checkpoint tensors; these modules do the rest.
Shapes in comments: T tokens, D hidden, H query heads, KVH KV heads, Dh head dim,
E experts, I intermediate size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.parallel import TensorParallel

if TYPE_CHECKING:
    from engine.models.base import ModelArgs

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class RMSNorm(nn.Module):
    """RMS norm over the last axis. `offset` 1.0 is Gemma's variant: the weight is stored as
    (scale - 1) and the product is taken in float32 before the cast back."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset
        # semline's compiled CPU ops (engine/kernels), set by the CPU runner: one fused call.
        self.kernel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and not self.offset and x.dim() == 2:
            return self.kernel.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        # One fused kernel for x * rsqrt(mean(x^2) + eps), in float32 as HF computes it.
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.offset:
            return (x * (self.offset + self.weight.float())).to(dtype)
        # Llama's order (as HF): cast back, then scale in the weight's dtype.
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, looked up per token. With a partial rotary factor
    only the first `rotary_dim` features of each head are rotated (Phi-3/4 style)."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, max_positions: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rotary_dim = emb.shape[-1]
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)  # [P, rotary_dim]
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)
        self.kernel = None  # semline's compiled CPU ops, as RMSNorm's

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        # q: [T, H, Dh], k: [T, KVH, Dh], positions: [T]
        cos, sin = self.lookup(positions, q.dtype)
        if self.kernel is not None and self.rotary_dim == q.shape[-1]:
            self.kernel.rotary_(q, k, cos, sin)  # in place: q and k are views of this step's qkv
            return q, k
        return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype):
        """The step's cos/sin rows, looked up once per forward: every layer of a step gets the
        same positions tensor (held here, so `is` cannot match a new tensor at a reused address)."""
        cached = getattr(self, "_step", None)
        if cached is None or cached[0] is not positions or cached[1] != dtype:
            cached = (positions, dtype, self.cos[positions].unsqueeze(1).to(dtype),
                      self.sin[positions].unsqueeze(1).to(dtype))
            self._step = cached
        return cached[2], cached[3]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    if rotary_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_parameters(config, layer_type: str | None) -> tuple[dict, bool]:
    """The rope settings of one kind of layer, and whether they are per layer type: transformers
    keeps one dict, or (Gemma 3) one per layer type ("full_attention", "sliding_attention")."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        return params[layer_type], True
    return params, False


def build_rotary(config, head_dim: int, max_positions: int, layer_type: str | None = None) -> RotaryEmbedding:
    """The rotary tables for one kind of layer, for every rope type transformers defines
    (default, linear, dynamic, llama3, yarn, longrope's short factors, ...).

    Built eagerly on the CPU (never under a meta-device context, where transformers' init
    functions cannot run). Dynamic NTK scaling changes nothing below
    max_position_embeddings, which max_model_len never exceeds."""
    params, nested = rope_parameters(config, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv_freq, scaling = 1.0 / (theta**exponents), 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope type {rope_type!r}")
        with torch.device("cpu"):
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](
                config, torch.device("cpu"), **({"layer_type": layer_type} if nested else {}))
    return RotaryEmbedding(inv_freq, float(scaling), max_positions)


class Attention(nn.Module):
    """Self-attention over the paged KV cache: q, k and v in one matmul, optional q/k norms
    (Qwen3, Gemma 3), a sliding window and soft-capped scores (Gemma 2). Under tensor
    parallelism it holds its rank's heads (engine/parallel.py) and all-reduces o_proj's
    partial sums; o_proj's bias lives on rank 0 only, so it is added once."""

    def __init__(self, args: "ModelArgs", layer_index: int, tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.tp = tp
        (head_start, head_stop), (kv_start, kv_stop) = tp.heads(args.num_heads, args.num_kv_heads)
        self.num_heads = head_stop - head_start
        self.num_kv_heads = kv_stop - kv_start
        self.head_dim = args.head_dim
        self.q_size = self.num_heads * args.head_dim
        self.kv_size = self.num_kv_heads * args.head_dim
        self.scale = args.attn_scale if args.attn_scale is not None else args.head_dim**-0.5
        self.softcap = args.attn_softcap
        self.window = args.layer_windows[layer_index]
        self.rope_key = args.layer_types[layer_index]
        # q, k and v in one matmul: [D] -> [q_size + 2 * kv_size]
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=args.o_bias and tp.rank == 0)
        self.q_norm = self.k_norm = None
        if args.qk_norm:  # per head, before the rotation
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, args.norm_offset)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, args.norm_offset)

    def forward(self, x, positions, rotary: RotaryEmbedding, kv_cache,
                metas: dict[int | None, AttentionMetadata]) -> torch.Tensor:
        # x: [T, D]
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, k, positions)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], metas[self.window], self.scale,
                              self.softcap)  # [T, H, Dh]
        return self.tp.all_reduce(self.o_proj(out.reshape(num_tokens, self.q_size)))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up in one matmul. Under tensor parallelism: this
    rank's intermediate columns, down_proj's partial sums all-reduced (bias on rank 0)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, activation: str,
                 tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.tp = tp
        start, stop = tp.split(intermediate_size, "MLP columns")
        self.intermediate_size = stop - start
        # gate and up in one matmul: [D] -> [2 * I]
        self.gate_up_proj = nn.Linear(hidden_size, 2 * self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, hidden_size, bias=bias and tp.rank == 0)
        self.act = ACTIVATIONS[activation]
        self.silu = activation == "silu"
        self.kernel = None  # semline's compiled CPU ops, as RMSNorm's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.kernel is not None and self.silu and gate_up.dim() == 2 and gate_up.is_contiguous():
            # One pass over the threads, rounded as below (a 1B prefill chunk's SiLU and
            # product: ~7.5 ms a layer in ATen's two calls on 2 cores).
            act = self.kernel.silu_mul(gate_up)
            if act is not None:
                return self.tp.all_reduce(self.down_proj(act))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.tp.all_reduce(self.down_proj(self.act(gate) * up))


class MoE(nn.Module):
    """Top-k routed experts (Mixtral, Qwen3-MoE). Each expert's FFN runs once per step on all
    the tokens routed to it (one gathered matmul per expert and projection), never per token.

    Routing as transformers does it: softmax over all experts in float32, keep the top k,
    renormalise them when `norm_topk_prob`. Under tensor parallelism every rank routes (the
    router is replicated) and holds its share of every expert's intermediate columns; one
    all-reduce joins the layer's output."""

    def __init__(self, args: "ModelArgs", tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.tp = tp
        self.num_experts = args.num_experts
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        start, stop = tp.split(args.moe_intermediate_size, "expert MLP columns")
        self.intermediate_size = stop - start
        self.act = ACTIVATIONS[args.hidden_act]
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)  # the router
        # [E, 2I, D]: each expert's gate and up rows; [E, D, I]: its down projection.
        self.gate_up = nn.Parameter(torch.empty(args.num_experts, 2 * self.intermediate_size, args.hidden_size))
        self.down = nn.Parameter(torch.empty(args.num_experts, args.hidden_size, self.intermediate_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D]
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [T, E]
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        # Tokens sorted by expert: one contiguous run of (token, slot) pairs per expert.
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // self.top_k
        routed = weights.flatten()[order]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            idx = tokens[start:start + count]
            gate, up = F.linear(x[idx], self.gate_up[expert]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.down[expert])
            out.index_add_(0, idx, (y * routed[start:start + count, None]).to(x.dtype))
            start += count
        return self.tp.all_reduce(out)
