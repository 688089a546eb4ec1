"""Qwen2 / Qwen2.5: a Llama with biases on q, k and v (not o), and sliding windows on the
layers from `max_window_layers` on when `use_sliding_window` is set."""

from __future__ import annotations

from engine.models.base import ModelArgs, ModelFamily, common_args, register_family, window_layers


def qwen_windows(config) -> dict:
    """Qwen's sliding windows (Qwen2, Qwen3, Qwen3-MoE): on the layers from max_window_layers
    on, only when use_sliding_window is set."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", False) else None
    first_sliding = getattr(config, "max_window_layers", 0)
    return window_layers(config, window, lambda i: i >= first_sliding)


def qwen2_args(config) -> ModelArgs:
    return ModelArgs(**common_args(config, qkv_bias=True), **qwen_windows(config))


QWEN2 = register_family(("qwen2",), ModelFamily("qwen2", qwen2_args))
