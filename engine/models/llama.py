"""semline's Llama-family forward pass (Llama, Mistral, Qwen2, SmolLM).

Takes a flat batch of T tokens from many sequences, each with its own position,
so prefill chunks and decode tokens of different requests run in one forward.
Shapes in comments: T tokens, D hidden, H query heads, KVH KV heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, paged_attention

SUPPORTED_ARCHITECTURES = {
    # model_type -> whether q/k/v projections carry a bias by default
    "llama": False,
    "mistral": False,
    "qwen2": True,
}


@dataclass
class LlamaArgs:
    """The architecture numbers the forward pass needs, read from a HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, config) -> "LlamaArgs":
        model_type = config.model_type
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {model_type!r}: semline runs "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} models"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r} (only silu)")
        num_heads = config.num_attention_heads
        attention_bias = getattr(config, "attention_bias", SUPPORTED_ARCHITECTURES[model_type])
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=config.rms_norm_eps,
            qkv_bias=bool(attention_bias),
            o_bias=bool(attention_bias) and model_type == "llama",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=config.max_position_embeddings,
        )

    @property
    def num_parameters(self) -> int:
        """Parameters touched per token by the matmuls (embedding lookup excluded, head included)."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * (attn + mlp) + self.vocab_size * self.hidden_size


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Accumulate in fp32 whatever the weight dtype, as HF does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, looked up per token."""

    def __init__(self, config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = _rope_inv_freq(config, head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)  # [P, Dh]
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        # q: [T, H, Dh], k: [T, KVH, Dh], positions: [T]
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (theta**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.scale = args.head_dim**-0.5
        # q, k and v in one matmul: [D] -> [q_size + 2 * kv_size]
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=args.o_bias)

    def forward(self, x, positions, rotary, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, D]
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = rotary(q, k, positions)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)  # [T, H, Dh]
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.intermediate_size = args.intermediate_size
        # gate and up in one matmul: [D] -> [2 * I]
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, positions, rotary, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """The decoder stack for layers [first_layer, last_layer); embedding and head on the ends."""

    def __init__(self, args: LlamaArgs, hf_config, max_positions: int,
                 first_layer: int = 0, last_layer: int | None = None) -> None:
        super().__init__()
        self.args = args
        self.first_layer = first_layer
        self.last_layer = args.num_layers if last_layer is None else last_layer
        self.is_first = first_layer == 0
        self.is_last = self.last_layer == args.num_layers
        self.rotary = RotaryEmbedding(hf_config, args.head_dim, max_positions)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size) if self.is_first else None
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(self.first_layer, self.last_layer))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps) if self.is_last else None
        self.lm_head = None
        if self.is_last:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, input_ids_or_hidden: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        """[T] token ids (first stage) or [T, D] hidden states -> [T, D] hidden states."""
        x = self.embed_tokens(input_ids_or_hidden) if self.is_first else input_ids_or_hidden
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, positions, self.rotary, kv_cache, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, D] last-layer hidden states -> [N, V] fp32 logits."""
        return self.lm_head(self.norm(hidden)).float()

    # --- weights ------------------------------------------------------------

    def load_hf_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in HF checkpoints, fusing q/k/v and gate/up."""
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{self.first_layer + i}."
            attn, mlp = layer.self_attn, layer.mlp
            _copy(attn.qkv_proj.weight, _cat(tensors, prefix + "self_attn.{}_proj.weight", "qkv"))
            if attn.qkv_proj.bias is not None:
                _copy(attn.qkv_proj.bias, _cat(tensors, prefix + "self_attn.{}_proj.bias", "qkv"))
            _copy(attn.o_proj.weight, tensors[prefix + "self_attn.o_proj.weight"])
            if attn.o_proj.bias is not None:
                _copy(attn.o_proj.bias, tensors[prefix + "self_attn.o_proj.bias"])
            _copy(mlp.gate_up_proj.weight, torch.cat(
                [tensors[prefix + "mlp.gate_proj.weight"], tensors[prefix + "mlp.up_proj.weight"]]))
            _copy(mlp.down_proj.weight, tensors[prefix + "mlp.down_proj.weight"])
            if mlp.gate_up_proj.bias is not None:
                _copy(mlp.gate_up_proj.bias, torch.cat(
                    [tensors[prefix + "mlp.gate_proj.bias"], tensors[prefix + "mlp.up_proj.bias"]]))
                _copy(mlp.down_proj.bias, tensors[prefix + "mlp.down_proj.bias"])
            _copy(layer.input_layernorm.weight, tensors[prefix + "input_layernorm.weight"])
            _copy(layer.post_attention_layernorm.weight, tensors[prefix + "post_attention_layernorm.weight"])
        if self.is_first:
            _copy(self.embed_tokens.weight, tensors["model.embed_tokens.weight"])
        if self.is_last:
            _copy(self.norm.weight, tensors["model.norm.weight"])
            if self.args.tie_word_embeddings and self.is_first:
                self.lm_head.weight = self.embed_tokens.weight  # share, don't copy
                return
            head = tensors.get("lm_head.weight")
            if head is None or self.args.tie_word_embeddings:
                head = tensors["model.embed_tokens.weight"]
            _copy(self.lm_head.weight, head)

    def weight_names(self) -> list[str]:
        """HF checkpoint tensor names this module needs (for partial loading)."""
        names = []
        for i in range(self.first_layer, self.last_layer):
            prefix = f"model.layers.{i}."
            names += [prefix + f"self_attn.{p}_proj.weight" for p in "qkvo"]
            if self.args.qkv_bias:
                names += [prefix + f"self_attn.{p}_proj.bias" for p in "qkv"]
            if self.args.o_bias:
                names.append(prefix + "self_attn.o_proj.bias")
            names += [prefix + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
            if self.args.mlp_bias:
                names += [prefix + f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")]
            names += [prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"]
        if self.is_first or (self.is_last and self.args.tie_word_embeddings):
            names.append("model.embed_tokens.weight")
        if self.is_last:
            names.append("model.norm.weight")
            if not self.args.tie_word_embeddings:
                names.append("lm_head.weight")
        return names


class TruncatedModel(nn.Module):
    """The embedding, the first `num_layers` layers and the output head of a whole model,
    sharing its modules: a draft for self-speculative decoding that needs no second model."""

    def __init__(self, model: LlamaForCausalLM, num_layers: int) -> None:
        super().__init__()
        if not 1 <= num_layers <= len(model.layers):
            raise ValueError(f"a truncated model keeps 1 to {len(model.layers)} layers, not {num_layers}")
        self.args = model.args
        self.is_first = self.is_last = True
        self.rotary = model.rotary
        self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleList(list(model.layers)[:num_layers])
        self.norm = model.norm
        self.lm_head = model.lm_head

    forward = LlamaForCausalLM.forward
    compute_logits = LlamaForCausalLM.compute_logits


def _cat(tensors: dict, pattern: str, parts: str) -> torch.Tensor:
    return torch.cat([tensors[pattern.format(p)] for p in parts])


@torch.no_grad()
def _copy(param: torch.Tensor, value: torch.Tensor) -> None:
    if param.shape != value.shape:
        raise ValueError(f"weight shape mismatch: expected {tuple(param.shape)}, got {tuple(value.shape)}")
    param.copy_(value)
