"""Mixtral: a Mistral whose MLPs are top-k routed experts (`block_sparse_moe`, experts'
w1 = gate, w3 = up, w2 = down in the checkpoint), top-k weights renormalised."""

from __future__ import annotations

import dataclasses

from engine.models.base import ModelArgs, ModelFamily, WeightMap, expert_map, register_family, standard_layer_map
from engine.models.llama import mistral_args


def mixtral_args(config) -> ModelArgs:
    return dataclasses.replace(mistral_args(config), num_experts=config.num_local_experts,
                               num_experts_per_tok=config.num_experts_per_tok,
                               moe_intermediate_size=config.intermediate_size, norm_topk_prob=True,
                               moe_layers=[True] * config.num_hidden_layers)


def mixtral_layer_map(args: ModelArgs, i: int) -> WeightMap:
    return {**standard_layer_map(args, i),
            **expert_map(args, i, f"model.layers.{i}.block_sparse_moe", "w1", "w3", "w2")}


MIXTRAL = register_family(("mixtral",), ModelFamily("mixtral", mixtral_args, mixtral_layer_map))
