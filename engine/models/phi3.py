"""Phi-3 (and Phi-4-mini): a Llama whose checkpoint stores q/k/v as one `qkv_proj` and
gate/up as one `gate_up_proj` (semline fuses them the same way, so they load as they
are); optional partial rotary and a sliding window on every layer."""

from __future__ import annotations

from engine.models.base import (ModelArgs, ModelFamily, WeightMap, common_args, register_family,
                                standard_layer_map, window_layers)


def phi3_args(config) -> ModelArgs:
    window = getattr(config, "sliding_window", None)
    return ModelArgs(**common_args(config), **window_layers(config, window, lambda i: True))


def phi3_layer_map(args: ModelArgs, i: int) -> WeightMap:
    names = standard_layer_map(args, i)
    theirs = f"model.layers.{i}."
    names[f"layers.{i}.self_attn.qkv_proj.weight"] = [theirs + "self_attn.qkv_proj.weight"]
    names[f"layers.{i}.mlp.gate_up_proj.weight"] = [theirs + "mlp.gate_up_proj.weight"]
    return names


PHI3 = register_family(("phi3",), ModelFamily("phi3", phi3_args, phi3_layer_map))
