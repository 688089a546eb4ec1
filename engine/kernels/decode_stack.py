"""A decode step's layers in one call into the compiled CPU extension (paged_attention.cpp).

On a CPU a decode step of a small model is bound by the Python calls of its layers, not by
their arithmetic: SmolLM2-135M's 30 layers made ~25 PyTorch calls each from Python, ~2.5 ms
of a 5.4 ms single-stream step with 4-bit weights. `DecodeStack` holds the layers' weights
and runs them from C++ with the same ops (the matmuls through the same ATen/oneDNN/int4
kernels, norms, rotary and attention through semline's kernels), so the tokens are those
of the Python path.

Where every product is semline's W4A8/W8A8 kernel (quantization int4, auto, w8a8) and a
step has at most 8 tokens, the whole step runs in one OpenMP parallel region instead of
~120 kernel calls (paged_attention.cpp, DecodeStack::forward_team).

It takes the pure decode steps (one new token per sequence, no LoRA) of a whole model in
one process whose layers are all pre-norm, SiLU-gated, fully rotary and dense (Llama,
Mistral, Qwen2 and their like); everything else stays on the Python modules.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models.base import CausalLM
from engine.models.layers import GatedMLP
from engine.models.linear import BLOCK_ROWS, OneDNNLinear, padded_rows
from engine.quantization import CpuInt4Linear, CpuInt8Linear, CpuW8A8Linear, WeightOnlyInt8Linear

# LinearSpec kinds (paged_attention.cpp).
DENSE, ONEDNN, INT4, Q4, Q8, INT8 = 0, 1, 2, 3, 4, 5


def linear_spec(kernel, module: nn.Module):
    """The extension's description of a linear layer, or None for a kind it does not run."""
    if type(module) is nn.Linear:
        return kernel.LinearSpec(DENSE, module.weight.detach(), bias=_detached(module.bias))
    if isinstance(module, OneDNNLinear):
        return kernel.LinearSpec(ONEDNN, module.packed_weight, bias=module.bias)
    if isinstance(module, CpuInt4Linear) and module.kernel is not None:  # semline's W4A8 kernel
        return kernel.LinearSpec(Q4, module.q4_packed, bias=module.bias, group_size=module.out_features)
    if isinstance(module, CpuW8A8Linear):
        return kernel.LinearSpec(Q8, module.q8_packed, module.scales, module.bias)
    if isinstance(module, CpuInt8Linear):  # its packed path (up to max_packed_rows: max_rows)
        return kernel.LinearSpec(INT8, module.qweight, module.scales_bf16, _detached(module.bias))
    if isinstance(module, WeightOnlyInt8Linear) and module.packed:
        return kernel.LinearSpec(INT8, module.qweight, module.scales, _detached(module.bias))
    if isinstance(module, CpuInt4Linear):
        return kernel.LinearSpec(INT4, module.packed_int4, module.scales_and_zeros, module.bias, module.group_size)
    return None


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def supported(model: nn.Module) -> bool:
    """Whether every layer of `model` is one the stack runs as the Python modules do."""
    if not isinstance(model, CausalLM) or not (model.is_first and model.is_last) or model.tp.enabled:
        return False
    args = model.args
    if (args.qk_norm or args.norm_offset or args.sandwich_norms or args.hidden_act != "silu"
            or any(args.moe_layers)):
        return False
    if any(rotary.rotary_dim != args.head_dim for rotary in model.rotary.values()):
        return False
    return all(isinstance(layer.mlp, GatedMLP) for layer in model.layers)


class DecodeStack:
    """The compiled stack of a model's layers and how to feed it one decode step."""

    def __init__(self, model: CausalLM, stack, rope_keys: list[str]) -> None:
        self.model = model
        self.stack = stack
        self.rope_keys = rope_keys  # the stack's rope table i is model.rotary[rope_keys[i]]
        # Most tokens a step may have here: the oneDNN layers' row blocks, and the weight-only
        # int8 layers' packed path (past it they dequantize, which the stack does not).
        self.max_rows = min([BLOCK_ROWS] + [m.max_packed_rows for m in model.layers.modules()
                                           if isinstance(m, CpuInt8Linear)])

    @classmethod
    def build(cls, kernel, model: nn.Module) -> "DecodeStack | None":
        """The stack for `model`, or None where some layer is not one it runs."""
        if kernel is None or not hasattr(kernel, "DecodeStack") or not supported(model):
            return None
        rope_keys = sorted(model.rotary)
        stack = kernel.DecodeStack(model.args.rms_norm_eps)
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            specs = [linear_spec(kernel, m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if any(spec is None for spec in specs):
                return None
            stack.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                            *specs, attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale,
                            attn.window or 0, attn.softcap or 0.0, rope_keys.index(attn.rope_key))
        return cls(model, stack, rope_keys)

    def accepts(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_rows

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, context_lens: torch.Tensor, num_layers: int) -> torch.Tensor:
        """[T] token ids of T decoding sequences -> [T, D] hidden states after the first
        `num_layers` layers (the step's K/V written into `kv_caches` on the way)."""
        model = self.model
        x = model.embed(input_ids).contiguous()
        dtype = x.dtype
        cos, sin = [], []
        for key in self.rope_keys:
            c, s = model.rotary[key].lookup(positions, dtype)
            cos.append(c)
            sin.append(s)
        return self.stack.forward(x, cos, sin, [k for k, _ in kv_caches], [v for _, v in kv_caches], slot_mapping,
                                  block_tables, context_lens, padded_rows(x.shape[0]), num_layers)
