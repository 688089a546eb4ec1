"""Qwen3: a Llama with RMS norms on each head's q and k (before the rotation), no q/k/v
bias by default."""

from __future__ import annotations

from engine.models.base import ModelArgs, ModelFamily, common_args, register_family, window_layers


def qwen3_args(config) -> ModelArgs:
    bias = bool(getattr(config, "attention_bias", False))
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", False) else None
    first_sliding = getattr(config, "max_window_layers", 0)
    return ModelArgs(**common_args(config, qkv_bias=bias, o_bias=bias, qk_norm=True),
                     **window_layers(config, window, lambda i: i >= first_sliding))


QWEN3 = register_family(("qwen3",), ModelFamily("qwen3", qwen3_args))
