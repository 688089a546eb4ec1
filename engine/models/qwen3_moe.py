"""Qwen3-MoE: a Qwen3 whose MLPs are routed experts on the layers that `decoder_sparse_step`
picks and `mlp_only_layers` does not exclude (those keep a dense MLP)."""

from __future__ import annotations

from engine.models.base import (ModelArgs, ModelFamily, WeightMap, common_args, expert_map, register_family,
                                standard_layer_map, window_layers)


def qwen3_moe_args(config) -> ModelArgs:
    bias = bool(getattr(config, "attention_bias", False))
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense_only = set(getattr(config, "mlp_only_layers", None) or [])
    moe = [config.num_experts > 0 and i not in dense_only and (i + 1) % step == 0
           for i in range(config.num_hidden_layers)]
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", False) else None
    first_sliding = getattr(config, "max_window_layers", 0)
    return ModelArgs(**common_args(config, qkv_bias=bias, o_bias=bias, qk_norm=True),
                     num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                     moe_intermediate_size=config.moe_intermediate_size,
                     norm_topk_prob=bool(getattr(config, "norm_topk_prob", True)), moe_layers=moe,
                     **window_layers(config, window, lambda i: i >= first_sliding))


def qwen3_moe_layer_map(args: ModelArgs, i: int) -> WeightMap:
    names = standard_layer_map(args, i)
    if args.moe_layers[i]:
        names.update(expert_map(args, i, f"model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj"))
    return names


QWEN3_MOE = register_family(("qwen3_moe",), ModelFamily("qwen3_moe", qwen3_moe_args, qwen3_moe_layer_map))
