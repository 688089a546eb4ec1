"""Qwen3-MoE: a Qwen3 whose MLPs are routed experts on the layers that `decoder_sparse_step`
picks and `mlp_only_layers` does not exclude (those keep a dense MLP)."""

from __future__ import annotations

import dataclasses

from engine.models.base import ModelArgs, ModelFamily, WeightMap, expert_map, register_family, standard_layer_map
from engine.models.qwen3 import qwen3_args


def qwen3_moe_args(config) -> ModelArgs:
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense_only = set(getattr(config, "mlp_only_layers", None) or [])
    moe = [config.num_experts > 0 and i not in dense_only and (i + 1) % step == 0
           for i in range(config.num_hidden_layers)]
    return dataclasses.replace(qwen3_args(config), num_experts=config.num_experts,
                               num_experts_per_tok=config.num_experts_per_tok,
                               moe_intermediate_size=config.moe_intermediate_size,
                               norm_topk_prob=bool(getattr(config, "norm_topk_prob", True)), moe_layers=moe)


def qwen3_moe_layer_map(args: ModelArgs, i: int) -> WeightMap:
    names = standard_layer_map(args, i)
    if args.moe_layers[i]:
        names.update(expert_map(args, i, f"model.layers.{i}.mlp", "gate_proj", "up_proj", "down_proj"))
    return names


QWEN3_MOE = register_family(("qwen3_moe",), ModelFamily("qwen3_moe", qwen3_moe_args, qwen3_moe_layer_map))
